#!/usr/bin/env python3
"""Cold start of a realistic image over a slow link: overlayfs full pull vs remora lazy pull.

What is timed is what a user waits for: from the start of the pull to the workload's output (the
moment its line arrives on ``ctr run``'s stdout; the ``--rm`` clean-up after it is not counted, for
either scenario). The image
is Debian bookworm (minbase) + python3 with a small app layer; the workload (``python3 /app/main.py``)
imports a few stdlib modules and prints a line. Both scenarios start from a cold cache every run (a
fresh containerd root and, for remora, a fresh snapshotter root with an empty chunk cache) and run in
the same invocation, so the ratios are meaningful even on a loaded machine.

* ``overlayfs``: ``ctr images pull`` with containerd's built-in overlayfs snapshotter (download every
  layer, unpack), then ``ctr run``;
* ``remora``: the image converted beforehand by ``remora convert --prefetch-list`` (the list recorded by
  ``remora trace`` running the same workload), pulled with ``remora pull`` (this interpreter's console
  script, not a version manager's shim in front of it, asking the snapshotter's pull service; every
  layer's Prepare carries the remote-snapshot labels, the snapshotter mounts the image lazily; no
  layer is downloaded; ``--puller remora-local`` pulls in the CLI's own process instead, ``--puller
  rpull`` with stargz's ``ctr-remote images rpull``), then ``ctr run --snapshotter remora``.

The link. The registry runs in a network namespace of its own (:class:`remora.netlab.Lab`: the lab's
/24 is blackholed in the root namespace first), behind ``tbf`` at ``--rate`` (100 Mbit/s) in both
directions. containerd, ctr and the snapshotter stay in the root namespace and reach the registry only
through a loopback forwarder: this script re-runs itself as ``forward``, binds 127.0.0.1 in the root
namespace, then enters a client namespace of the lab (``setns``), so every connection to the registry is
made from inside the lab (the platform's safety rule) and the root namespace only ever talks to
loopback. The forwarder is :class:`remora.netlab.delay.DelayProxy` (this kernel has no netem): it adds
``--delay-ms`` (10 ms) one way in each direction, and holds a new connection for one round trip before
relaying, as a TCP handshake over that link would. It runs at nice -10: netem would delay packets in
the kernel, and a node busy starting a container must not slow its own emulated network down.

The node. Each run waits until the machine is idle (containerd and the snapshotter just started, and
the snapshotter's spare fs process imports for ~0.5 CPU-second) before the clock starts, as on a node
that has been up for a while; remora's modules are byte-compiled first, as a pip install leaves them.

Bytes and requests are counted from the registry's own access log (body bytes of successful blob
GETs), so they are exactly what crossed the link at the application level. ``bound`` is the floor the
issue sets for remora: bytes fetched / link rate + one round trip for the metadata.

Usage (root; ~1 min to build and convert the image the first time, cached afterwards)::

    python benchmarks/bench_cold_start.py [--runs 3] [--rate 100mbit] [--delay-ms 10] [--json]

Image, prefetch list and conversion are cached under ``--cache`` (``/var/cache/remora-test``);
``--rebuild`` redoes them.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import ipaddress
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from remora.imagebuild import File, LayerSpec, debian_rootfs, tar_of_files, write_image
from remora.procutil import Daemon, wait_until

HERE = Path(__file__).resolve()
BUILD_VERSION = "cold-start/4"  # bump when the image recipe changes (invalidates the cache)
REPO = "bench/debian-python"
OCI_TAG, REMORA_TAG = "1", "1-remora"
MARKER = "remora-bench: hello"
APP_MAIN = (b"import json, decimal, email.parser, http.client, argparse, logging, pathlib\n"
            b"print('" + MARKER.encode() + b"', json.dumps({'decimal': str(decimal.Decimal('1.1'))}))\n")
WORKLOAD = ["python3", "/app/main.py"]
IMAGE_CONFIG = {"Cmd": WORKLOAD, "WorkingDir": "/",
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]}
CLONE_NEWNET = 0x40000000


# ----------------------------------------------------------------------------------------- the image

@dataclass
class PreparedImage:
    """A registry storage directory holding ``REPO:OCI_TAG`` and its remora conversion."""

    registry_root: Path
    repo: str
    oci_tag: str
    remora_tag: str
    prefetch_files: int
    oci_bytes: int       # compressed layers of the OCI image
    remora_bytes: int    # all blobs of the remora image (bootstrap included)


def image_cache_dir(cache: Path, name: str, *parts) -> Path:
    key = hashlib.sha256(json.dumps([BUILD_VERSION, name, *[str(p) for p in parts]]).encode()).hexdigest()[:12]
    return cache / "bench-images" / f"{name}-{key}"


def prepare_image(cache: Path, name: str, app_files: dict[str, File], workload: list[str] | None, *,
                  rebuild: bool = False, log=print) -> PreparedImage:
    """Build Debian+python3+app, trace ``workload`` in it (if any), convert with that prefetch list; cached.

    Runs against a loopback registry over the cached storage directory (nothing crosses a lab link);
    ``ready.json`` is written last, so a half-built cache is rebuilt, never trusted.
    """
    from remora.registry.local import LocalRegistry

    base = debian_rootfs(cache)
    app_digest = hashlib.sha256(b"".join(k.encode() + v.data for k, v in sorted(app_files.items()))).hexdigest()
    d = image_cache_dir(cache, name, base.name, app_digest, workload)
    ready = d / "ready.json"
    if ready.exists() and not rebuild:
        return PreparedImage(**{**json.loads(ready.read_text()), "registry_root": d / "registry"})
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    hot = d / "hot.txt"
    with LocalRegistry(root=d / "registry") as reg:
        src, dst = f"{reg.host}/{REPO}:{OCI_TAG}", f"{reg.host}/{REPO}:{REMORA_TAG}"
        t0 = time.monotonic()
        built = write_image(src, None, [LayerSpec(base, created_by="debootstrap minbase + python3"),
                                        LayerSpec(tar_of_files(app_files), created_by="COPY app /app")],
                            config=IMAGE_CONFIG)
        log(f"built {src} in {time.monotonic() - t0:.1f}s")
        prefetch = []
        if workload:
            t0 = time.monotonic()
            _check(["remora", "trace", "-o", str(hot), src, "--", *workload], "remora trace")
            log(f"traced {len(hot.read_text().splitlines())} files in {time.monotonic() - t0:.1f}s")
            prefetch = ["--prefetch-list", str(hot)]
        t0 = time.monotonic()
        report = json.loads(_check(["remora", "convert", "--json", "--no-progress", *prefetch, src, dst],
                                   "remora convert"))
        log(f"converted in {time.monotonic() - t0:.1f}s")
    info = {"repo": REPO, "oci_tag": OCI_TAG, "remora_tag": REMORA_TAG,
            "prefetch_files": len(hot.read_text().splitlines()) if workload else 0,
            "oci_bytes": sum(layer.size for layer in built.layers),
            "remora_bytes": int(report["output_bytes"])}
    ready.write_text(json.dumps(info))
    return PreparedImage(**info, registry_root=d / "registry")


def _check(argv: list[str], what: str, timeout: float = 900) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}{proc.stdout[-2000:]}")
    return proc.stdout


def cold_start_app() -> dict[str, File]:
    return {"app/main.py": File(APP_MAIN)}


# --------------------------------------------------------------------------------- loopback forwarder

def forward_main(argv: list[str]) -> int:
    """``bench_cold_start.py forward``: 127.0.0.1 in the root namespace -> UPSTREAM inside NETNS, delayed."""
    from remora.netlab.delay import DelayProxy

    ap = argparse.ArgumentParser(prog="bench_cold_start.py forward")
    ap.add_argument("--netns", required=True, help="lab namespace the upstream connections are made from")
    ap.add_argument("--upstream", required=True, help="HOST:PORT inside the lab")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    ap.add_argument("--port-file", required=True, help="where the chosen loopback port is written")
    args = ap.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    from remora.netlab import LAB_SUPERNET

    if ipaddress.ip_address(host) not in LAB_SUPERNET:  # the forwarder only ever leads into a lab
        raise SystemExit(f"upstream {host} is not a lab address ({LAB_SUPERNET})")

    # The listening socket is created BEFORE setns: it stays in the root namespace, on loopback only.
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(256)
    lsock.setblocking(False)
    fd = os.open(f"/run/netns/{args.netns}", os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns into {args.netns}")
    os.close(fd)
    delay = args.delay_ms / 1000
    # The emulated link runs at a higher priority than the node's work, as netem would (it runs in the
    # kernel's softirq context): a busy node must not slow its own network down.
    os.setpriority(os.PRIO_PROCESS, 0, -10)

    class LoopbackIntoLab(DelayProxy):
        async def start(self):
            self.server = await asyncio.start_server(self._handle, sock=lsock)
            return self

        async def _handle(self, reader, writer):
            await asyncio.sleep(self.up_delay + self.down_delay)  # the TCP handshake's round trip
            await super()._handle(reader, writer)

    async def serve() -> None:
        import signal

        proxy = await LoopbackIntoLab(("127.0.0.1", 0), (host, int(port)), delay, delay).start()
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(lsock.getsockname()[1]))
        tmp.replace(args.port_file)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await proxy.close()

    asyncio.run(serve())
    return 0


def start_forwarder(netns: str, upstream: str, delay_ms: float, workdir: Path) -> tuple[Daemon, int]:
    port_file = workdir / "forwarder.port"
    port_file.unlink(missing_ok=True)
    daemon = Daemon([sys.executable, str(HERE), "forward", "--netns", netns, "--upstream", upstream,
                     "--delay-ms", str(delay_ms), "--port-file", str(port_file)], workdir / "forwarder.log").start()
    try:
        wait_until(lambda: port_file.exists() or not daemon.alive(), 15, what="loopback forwarder")
    except TimeoutError:
        daemon.stop()
        raise
    if not daemon.alive():
        raise SystemExit(f"loopback forwarder exited:\n{daemon.log_tail()}")
    return daemon, int(port_file.read_text())


# ---------------------------------------------------------------------------------------- scenarios

@dataclass
class Result:
    scenario: str
    run: int
    pull_s: float
    run_s: float
    bytes: int
    requests: int
    detail: dict = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.pull_s + self.run_s


class Bench:
    """One lab (registry behind the shaped link) and the loopback address that leads to it."""

    def __init__(self, registry, host: str, image: PreparedImage, workdir: Path, rtt_s: float, rate_bps: int,
                 puller: str = "remora", keep_logs: Path | None = None):
        self.registry, self.host, self.image, self.workdir = registry, host, image, workdir
        self.puller, self.keep_logs = puller, keep_logs
        self.rtt_s, self.rate_bps = rtt_s, rate_bps

    def _keep(self, d: Path, name: str) -> None:
        """Copy a run's logs (containerd, snapshotter, lazy mounts) out before its directory goes."""
        if self.keep_logs:  # named paths only: a glob would walk into the mounted image's /var/log
            for f in [d / "snap.log", d / "ctd" / "containerd.log", *d.glob("snap/lazy/mounts/*.log")]:
                if not f.is_file():
                    continue
                dest = self.keep_logs / name / f.relative_to(d)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)

    def ref(self, tag: str) -> str:
        return f"{self.host}/{self.image.repo}:{tag}"

    def _served_since(self, mark: int) -> tuple[int, int, list]:
        time.sleep(0.2)  # the registry writes a log line when the response is complete
        rows = self.registry.blob_gets()[mark:]
        ok = [r for r in rows if r[1] in ("200", "206")]
        return sum(r[2] for r in ok), len(rows), rows

    def overlayfs(self, i: int) -> Result:
        from remora.testenv.containerd import PrivateContainerd

        d = Path(tempfile.mkdtemp(prefix=f"ovl{i}-", dir=self.workdir))
        ref = self.ref(self.image.oci_tag)
        mark = len(self.registry.blob_gets())
        try:
            with PrivateContainerd(d / "ctd", None, namespace=f"rbench-{os.getpid()}-ovl{i}") as ctd:
                _quiet()
                t0 = time.monotonic()
                ctd.ctr("images", "pull", "--plain-http", ref, timeout=900)
                t1 = time.monotonic()
                t2, out = _run_to_output(ctd, ["--rm", ref, f"ovl{i}"])
                _expect_marker(out, "overlayfs")
                rerun = _timed_run(ctd, [ref, f"ovl{i}b"])
        finally:
            self._keep(d, f"overlayfs-{i}")
            _remove(d)
        nbytes, nreq, _ = self._served_since(mark)
        return Result("overlayfs", i, t1 - t0, t2 - t1, nbytes, nreq, {"rerun_s": rerun})

    def remora(self, i: int) -> Result:
        from remora.snapshotter.mount import MountManager
        from remora.testenv.containerd import PrivateContainerd, RemoraSnapshotter

        d = Path(tempfile.mkdtemp(prefix=f"rem{i}-", dir=self.workdir))
        ref = self.ref(self.image.remora_tag)
        mark = len(self.registry.blob_gets())
        snap = RemoraSnapshotter(d / "snap", log_level="info",
                                 argv=[sys.executable, "-m", "remora.snapshotter.cli", "--plain-http"])
        try:
            with snap, PrivateContainerd(d / "ctd", snap.address, namespace=f"rbench-{os.getpid()}-rem{i}") as ctd:
                _quiet()
                t0 = time.monotonic()
                inproc = _pull_lazy(ctd, ref, self.puller, snap.api_address)
                t1 = time.monotonic()
                t2, out = _run_to_output(ctd, ["--rm", "--snapshotter", "remora", ref, f"rem{i}"])
                _expect_marker(out, "remora")
                rerun = _timed_run(ctd, ["--snapshotter", "remora", ref, f"rem{i}b"])
            detail = {"rerun_s": rerun, **_mount_stats(d / "snap" / "lazy")}
            if inproc is not None:
                detail["pull_inproc_s"] = inproc
        finally:
            self._keep(d, f"remora-{i}")
            MountManager(d / "snap" / "lazy", d / "snap" / "cache").unmount_all()
            _remove(d)
        nbytes, nreq, rows = self._served_since(mark)
        detail["gets"] = ", ".join(f"{status}:{size}" for _, status, size in rows)
        if any(r[2] >= self.image.oci_bytes // 4 for r in rows):
            detail["warning"] = "a whole layer was downloaded: the lazy path fell back to a normal pull"
        return Result("remora", i, t1 - t0, t2 - t1, nbytes, nreq, detail)

    def link_check(self) -> tuple[float, float]:
        """(Mbit/s, ms) actually seen through the forwarder: a whole-layer GET and a small request's RTT."""
        import requests

        with requests.Session() as http:
            base = f"http://{self.host}/v2/{self.image.repo}"
            manifest = http.get(f"{base}/manifests/{self.image.oci_tag}", timeout=30,
                                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
            layer = max(manifest["layers"], key=lambda layer: layer["size"])
            rtts = []
            for _ in range(5):  # keep-alive connection: each one is a request/response round trip
                t0 = time.monotonic()
                http.get(f"http://{self.host}/v2/", timeout=30)
                rtts.append(time.monotonic() - t0)
            t0 = time.monotonic()
            n = 0
            with http.get(f"{base}/blobs/{layer['digest']}", stream=True, timeout=60) as r:
                for chunk in r.iter_content(1 << 20):
                    n += len(chunk)
            secs = time.monotonic() - t0
        return n * 8 / secs / 1e6, statistics.median(rtts) * 1000

    def bound_s(self, nbytes: int) -> float:
        return nbytes * 8 / self.rate_bps + self.rtt_s


def _pull_lazy(ctd, ref: str, puller: str, api: Path | None = None) -> float | None:
    """Pull so that every layer's Prepare carries the remote-snapshot labels (no layer download).

    ``remora``: ``remora pull --api API``, the thin client: the snapshotter's pull service (already
    warm) does the pull, the CLI only relays; ``remora-local``: ``remora pull --local``, the pull in the
    CLI's own process (which first loads gRPC, protobuf and the registry client); ``rpull``: stargz's
    ``ctr-remote images rpull``, which forwards the layer annotations too (a second client, for comparison).
    Returns the pull's own time as ``remora pull`` reports it (wall time minus the CLI's start-up).
    """
    if puller in ("remora", "remora-local"):
        mode = ["--local"] if puller == "remora-local" else ["--api", str(api)]
        argv = [*_remora_command(), "pull", "--address", str(ctd.address), "--namespace", ctd.namespace, *mode, ref]
    else:
        argv = ["ctr-remote", "-a", str(ctd.address), "-n", ctd.namespace, "images", "rpull", "--plain-http",
                "--snapshotter", "remora", ref]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed:\n{proc.stderr[-2000:]}\n--- containerd ---\n{ctd.log_tail()}")
    if puller == "remora" and "by the snapshotter's pull service" not in proc.stderr:
        raise RuntimeError(f"remora pull did not go through the pull service at {api}:\n{proc.stderr[-2000:]}")
    m = re.search(r"pulled in ([0-9.]+)s", proc.stderr)
    return float(m.group(1)) if m else None


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _quiet(threshold: float = 0.25, window: float = 0.2, limit: float = 10.0) -> float:
    """Wait until the machine is idle: the daemons just started (containerd, the snapshotter and its
    warm spare fs process importing) have settled, as on a node that has been up for a while. Returns
    the busy fraction of the last window (the clock starts after this either way)."""
    deadline = time.monotonic() + limit
    busy0, total0 = _cpu_times()
    while True:
        time.sleep(window)
        busy1, total1 = _cpu_times()
        frac = (busy1 - busy0) / max(1, total1 - total0)
        if frac < threshold or time.monotonic() > deadline:
            return frac
        busy0, total0 = busy1, total1


def _run_to_output(ctd, args: list[str]) -> tuple[float, str]:
    """``ctr run ARGS WORKLOAD``: (monotonic time the workload's output line arrived, all output).

    The clock stops at the output, as the issue defines cold start; what ``ctr run --rm`` does after
    the workload printed (waiting for the task to exit, deleting container and snapshot) is not in it.
    """
    argv = [ctd.ctr_bin, "--address", str(ctd.address), "-n", ctd.namespace, "run", *args, *WORKLOAD]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        first = proc.stdout.readline()
        t_output = time.monotonic()
        try:
            rest, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"ctr run did not finish: {first!r}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"ctr run failed ({proc.returncode}): {err[-2000:]}\n--- containerd ---\n{ctd.log_tail()}")
    return t_output, first + rest


def _compile_remora() -> None:
    """Bytecode for remora's modules, as a pip install leaves it: with PYTHONDONTWRITEBYTECODE set
    (or a read-only checkout) every daemon and CLI started here would compile the sources again."""
    import compileall

    import remora

    root = Path(remora.__file__).resolve().parent.parent
    for package in ("remora", "converter", "snapshotter", "plugins"):
        compileall.compile_dir(root / package, quiet=1)


def _remora_command() -> list[str]:
    """The ``remora`` console script of this interpreter (not a version manager's shim in front of
    it, which would add its own start-up to every pull), else whatever ``remora`` is on PATH."""
    script = Path(sys.executable).parent / "remora"
    return [str(script)] if script.exists() else ["remora"]


def _timed_run(ctd, args: list[str]) -> float:
    """A second ``ctr run`` of the workload, everything local by now: the runtime's fixed cost."""
    t0 = time.monotonic()
    out = ctd.ctr("run", "--rm", *args, *WORKLOAD, timeout=300).stdout
    _expect_marker(out, "warm re-run")
    return time.monotonic() - t0


def _mount_stats(state_dir: Path) -> dict:
    """Counters the lazy mount processes publish (requests, bytes, prefetch progress), summed."""
    total: dict = {}
    for f in state_dir.glob("mounts/*.stats.json"):
        try:
            stats = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for k, v in (stats.get("fetch", stats) if isinstance(stats, dict) else {}).items():
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
    return total


def _expect_marker(out: str, who: str) -> None:
    if MARKER not in out:
        raise RuntimeError(f"{who}: the workload did not print {MARKER!r}; output: {out[-500:]!r}")


def _remove(d: Path) -> None:
    from remora.snapshotter.storage import detach_mount, mountpoints_under

    for mp in mountpoints_under(d):
        try:
            detach_mount(mp)
        except Exception as exc:  # keep cleaning; report what stays
            print(f"warning: {exc}", file=sys.stderr)
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------- report

def summarize(results: list[Result], bench: Bench) -> dict:
    def med(scn: str, attr: str) -> float:
        vals = [getattr(r, attr) for r in results if r.scenario == scn]
        return statistics.median(vals) if vals else float("nan")

    ovl_total = med("overlayfs", "total_s")
    summary = {}
    for scn in ("overlayfs", "remora"):
        if not any(r.scenario == scn for r in results):
            continue
        total = med(scn, "total_s")
        nbytes = int(med(scn, "bytes"))
        summary[scn] = {"pull_s": med(scn, "pull_s"), "run_s": med(scn, "run_s"), "total_s": total,
                        "bytes": nbytes, "requests": med(scn, "requests"),
                        "speedup": ovl_total / total, "bound_s": bench.bound_s(nbytes),
                        "rerun_s": statistics.median(r.detail.get("rerun_s", float("nan"))
                                                     for r in results if r.scenario == scn),
                        "vs_bound": total / bench.bound_s(nbytes)}
    return summary


def _ratio(x: float) -> str:
    return "n/a" if x != x else f"{x:.1f}x"  # NaN when overlayfs was not run


def print_table(results: list[Result], summary: dict, bench: Bench, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("scenario", "run", "pull s", "run s", "total s", "MB fetched", "blob GETs", "speedup",
                "bound s", "total/bound", "warm re-run s"):
        t.add_column(col, justify="left" if col == "scenario" else "right")
    ovl = summary.get("overlayfs", {}).get("total_s", float("nan"))
    for r in results:
        b = bench.bound_s(r.bytes)
        t.add_row(r.scenario, str(r.run), f"{r.pull_s:.2f}", f"{r.run_s:.2f}", f"{r.total_s:.2f}",
                  f"{r.bytes / 1e6:.1f}", str(r.requests), _ratio(ovl / r.total_s), f"{b:.2f}", f"{r.total_s / b:.2f}",
                  f"{r.detail.get('rerun_s', float('nan')):.2f}")
    t.add_section()
    for scn, s in summary.items():
        t.add_row(f"[bold]{scn} (median)", "", f"{s['pull_s']:.2f}", f"{s['run_s']:.2f}", f"{s['total_s']:.2f}",
                  f"{s['bytes'] / 1e6:.1f}", f"{s['requests']:.0f}", _ratio(s['speedup']), f"{s['bound_s']:.2f}",
                  f"{s['vs_bound']:.2f}", f"{s['rerun_s']:.2f}")
    Console(width=max(Console().width, 130)).print(t)
    if "remora" in summary:
        s = summary["remora"]
        print(f"targets: remora total {s['total_s']:.2f}s (goal <= 1.3s), speedup {_ratio(s['speedup'])} (goal >= 6x), "
              f"total/bound {s['vs_bound']:.2f} (goal <= 1.6)")
    for r in results:
        if r.detail.get("warning"):
            print(f"WARNING {r.scenario} run {r.run}: {r.detail['warning']}")


# --------------------------------------------------------------------------------------------- main

def open_lab(image: PreparedImage, workdir: Path, rate: str, delay_ms: float, puller: str = "remora",
             keep_logs: Path | None = None):
    """Context manager: (Bench, teardown-safe) with the registry in the lab behind tbf + delay."""
    import contextlib

    from remora.netlab import Lab
    from remora.netlab.services import NsRegistry
    from remora.netlab.shaping import parse_rate

    @contextlib.contextmanager
    def cm():
        with Lab(workdir=workdir / "lab") as lab:
            reg_node = lab.add_node("registry", up=rate, down=rate)
            client = lab.add_node("client", up=rate, down=rate)
            registry = NsRegistry(reg_node, image.registry_root).start()
            fwd, port = start_forwarder(client.ns, registry.host, delay_ms, workdir)
            try:
                yield Bench(registry, f"127.0.0.1:{port}", image, workdir, 2 * delay_ms / 1000, parse_rate(rate),
                            puller, keep_logs)
            finally:
                fwd.stop()
                registry.stop()
    return cm()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["forward"]:
        return forward_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="see the module docstring for the method",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="cold starts per scenario (default %(default)s)")
    ap.add_argument("--rate", default="100mbit", help="registry link rate, tc syntax (default %(default)s)")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default %(default)s)")
    ap.add_argument("--scenarios", default="overlayfs,remora", help="comma list (default %(default)s)")
    ap.add_argument("--puller", choices=["remora", "remora-local", "rpull"], default="remora",
                    help="lazy pull client: 'remora pull' through the snapshotter's pull service, 'remora pull "
                         "--local' (pull in the CLI process), or stargz's 'ctr-remote images rpull' (default %(default)s)")
    ap.add_argument("--cache", type=Path, default=Path("/var/cache/remora-test"))
    ap.add_argument("--rebuild", action="store_true", help="rebuild, re-trace and re-convert the image")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--keep-logs", type=Path, metavar="DIR",
                    help="copy each run's logs (containerd, snapshotter, lazy mounts) into DIR")
    args = ap.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    if os.geteuid() != 0:
        raise SystemExit("run as root (network namespaces, containerd, FUSE)")
    _compile_remora()
    image = prepare_image(args.cache, "cold-start", cold_start_app(), WORKLOAD, rebuild=args.rebuild)
    print(f"image: OCI {image.oci_bytes / 1e6:.1f} MB compressed, remora {image.remora_bytes / 1e6:.1f} MB, "
          f"{image.prefetch_files} prefetch files")
    workdir = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    results: list[Result] = []
    errors: list[str] = []
    try:
        with open_lab(image, workdir, args.rate, args.delay_ms, args.puller, args.keep_logs) as bench:
            mbit, rtt_ms = bench.link_check()
            print(f"link as measured through the forwarder: {mbit:.1f} Mbit/s, request round trip {rtt_ms:.1f} ms")
            for i in range(args.runs):
                order = scenarios if i % 2 == 0 else scenarios[::-1]  # alternate: drift hits both alike
                for scn in order:
                    try:
                        r = getattr(bench, scn)(i)
                    except Exception as exc:  # report the other scenario anyway
                        errors.append(f"{scn} run {i}: {exc}")
                        print(f"ERROR {scn} run {i}: {exc}", file=sys.stderr)
                        continue
                    results.append(r)
                    keys = ("rerun_s", "pull_inproc_s", "requests", "bytes_fetched", "prefetch_files_done", "gets", "warning")
                    extra = " ".join(f"{k}={r.detail[k]:.2f}" if isinstance(r.detail[k], float) else f"{k}={r.detail[k]}"
                                     for k in keys if k in r.detail)
                    print(f"{scn} run {i}: pull {r.pull_s:.2f}s run {r.run_s:.2f}s, registry served "
                          f"{r.bytes / 1e6:.1f} MB in {r.requests} blob GETs; {extra}", flush=True)
            summary = summarize(results, bench)
            load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
            print_table(results, summary, bench, f"cold start, registry behind {args.rate} + {args.delay_ms:g} ms "
                                                 f"one way ({args.runs} runs each, cold caches; load avg {load})")
            if args.json:
                print(json.dumps({"results": [asdict(r) | {"total_s": r.total_s} for r in results],
                                  "summary": summary, "errors": errors}, indent=2))
    finally:
        _remove(workdir)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
