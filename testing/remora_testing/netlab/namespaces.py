"""Network namespaces for the lab: a bridge namespace, one namespace per node, veth pairs between them.

Every lab lives in a /24 of its own inside 10.213.0.0/16, picked at random so that labs of parallel
test runs never share addresses. The order of operations is what keeps the host safe:

1. the lab's /24 is blackholed in the root namespace (``ip route add blackhole``) BEFORE any address of
   it exists anywhere, so that a client mistakenly run in the root namespace gets "no route" instead of
   sending the packet out of the machine through the default route;
2. namespaces and veth pairs are created directly inside their namespaces (``ip link add ... netns A
   type veth peer ... netns B``): no interface of the lab ever appears in the root namespace;
3. teardown stops the lab's processes, deletes its namespaces (which destroys the veths and the bridge)
   and only then removes the blackhole route.

A lab writes a state file (``/run/remora-netlab/<lab>.json``, with the owner's pid and start time) before
it creates anything; :func:`cleanup_stale` uses it to remove what a killed run left behind without
touching a lab whose owner is still alive. Our blackhole routes carry ``proto 213`` so that they can be
recognised even if a state file was lost.

Processes run inside a namespace through ``nsenter --net=/run/netns/X``: unlike ``ip netns exec`` it
does not remount /sys, which containerd/runc need intact (see the platform notes).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from remora.errors import RemoraError, UsageError
from remora.procutil import Daemon

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
STATE_DIR = Path("/run/remora-netlab")
LAB_SUPERNET = ipaddress.ip_network("10.213.0.0/16")
DEFAULT_PREFIX = "rlab-"
ROUTE_PROTO = "213"  # marks the blackhole routes this module adds (ip route ... proto 213)
BRIDGE = "br0"
NODE_IF = "eth0"


class NetlabError(RemoraError):
    """A lab could not be built or torn down (missing tool, no free subnet, ip/tc failure)."""


# --------------------------------------------------------------------------------------------- commands

def _run(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise NetlabError(f"{argv[0]} not found: install iproute2 and util-linux (nsenter)") from exc
    if check and proc.returncode != 0:
        raise NetlabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip`` in the root namespace, or in ``ns`` with ``ip -n`` (no process enters the namespace)."""
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    return _run(argv, check=check)


def nsenter_argv(ns: str) -> list[str]:
    """The prefix that runs a command in namespace ``ns`` (network namespace only, /sys untouched)."""
    return ["nsenter", f"--net={NETNS_DIR / ns}", "--"]


def run_in(ns: str, argv: Sequence[str], check: bool = True, timeout: float = 120.0,
           input: str | bytes | None = None, text: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` inside namespace ``ns`` and wait for it; output is captured."""
    if not (NETNS_DIR / ns).exists():
        raise NetlabError(f"network namespace {ns!r} does not exist")
    full = nsenter_argv(ns) + list(argv)
    proc = subprocess.run(full, capture_output=True, text=text, timeout=timeout, input=input, env=env)
    if check and proc.returncode != 0:
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise NetlabError(f"[{ns}] {' '.join(argv)} failed ({proc.returncode}): {err.strip()[-2000:]}")
    return proc


def spawn_in(ns: str, argv: Sequence[str], log_path: Path | str, env: dict | None = None,
             cwd: str | None = None) -> Daemon:
    """Start a daemon inside ``ns`` in its own session; nsenter execs it, so ``Daemon.pid`` is the daemon."""
    if not (NETNS_DIR / ns).exists():
        raise NetlabError(f"network namespace {ns!r} does not exist")
    return Daemon(argv, Path(log_path), env=env, cwd=cwd, preexec_argv=nsenter_argv(ns)).start()


def netns_list() -> list[str]:
    out = ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    out = ip("netns", "pids", ns, check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def route_get(addr: str) -> str:
    """What the ROOT namespace does with a packet to ``addr``; sends nothing.

    Returns ``"blackhole <dst>"`` when the longest matching route is a blackhole (``ip route get`` itself
    only answers EINVAL for those), else the ``ip route get`` answer (e.g. ``"... via 192.0.2.1 dev eth0"``).
    """
    routes = json.loads(ip("-j", "-4", "route", "show", "table", "all", "match", addr).stdout or "[]")

    def plen(r: dict) -> int:
        dst = r.get("dst", "")
        return 0 if dst == "default" else ipaddress.ip_network(dst if "/" in dst else dst + "/32").prefixlen

    best = max(routes, key=plen, default=None)
    if best is not None and best.get("type") == "blackhole":
        return f"blackhole {best['dst']}"
    proc = ip("route", "get", addr, check=False)
    return (proc.stdout + proc.stderr).strip()


def blackhole_routes(proto_only: bool = True) -> list[str]:
    """Destinations of blackhole routes in the root namespace (only ours, by default)."""
    args = ["route", "show", "type", "blackhole"] + (["proto", ROUTE_PROTO] if proto_only else [])
    out = ip(*args).stdout
    dests = []
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        dests.append(parts[1] if parts[0] == "blackhole" else parts[0])
    return dests


def _kill_pids(pids: Sequence[int], grace: float = 3.0) -> None:
    """SIGTERM then SIGKILL processes that live in a lab namespace (so ours by construction)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_pid_alive(p) for p in alive):
            time.sleep(0.05)
        pids = [p for p in alive if _pid_alive(p)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0): count it as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _bridge_netfilter_off(ns: str) -> None:
    """Stop ``br_netfilter`` from passing the frames bridged in ``ns`` through iptables.

    The module (loaded on hosts that run Docker or Kubernetes) hooks every bridge, and its sysctls are per
    network namespace, so this touches the lab's bridge namespace only. Without the module the sysctls do
    not exist and there is nothing to turn off.
    """
    for name in ("iptables", "ip6tables", "arptables"):
        path = f"/proc/sys/net/bridge/bridge-nf-call-{name}"
        run_in(ns, ["sh", "-c", f"[ ! -e {path} ] || echo 0 > {path}"])


# ------------------------------------------------------------------------------------------------ subnet

def _taken_subnets() -> list[ipaddress.IPv4Network]:
    """Routes in the root namespace more specific than /16 that overlap the lab supernet."""
    out = ip("-4", "route", "show", "table", "all").stdout
    taken = []
    for line in out.splitlines():
        parts = line.split()
        typed = parts and parts[0] in ("blackhole", "unreachable", "prohibit", "local", "broadcast")
        dest = parts[1] if typed else (parts[0] if parts else "")
        try:
            net = ipaddress.ip_network(dest, strict=False)
        except ValueError:
            continue
        if net.prefixlen > LAB_SUPERNET.prefixlen and net.overlaps(LAB_SUPERNET):
            taken.append(net)
    return taken


def _claim_subnet(record, third_octet: int | None = None) -> ipaddress.IPv4Network:
    """Pick a free /24 of 10.213.0.0/16 and blackhole it; the route add is also the lock between labs.

    ``record(subnet)`` is called before each attempt so that the state file names the subnet before
    the route exists (see :func:`cleanup_stale`).
    """
    candidates = [third_octet] if third_octet is not None else random.sample(range(1, 255), 254)
    taken = _taken_subnets()
    for octet in candidates:
        if not 0 <= octet <= 255:
            raise UsageError(f"third octet {octet} out of range")
        net = ipaddress.ip_network(f"10.213.{octet}.0/24")
        if any(net.overlaps(t) for t in taken):
            continue
        record(net)
        proc = ip("route", "add", "blackhole", str(net), "proto", ROUTE_PROTO, check=False)
        if proc.returncode == 0:
            return net
        record(None)
        if "File exists" not in proc.stderr:
            raise NetlabError(f"ip route add blackhole {net} failed: {proc.stderr.strip()}")
    raise NetlabError("no free /24 left in 10.213.0.0/16 for a lab")


# ------------------------------------------------------------------------------------------------ the lab

@dataclass
class Node:
    """One namespace on the lab bridge: ``ns`` is its netns name, ``ip`` its address, ``port`` the bridge side."""

    name: str
    ns: str
    ip: str
    port: str
    lab: Lab = field(repr=False)

    def run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return run_in(self.ns, argv, **kw)

    def spawn(self, argv: Sequence[str], log_name: str | None = None, env: dict | None = None,
              cwd: str | None = None) -> Daemon:
        return self.lab.spawn(self, argv, log_name=log_name, env=env, cwd=cwd)

    def shape(self, up: str | int | None = None, down: str | int | None = None, kind: str = "tbf") -> None:
        """Rate-limit this node's uplink (egress of its eth0) and/or downlink (egress of its bridge port).

        In a lab made with ``offload=True`` the shapers pass TCP super-packets whole (see
        :func:`remora_testing.netlab.shaping.tbf_burst`)."""
        from remora_testing.netlab.shaping import set_rate
        if up is not None:
            set_rate(self.ns, NODE_IF, up, kind=kind, gso=self.lab.offload)
        if down is not None:
            set_rate(self.lab.bridge_ns, self.port, down, kind=kind, gso=self.lab.offload)

    def tx_bytes(self) -> int:
        """Bytes this node sent on its lab interface (wire level: includes TCP/IP and Ethernet headers; in an
        ``offload`` lab a TCP super-packet's headers are counted once, the shaper's ``Sent`` counter in
        :func:`remora_testing.netlab.shaping.show` counts them per frame)."""
        return _link_stat(self.ns, NODE_IF, "tx_bytes")

    def rx_bytes(self) -> int:
        return _link_stat(self.ns, NODE_IF, "rx_bytes")


def _link_stat(ns: str, dev: str, name: str) -> int:
    """Interface counter through netlink (``ip -s -j``): /sys inside nsenter still shows the root namespace."""
    info = json.loads(ip("-s", "-j", "link", "show", "dev", dev, ns=ns).stdout)[0]
    direction, _, field_ = name.partition("_")
    return int(info["stats64"][direction][field_])


class Lab:
    """A disposable network: ``with Lab() as lab: a = lab.add_node("a"); a.run([...])``.

    Teardown always runs: on normal exit, on exceptions, on Ctrl-C and on SIGTERM (turned into
    ``KeyboardInterrupt`` while the lab is open, when used from the main thread). Daemons started with
    :meth:`spawn` are stopped first; any other process still inside a lab namespace is killed.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, workdir: Path | str | None = None,
                 third_octet: int | None = None, offload: bool = False):
        if not prefix or "/" in prefix or len(prefix) > 12:
            raise UsageError(f"lab prefix {prefix!r}: use 1-12 characters without '/'")
        self.prefix = prefix
        self.id = secrets.token_hex(3)
        self.name = f"{prefix}{self.id}"
        self.workdir = Path(workdir) if workdir else Path("/tmp") / self.name
        self._third_octet = third_octet
        self.subnet: ipaddress.IPv4Network | None = None
        self.bridge_ns = f"{self.name}-br"
        #: links behave like NICs with segmentation offload behind a plain switch: shapers pass TCP
        #: super-packets whole, and the bridge does not hand bridged frames to iptables (br_netfilter).
        #: Same rates, far less per-frame kernel work: for labs whose many busy links would otherwise run
        #: the machine out of CPU before the links are full (benchmarks/bench_p2p_mesh.py).
        self.offload = offload
        self.nodes: dict[str, Node] = {}
        self.daemons: list[Daemon] = []
        self._hosts = None
        self._old_sigterm = None
        self._closed = False

    # -- lifecycle
    def __enter__(self) -> Lab:
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
        try:
            self.create()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def create(self) -> Lab:
        self.workdir.mkdir(parents=True, exist_ok=True)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._write_state(None)  # before anything exists, so a killed run is always cleanable
        self.subnet = _claim_subnet(self._write_state, self._third_octet)  # blackhole first, then addresses
        self._hosts = iter(list(self.subnet.hosts())[1:])  # .1 left unused (no gateway in a lab)
        probe = str(next(iter(self.subnet.hosts())))
        if not route_get(probe).startswith("blackhole"):
            raise NetlabError(f"root namespace would route {probe} somewhere else than the blackhole: "
                              f"{route_get(probe)}")
        self._add_ns(self.bridge_ns)
        ip("link", "add", BRIDGE, "type", "bridge", ns=self.bridge_ns)
        # a lab bridge forwards at once (no STP listening/learning delay)
        ip("link", "set", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0", ns=self.bridge_ns)
        ip("link", "set", BRIDGE, "up", ns=self.bridge_ns)
        if self.offload:
            _bridge_netfilter_off(self.bridge_ns)
        log.info("lab %s: subnet %s, bridge namespace %s", self.name, self.subnet, self.bridge_ns)
        return self

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        ip("link", "set", "lo", "up", ns=ns)

    def add_node(self, name: str, up: str | int | None = None, down: str | int | None = None,
                 kind: str = "tbf") -> Node:
        """A namespace attached to the bridge with the next free address; optional rate limits per direction."""
        if self.subnet is None:
            raise NetlabError("lab not created: use 'with Lab() as lab'")
        if name in self.nodes or not name.replace("-", "").isalnum() or len(name) > 20:
            raise UsageError(f"node name {name!r}: must be unique, alphanumeric (and '-'), at most 20 characters")
        index = len(self.nodes)
        ns = f"{self.name}-{name}"
        port = f"p{index}"
        try:
            addr = str(next(self._hosts))
        except StopIteration:
            raise NetlabError(f"lab {self.name}: no address left in {self.subnet}") from None
        self._add_ns(ns)
        ip("link", "add", NODE_IF, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.bridge_ns)
        ip("link", "set", port, "master", BRIDGE, "up", ns=self.bridge_ns)
        ip("addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", NODE_IF, ns=ns)
        ip("link", "set", NODE_IF, "up", ns=ns)
        node = Node(name=name, ns=ns, ip=addr, port=port, lab=self)
        self.nodes[name] = node
        if up is not None or down is not None:
            node.shape(up=up, down=down, kind=kind)
        return node

    def spawn(self, node: Node, argv: Sequence[str], log_name: str | None = None, env: dict | None = None,
              cwd: str | None = None) -> Daemon:
        log_name = log_name or f"{node.name}-{Path(argv[0]).name}-{len(self.daemons)}.log"
        daemon = spawn_in(node.ns, argv, self.workdir / "logs" / log_name, env=env, cwd=cwd)
        self.daemons.append(daemon)
        return daemon

    def namespaces(self) -> list[str]:
        return [self.bridge_ns] + [n.ns for n in self.nodes.values()]

    def teardown(self) -> None:
        """Stop processes, delete namespaces, then drop the blackhole route; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut teardown short
        errors = []
        try:
            # SIGTERM every daemon first, then wait for each: a lab of 20 daemons stops in one grace period
            for daemon in self.daemons:
                if daemon.alive():
                    try:
                        os.killpg(daemon.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            for daemon in reversed(self.daemons):
                try:
                    daemon.stop(grace=5)
                except Exception as exc:  # noqa: BLE001 - keep tearing down
                    errors.append(f"stop {daemon.argv[:3]}: {exc}")
            _destroy_namespaces([ns for ns in netns_list() if ns == self.name or ns.startswith(self.name + "-")],
                                errors)
            if self.subnet is not None:
                proc = ip("route", "del", "blackhole", str(self.subnet), "proto", ROUTE_PROTO, check=False)
                if proc.returncode != 0 and "No such process" not in proc.stderr:
                    errors.append(f"route del {self.subnet}: {proc.stderr.strip()}")
            if not errors:
                (STATE_DIR / f"{self.name}.json").unlink(missing_ok=True)
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None
        if errors:
            raise NetlabError(f"lab {self.name} teardown incomplete: " + "; ".join(errors))

    def _write_state(self, subnet) -> None:
        state = {"name": self.name, "pid": os.getpid(), "start": _proc_start_time(os.getpid()),
                 "subnet": str(subnet) if subnet else None}
        path = STATE_DIR / f"{self.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _destroy_namespaces(names: Sequence[str], errors: list[str]) -> None:
    pids = [pid for ns in names for pid in netns_pids(ns)]
    if pids:
        log.warning("killing %d leftover process(es) in lab namespaces: %s", len(pids), pids)
        _kill_pids(pids)
    for ns in names:
        proc = ip("netns", "del", ns, check=False)
        if proc.returncode != 0 and (NETNS_DIR / ns).exists():
            errors.append(f"netns del {ns}: {proc.stderr.strip()}")


# --------------------------------------------------------------------------------------- stale cleanup

def _owner_alive(state: dict) -> bool:
    pid = state.get("pid")
    return bool(pid) and _pid_alive(pid) and _proc_start_time(pid) == state.get("start")


def _read_states() -> dict[str, dict]:
    states = {}
    if STATE_DIR.is_dir():
        for path in STATE_DIR.glob("*.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                state = {}
            states[path.stem] = state
    return states


def cleanup_stale(prefix: str = DEFAULT_PREFIX, force: bool = False) -> list[str]:
    """Remove labs left by killed runs: namespaces named ``<prefix>*``, their blackholes and state files.

    A lab whose owner process is still alive is left alone unless ``force`` (so a cleanup in one test run
    never breaks a parallel one); labs of another prefix are never touched. A ``proto 213`` blackhole
    that no state file claims is an orphan and is removed too (a lab records its subnet before it adds the
    route and deletes the record only after the route, so a live lab's route always has an owner).
    Returns what was removed, for the caller to print.
    """
    states = _read_states()
    doomed = {name for name, st in states.items() if name.startswith(prefix) and (force or not _owner_alive(st))}
    protected = {name for name in states if name not in doomed}
    removed: list[str] = []
    errors: list[str] = []

    def lab_of(ns: str) -> str:
        return ns[:len(prefix) + 6]  # prefix + 6 hex characters of the lab id

    stale_ns = [ns for ns in netns_list() if ns.startswith(prefix) and lab_of(ns) not in protected]
    _destroy_namespaces(stale_ns, errors)
    removed += [f"netns {ns}" for ns in stale_ns]
    owners = {st.get("subnet"): name for name, st in states.items() if st.get("subnet")}
    for dest in blackhole_routes():
        owner = owners.get(dest)
        if owner is not None and owner not in doomed:
            continue
        proc = ip("route", "del", "blackhole", dest, "proto", ROUTE_PROTO, check=False)
        if proc.returncode == 0:
            removed.append(f"route blackhole {dest}")
        else:
            errors.append(f"route del {dest}: {proc.stderr.strip()}")
    if errors:
        raise NetlabError("cleanup incomplete: " + "; ".join(errors))
    for name in doomed:
        (STATE_DIR / f"{name}.json").unlink(missing_ok=True)
    return removed
