"""A P2P mesh of real processes in a lab: registry, scheduler and N peer nodes (peer + containerd each).

Topology (one /24, one bridge)::

    registry ns: docker-registry (access log counts bytes served), uplink shaped
    sched ns:    remora scheduler
    nodeK ns:    remora peer (mirror on 127.0.0.1, uploads on the node address) + private containerd

Clients (``probe fetch``, ``ctr pull``) run inside the node namespaces and talk to their own peer on
127.0.0.1 as containerd would, or straight to the registry for the baseline. The tests in
tests/plugins/test_mesh_e2e.py and benchmarks/bench_p2p_mesh.py are both built on :class:`Mesh`.

Faults are made from outside the peer, so they exercise the real code paths: a killed peer is
SIGKILLed; a "corrupt" peer advertises a port where :mod:`remora_testing.netlab.delay` flips bytes of every
piece it serves; a slow peer has a tbf on its uplink; the scheduler is stopped like any daemon.

The mesh is mutual TLS by default, as in production (issue 10): a cluster CA is made in the lab's work
directory, the scheduler gets a certificate for its address, each peer one for its host id and node
address (``--tls-dir``); the corrupting proxy holds its node's certificate (a lying member).
``MeshOptions(tls=False)`` runs the plain mesh (``--insecure-plain-mesh``) for comparisons.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from remora.procutil import Daemon
from remora_testing.netlab.namespaces import Lab, NetlabError, Node, nsenter_argv
from remora_testing.netlab.services import NsContainerd, NsRegistry, wait_port_in, write_mirror_hosts

PY = sys.executable
#: the ``remora`` command, independent of PATH (CI may not have the console script on it)
REMORA = [PY, "-c", "import sys; from remora.cli import main; sys.exit(main(sys.argv[1:]))"]
SCHEDULER_METRICS_PORT = 8003
MIRROR_PORT = 65001
UPLOAD_PORT = 65002
CORRUPT_PORT = 65003
SCHEDULER_PORT = 8002
REGISTRY_PORT = 5000


@dataclass
class PeerNode:
    index: int
    node: Node
    data_dir: Path
    daemon: Daemon | None = None
    proxy: Daemon | None = None
    containerd: NsContainerd | None = None
    hosts_dir: Path | None = None
    corrupt: bool = False

    @property
    def mirror(self) -> str:
        return f"http://127.0.0.1:{MIRROR_PORT}"


@dataclass
class MeshOptions:
    peers: int = 4
    node_rate: str | None = None              # up and down of every peer node
    registry_rate: str | None = None          # registry uplink (what it can serve)
    peer_rates: dict[int, tuple[str | None, str | None]] = field(default_factory=dict)  # index -> (up, down)
    scorer: str = "weighted"
    containerd: bool = True
    corrupt: Sequence[int] = ()              # peers whose served pieces get corrupted
    peer_args: Sequence[str] = ()            # extra flags for every peer
    scheduler_args: Sequence[str] = ()
    tls: bool = True                          # mutual TLS between peers and with the scheduler
    node_args: dict[int, Sequence[str]] = field(default_factory=dict)  # index -> extra flags of that peer


class Mesh:
    def __init__(self, lab: Lab, opts: MeshOptions):
        self.lab, self.opts = lab, opts
        self.work = Path(lab.workdir)
        self.registry_node = lab.add_node("registry")
        self.sched_node = lab.add_node("sched")
        self.registry = NsRegistry(self.registry_node, self.work / "registry", port=REGISTRY_PORT)
        self.scheduler: Daemon | None = None
        self.peers: list[PeerNode] = []
        for i in range(opts.peers):
            up = down = opts.node_rate
            if i in opts.peer_rates:
                up, down = opts.peer_rates[i]
            node = lab.add_node(f"node{i}", up=up, down=down)
            self.peers.append(PeerNode(index=i, node=node, data_dir=self.work / f"peer{i}",
                                       corrupt=i in opts.corrupt))
        if opts.registry_rate:
            self.registry_node.shape(up=opts.registry_rate)
        self.tls_dirs: dict[str, Path] = {}      # "scheduler" / "peer<i>" -> member directory
        if opts.tls:
            self._issue_certificates()

    def _issue_certificates(self) -> None:
        """A cluster CA for the lab and a member certificate for the scheduler and every peer."""
        from remora.pki.ca import init_ca, write_member

        pki = self.work / "pki"
        ca = init_ca(pki / "ca", cluster=self.lab.name, force=True)
        members = [("scheduler", "scheduler", "sched", self.sched_node.ip)]
        members += [(f"peer{p.index}", "peer", self.host_id(p), p.node.ip) for p in self.peers]
        for key, role, host_id, ip in members:
            self.tls_dirs[key] = write_member(pki / key, ca.issue(role, host_id, ips=[ip]), ca.bundle_pem)["ca"].parent

    def host_id(self, p: PeerNode) -> str:
        # every node of the lab is one machine: give each its own host id, or the scheduler would
        # (rightly) never let them serve each other; with TLS it is also the name in its certificate
        return f"{self.lab.name}-node{p.index}"

    def _security_args(self, key: str) -> list[str]:
        return ["--tls-dir", str(self.tls_dirs[key])] if self.opts.tls else ["--insecure-plain-mesh"]

    # ----------------------------------------------------------------------------------- start/stop
    def start(self) -> Mesh:
        """Registry (must be filled already, see :meth:`NsRegistry.loopback`) → scheduler → containerd → peers.

        Daemons of one kind start together and are waited for afterwards: a mesh of 8 is up in seconds.
        """
        self.registry.start()
        self.start_scheduler()
        if self.opts.containerd:
            for p in self.peers:
                p.containerd = NsContainerd(p.node, self.work / f"containerd{p.index}").start()
                p.hosts_dir = write_mirror_hosts(self.work / f"hosts{p.index}", self.registry.host, p.mirror)
        for p in self.peers:
            self.start_peer(p, wait=False)
        for p in self.peers:
            self.wait_peer(p)
        return self

    def scheduler_argv(self) -> list[str]:
        return [*REMORA, "-v", "scheduler", "--listen", f"{self.sched_node.ip}:{SCHEDULER_PORT}",
                "--metrics-listen", f"{self.sched_node.ip}:{SCHEDULER_METRICS_PORT}",
                "--scorer", self.opts.scorer, *self._security_args("scheduler"), *self.opts.scheduler_args]

    def start_scheduler(self) -> Daemon:
        self.scheduler = self.lab.spawn(self.sched_node, self.scheduler_argv(), log_name="scheduler.log")
        wait_port_in(self.sched_node, self.sched_node.ip, SCHEDULER_PORT, daemon=self.scheduler)
        return self.scheduler

    def stop_scheduler(self) -> None:
        if self.scheduler:
            self.scheduler.stop()

    def peer_argv(self, p: PeerNode) -> list[str]:
        advertise = CORRUPT_PORT if p.corrupt else UPLOAD_PORT
        return [*REMORA, "-v", "peer",
                "--data-dir", str(p.data_dir),
                "--listen", f"127.0.0.1:{MIRROR_PORT}",
                "--upload-listen", f"{p.node.ip}:{UPLOAD_PORT}",
                "--advertise", f"{p.node.ip}:{advertise}",
                "--scheduler", f"{self.sched_node.ip}:{SCHEDULER_PORT}",
                "--upstream", self.registry.host, "--plain-http", self.registry.host,
                "--host-id", self.host_id(p), *self._security_args(f"peer{p.index}"),
                # byte watermarks: the lab shares one disk, whose % use says nothing about a node
                "--gc-high", "64G", "--gc-low", "48G",
                *self.opts.peer_args, *self.opts.node_args.get(p.index, ())]

    def start_peer(self, p: PeerNode, wait: bool = True) -> None:
        p.daemon = self.lab.spawn(p.node, self.peer_argv(p), log_name=f"peer{p.index}.log")
        if p.corrupt and p.proxy is None:
            tls_args = ["--tls-dir", str(self.tls_dirs[f"peer{p.index}"])] if self.opts.tls else []
            p.proxy = self.lab.spawn(p.node, [PY, "-m", "remora_testing.netlab.delay",
                                              "--listen", f"{p.node.ip}:{CORRUPT_PORT}",
                                              "--upstream", f"{p.node.ip}:{UPLOAD_PORT}", "--corrupt", *tls_args],
                                     log_name=f"corrupt-proxy{p.index}.log")
        if wait:
            self.wait_peer(p)

    def restart_peer(self, p: PeerNode, corrupt: bool | None = None) -> None:
        """Stop (SIGTERM) and start a node's peer again, optionally behind the corrupting proxy or not."""
        for d in (p.daemon, p.proxy):
            if d is not None:
                d.stop()
        p.proxy = None
        if corrupt is not None:
            p.corrupt = corrupt
        self.start_peer(p)

    def wait_peer(self, p: PeerNode) -> None:
        wait_port_in(p.node, "127.0.0.1", MIRROR_PORT, timeout=30, daemon=p.daemon)
        wait_port_in(p.node, p.node.ip, UPLOAD_PORT, timeout=30, daemon=p.daemon)
        if p.proxy is not None:
            wait_port_in(p.node, p.node.ip, CORRUPT_PORT, daemon=p.proxy)

    def log_tails(self, n: int = 15) -> str:
        """The end of every daemon's log, for assertion messages."""
        parts = []
        for d in self.lab.daemons:
            parts.append(f"--- {d.log_path.name} ---\n{d.log_tail(n)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------- clients
    def blob_url(self, p: PeerNode | None, repo: str, digest: str) -> str:
        """Through the node's peer (as containerd asks a mirror: ?ns=<registry>), or straight (p=None)."""
        if p is None:
            return f"http://{self.registry.host}/v2/{repo}/blobs/{digest}"
        return f"{p.mirror}/v2/{repo}/blobs/{digest}?ns={self.registry.host}"

    def start_fetch(self, node: Node, url: str, timeout: float = 600) -> subprocess.Popen:
        argv = nsenter_argv(node.ns) + [PY, "-m", "remora_testing.netlab.probe", "fetch", url,
                                        "--timeout", str(timeout)]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def finish_fetch(proc: subprocess.Popen, timeout: float = 600) -> dict:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        lines = out.strip().splitlines()
        if not lines:
            return {"status": 0, "bytes": 0, "sha256": "", "error": err.strip()[-500:] or "no output", "seconds": 0}
        return json.loads(lines[-1])

    def fetch_all(self, repo: str, digest: str, nodes: Sequence[PeerNode] | None = None, direct: bool = False,
                  lead: float = 0.0) -> tuple[float, list[dict]]:
        """Every node fetches the blob at once (through its peer, or ``direct``); wall time and results.

        ``lead`` starts the first node that many seconds before the others, so that it is the seed: runs
        that compare schedulers then start from the same seed instead of whoever registered first.
        """
        nodes = list(self.peers if nodes is None else nodes)
        t0 = time.monotonic()
        procs = []
        for n, p in enumerate(nodes):
            procs.append(self.start_fetch(p.node, self.blob_url(None if direct else p, repo, digest)))
            if n == 0 and lead:
                time.sleep(lead)
        results = [self.finish_fetch(proc) for proc in procs]
        return time.monotonic() - t0, results

    def metrics(self, p: PeerNode) -> dict[str, float]:
        """The peer's Prometheus metrics, ``{'name{label="v"}': value}``, read inside its namespace."""
        code = ("import urllib.request,sys;"
                f"sys.stdout.write(urllib.request.urlopen('{p.mirror}/metrics',timeout=10).read().decode())")
        return parse_metrics(p.node.run([PY, "-c", code], check=False, timeout=30).stdout)

    def kill_peer(self, p: PeerNode) -> None:
        if p.daemon:
            p.daemon.kill()

    def pull_image(self, p: PeerNode, ref: str, timeout: float = 600) -> float:
        if p.containerd is None or p.hosts_dir is None:
            raise NetlabError("mesh started without containerd")
        t0 = time.monotonic()
        p.containerd.pull(ref, p.hosts_dir, timeout=timeout)
        return time.monotonic() - t0


_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+([-+0-9.eEinfNa]+)$")


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _METRIC_RE.match(line.strip())
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def metric(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total
