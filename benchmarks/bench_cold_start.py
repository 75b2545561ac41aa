#!/usr/bin/env python3
"""Cold start over a slow link, four images x two workloads x two daemon states, three snapshotters.

What is timed is what a user waits for: from the start of the pull to the moment the workload's
marker line arrives on ``ctr run``'s stdout (the ``--rm`` clean-up after it is not counted). Every
cold start begins with empty caches: a fresh containerd root and a fresh snapshotter root.

Images and workloads (:mod:`cold_start_images`): ``minimal`` (Debian minbase, read one file),
``python`` (+ python3, import a few stdlib modules), ``nodejs`` (+ Debian's nodejs, a one-line
script), ``bigblob`` (minbase + a 100 MiB incompressible file, read 4 MiB of it). Each has a
``traced`` workload (the one remora's prefetch list and eStargz's optimisation were recorded from)
and an ``other`` one (a different program in the same image), so no single case decides.

Sides, in the same run, alternating order from run to run so drift hits all alike:

* ``overlayfs``: ``ctr images pull`` with containerd's overlayfs snapshotter, then ``ctr run``;
* ``remora``: ``remora convert --prefetch-list`` image, ``remora pull --api`` (the snapshotter's pull
  service), ``ctr run --snapshotter remora``;
* ``estargz``: ``ctr-remote images optimize --oci`` image (Debian's stargz-snapshotter), pulled with
  ``ctr-remote images rpull`` into a stargz snapshotter built from Debian's library sources
  (``benchmarks/stargz/build.sh``), ``ctr run --snapshotter stargz``.

Daemon states, as separate rows: ``cold`` = containerd and the snapshotter are started and the pull
is issued the moment their sockets answer (an elastic node asked to run a function as soon as it
joined): whatever the daemons still do in the background is inside the clock; how long they took to
answer is reported as ``daemon_ready_s`` (not inside ``total_s``). ``warm`` = the same, but the pull
waits ``--warm-s`` seconds (default 5, the issue's "daemons up 5 s"; 60 for a long-up node) or, with
``--warm-s 0``, until the machine is idle (never, on a busy shared machine: capped at 10 s).

``burst`` rows: one node (daemons just started) asked to start every image's traced workload at
once (``parallel``: the time until the last one printed) and one after another (``serial``: sum).

``update`` rows (``--update-runs``, default ``--runs`` when the python image is benchmarked): v2 of the
python image (its app layer changed: ``cold_start_images.v2_files``) started on a node where v1 was
pulled and run, timed from v2's pull to its output; the bytes are v2's alone. Arms: ``overlayfs``
(pulls the changed layer), ``remora`` (v2 converted by ``remora convert`` with its defaults: its own
data blobs, whose chunks are mostly v1's), ``remora-dict`` (v2 converted with ``--chunk-dict`` v1:
only new chunks in new blobs), ``estargz`` (v2 eStargz-optimized). Alternating order per run.

Bound, per row: ``max(bytes fetched by the output / link rate + 3 round trips, the same container's
run phase on overlayfs with everything local)`` - the second term is a second ``ctr run`` of the same
image and workload on the overlayfs node after its cold start (time to the marker). ``x bound`` is
total / bound. Bytes are counted from the registry's own access log (body bytes of successful blob
GETs): ``MB@out`` is what had been served when the marker arrived, ``MB`` everything until the node
was torn down (lazy snapshotters keep fetching in the background).

The link. The registry runs in a network namespace (:class:`remora_testing.netlab.Lab`, its /24 blackholed in
the root namespace first) behind ``tbf`` at ``--rate`` both ways. containerd, ctr and the snapshotters
stay in the root namespace and reach it only through a loopback forwarder (this script re-run as
``forward``: it binds 127.0.0.1 in the root namespace, then ``setns`` into a client namespace of the
lab, so every connection to the registry is made from inside the lab). The forwarder is
:class:`remora_testing.netlab.delay.DelayProxy`: ``--delay-ms`` one way in each direction, plus one round trip
before relaying a new connection (the TCP handshake). It runs at the SAME priority as everything else:
it used to run at ``nice -10`` to mimic netem's softirq context, but a user-space forwarder at raised
priority takes CPU from the node in proportion to the bytes it relays, so it slowed the side that
pushes the whole image through it (overlayfs, 72+ MB) more than the lazy sides: a priority change
that favours one side. No part of the harness changes priority or scheduling.

Every figure goes to ``--json-out`` (default ``cold_start.json`` in the working directory) beside the
printed table: each run, the medians, the bounds, the timelines, the link check and the load average.

Usage (root; the first run builds, traces, converts and optimizes the images, ~10 min, cached)::

    python benchmarks/bench_cold_start.py [--runs 5] [--images minimal,python,nodejs,bigblob]
        [--sides overlayfs,remora,estargz] [--modes cold,warm] [--rate 100mbit] [--delay-ms 10]
    python benchmarks/bench_cold_start.py --smoke     # CI: minimal image, one run per side, < 2 min

``--stargz-bin`` is the snapshotter binary (default: built by ``benchmarks/stargz/build.sh`` into
``<cache>/stargz/containerd-stargz-grpc`` when missing).
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import ipaddress
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cold_start_images as images

from remora.procutil import Daemon, wait_until
from remora_testing.imagebuild import File, LayerSpec, debian_rootfs, tar_of_files, write_image

HERE = Path(__file__).resolve()
MARKER = images.MARKER
CLONE_NEWNET = 0x40000000
SIDES = ("overlayfs", "remora", "estargz")
SNAPSHOTTER = {"overlayfs": None, "remora": "remora", "estargz": "stargz"}
UPDATE_SIDES = ("overlayfs", "remora", "remora-dict", "estargz")  # remora-dict: v2 converted with --chunk-dict v1

# Legacy single-image helper kept for bench_lazy_read.py (it imports these names).
BUILD_VERSION = "cold-start/4"
REPO = "bench/debian-python"
OCI_TAG, REMORA_TAG = "1", "1-remora"
APP_MAIN = (b"import json, decimal, email.parser, http.client, argparse, logging, pathlib\n"
            b"print('remora-bench: hello', json.dumps({'decimal': str(decimal.Decimal('1.1'))}))\n")
WORKLOAD = ["python3", "/app/main.py"]
IMAGE_CONFIG = {"Cmd": WORKLOAD, "WorkingDir": "/",
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]}


# ------------------------------------------------------------- legacy single image (bench_lazy_read)

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
    from remora_testing.registry import LocalRegistry

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
            _check([*images.remora_command(), "trace", "-o", str(hot), src, "--", *workload], "remora trace")
            log(f"traced {len(hot.read_text().splitlines())} files in {time.monotonic() - t0:.1f}s")
            prefetch = ["--prefetch-list", str(hot)]
        t0 = time.monotonic()
        report = json.loads(_check([*images.remora_command(), "convert", "--json", "--no-progress", *prefetch, src,
                                    dst], "remora convert"))
        log(f"converted in {time.monotonic() - t0:.1f}s")
    info = {"repo": REPO, "oci_tag": OCI_TAG, "remora_tag": REMORA_TAG,
            "prefetch_files": len(hot.read_text().splitlines()) if workload else 0,
            "oci_bytes": sum(layer.size for layer in built.layers),
            "remora_bytes": int(report["output_bytes"])}
    ready.write_text(json.dumps(info))
    return PreparedImage(**info, registry_root=d / "registry")


def _check(argv: list[str], what: str, timeout: float = 900) -> str:
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}{proc.stdout[-2000:]}")
    return proc.stdout


def cold_start_app() -> dict[str, File]:
    return {"app/main.py": File(APP_MAIN)}


# --------------------------------------------------------------------------------- loopback forwarder

def forward_main(argv: list[str]) -> int:
    """``bench_cold_start.py forward``: 127.0.0.1 in the root namespace -> UPSTREAM inside NETNS, delayed."""
    from remora_testing.netlab.delay import DelayProxy

    ap = argparse.ArgumentParser(prog="bench_cold_start.py forward")
    ap.add_argument("--netns", required=True, help="lab namespace the upstream connections are made from")
    ap.add_argument("--upstream", required=True, help="HOST:PORT inside the lab")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    ap.add_argument("--port-file", required=True, help="where the chosen loopback port is written")
    args = ap.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    from remora_testing.netlab import LAB_SUPERNET

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
    # No priority change: see the module docstring (a raised priority here favoured the lazy sides).

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


# ------------------------------------------------------------------------------------------- nodes

class Node:
    """One node: a fresh containerd (+ the side's snapshotter), all under ``d``; started on enter."""

    def __init__(self, side: str, d: Path, stargz_bin: Path | None, tag: str, verbose: bool = False):
        self.side, self.d, self.stargz_bin, self.tag = side, d, stargz_bin, tag
        self.verbose = verbose  # stargz logs its fetch/prefetch metrics at debug level only
        self.snap = None
        self.ctd = None
        self.marks: dict[str, float] = {}  # wall-clock times (time.time()) of the harness's own events
        self.events: list[tuple[float, str, str]] = []  # (wall time, source, text): lines the pull client printed

    def __enter__(self) -> Node:
        from remora_testing.containerd import PrivateContainerd, RemoraSnapshotter

        self.marks["daemons_start"] = time.time()
        t0 = time.monotonic()
        sock = None
        try:
            if self.side == "remora":
                self.snap = RemoraSnapshotter(self.d / "snap", log_level="info",
                                              argv=[sys.executable, "-m", "remora.snapshotter.cli", "--plain-http"])
                self.snap.start()
                sock = self.snap.address
            elif self.side == "estargz":
                sock = self.d / "stargz.sock"
                self.snap = Daemon([str(self.stargz_bin), "--root", str(self.d / "stargz"), "--address", str(sock),
                                    "--log-level", "debug" if self.verbose else "info"], self.d / "stargz.log").start()
                from remora.procutil import unix_socket_answers

                wait_until(lambda: unix_socket_answers(sock) or not self.snap.alive(), 30, what="stargz snapshotter")
                if not self.snap.alive():
                    raise RuntimeError(f"stargz snapshotter exited:\n{self.snap.log_tail()}")
            self.marks["snapshotter_ready"] = time.time()
            self.ctd = PrivateContainerd(self.d / "ctd", sock, snapshotter_name=SNAPSHOTTER[self.side] or "remora",
                                         namespace=f"rbench-{os.getpid()}-{self.tag}").start()
        except BaseException:
            self.__exit__()
            raise
        self.marks["daemons_ready"] = time.time()
        self.ready_s = time.monotonic() - t0
        return self

    def __exit__(self, *exc) -> None:
        if self.ctd:
            self.ctd.close()
        if self.side == "remora" and self.snap:
            from remora.snapshotter.mount import MountManager

            self.snap.close()
            MountManager(self.d / "snap" / "lazy", self.d / "snap" / "cache").unmount_all()
        elif self.snap:
            self.snap.stop()

    def snap_args(self) -> list[str]:
        name = SNAPSHOTTER[self.side]
        return ["--snapshotter", name] if name else []

    def pull(self, ref: str) -> None:
        ctd = self.ctd
        if self.side == "overlayfs":
            ctd.ctr("images", "pull", "--plain-http", ref, timeout=900)
            return
        if self.side == "remora":
            argv = [*images.remora_command(), "pull", "--address", str(ctd.address), "--namespace", ctd.namespace,
                    "--api", str(self.snap.api_address), ref]
        else:
            argv = ["ctr-remote", "-a", str(ctd.address), "-n", ctd.namespace, "images", "rpull", "--plain-http",
                    "--snapshotter", "stargz", ref]
        rc, out, err = self._run_timed(argv, "pull client")
        if rc != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} failed:\n{err[-2000:]}\n--- containerd ---\n{ctd.log_tail()}")
        if self.side == "remora" and "by the snapshotter's pull service" not in err:
            raise RuntimeError(f"remora pull did not go through the pull service:\n{err[-2000:]}")

    def _run_timed(self, argv: list[str], src: str, timeout: float = 900) -> tuple[int, str, str]:
        """Run ``argv``; every line it prints becomes a timeline event (wall time of its arrival)."""
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            texts: dict[str, list[str]] = {"stdout": [], "stderr": []}

            def pump(stream, name: str) -> None:
                for line in stream:
                    self.events.append((time.time(), src, line.strip()[:200]))
                    texts[name].append(line)
            threads = [threading.Thread(target=pump, args=(proc.stdout, "stdout"), daemon=True),
                       threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True)]
            for t in threads:
                t.start()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise RuntimeError(f"{' '.join(argv[:3])} did not finish in {timeout:.0f}s") from None
            for t in threads:
                t.join(10)
        return proc.returncode, "".join(texts["stdout"]), "".join(texts["stderr"])

    def run_to_output(self, ref: str, name: str, workload: list[str], rm: bool = True) -> tuple[float, str]:
        """``ctr run``: (monotonic time the marker line arrived, all output)."""
        ctd = self.ctd
        argv = [ctd.ctr_bin, "--address", str(ctd.address), "-n", ctd.namespace, "run",
                *(["--rm"] if rm else []), *self.snap_args(), ref, name, *workload]
        t_out = None
        lines = []
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                lines.append(line)
                if MARKER in line and t_out is None:
                    t_out = time.monotonic()
                    self.marks.setdefault(f"output:{name}", time.time())
            try:
                _, err = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise RuntimeError(f"ctr run {name} did not finish: {''.join(lines)[-500:]!r}") from None
        out = "".join(lines)
        if proc.returncode != 0 or t_out is None:
            raise RuntimeError(f"{self.side}: ctr run {name} failed ({proc.returncode}) or printed no {MARKER!r}: "
                               f"{out[-500:]!r} {err[-1500:]}\n--- containerd ---\n{ctd.log_tail()}")
        return t_out, out


# ---------------------------------------------------------------------------------------- results

@dataclass
class Result:
    image: str
    workload: str   # traced | other
    mode: str       # cold | warm
    side: str
    run: int
    pull_s: float
    run_s: float
    total_s: float
    daemon_ready_s: float
    bytes: int             # served until the node was torn down
    bytes_at_output: int   # served by the time the marker arrived
    requests: int
    local_run_s: float     # a second ctr run of the same workload on this node (everything local)
    output: str
    detail: dict = field(default_factory=dict)


@dataclass
class BurstResult:
    kind: str       # parallel | serial
    side: str
    run: int
    total_s: float
    per_image_s: dict
    bytes: int


@dataclass
class UpdateResult:
    """v2 of an image started on a node where v1 was pulled and run (clock: v2's pull to its output)."""

    image: str
    side: str       # overlayfs | remora | remora-dict | estargz
    run: int
    pull_s: float
    run_s: float
    total_s: float
    bytes: int             # served for v2 until the node was torn down
    bytes_at_output: int   # served for v2 by the time its marker arrived
    requests: int
    v1_total_s: float      # v1's pull + run on the same node, before (context, not timed for v2)


class Bench:
    """The lab (registry behind the shaped link), the loopback address into it, and the runs."""

    def __init__(self, registry, host: str, workdir: Path, rtt_s: float, rate_bps: int, stargz_bin: Path | None,
                 warm_s: float, keep_logs: Path | None):
        self.registry, self.host, self.workdir = registry, host, workdir
        self.rtt_s, self.rate_bps = rtt_s, rate_bps
        self.stargz_bin, self.warm_s, self.keep_logs = stargz_bin, warm_s, keep_logs
        self.timelines: list[dict] = []

    def ref(self, img: images.PreparedImage, side: str) -> str:
        return f"{self.host}/{img.repo}:{img.tag(side)}"

    def _mark(self) -> int:
        return len(self.registry.blob_gets())

    def _served_since(self, mark: int) -> tuple[int, int]:
        """(body bytes of successful blob GETs, GETs) logged since ``mark``, once the log is stable:
        the registry writes a line when a response is complete."""
        seen = [-1]

        def stable():
            n = len(self.registry.blob_gets())
            same, seen[0] = n == seen[0], n
            return same
        try:
            wait_until(stable, 5, interval=0.15, what="registry access log")
        except TimeoutError:
            pass
        rows = self.registry.blob_gets()[mark:]
        return sum(r[2] for r in rows if r[1] in ("200", "206")), len(rows)

    def _settle(self) -> None:
        if self.warm_s > 0:
            time.sleep(self.warm_s)  # a node up for a while: a deliberate wait, not synchronisation
        else:
            _quiet()

    def cold_start(self, img: images.PreparedImage, workload: str, mode: str, side: str, i: int,
                   timeline: bool = False) -> Result:
        d = Path(tempfile.mkdtemp(prefix=f"{side[:3]}-{img.name}-", dir=self.workdir))
        ref = self.ref(img, side)
        argv = images.RECIPES[img.name].workloads[workload]
        tag = f"{side[:3]}{i}{mode[0]}{workload[0]}"
        try:
            with Node(side, d, self.stargz_bin, tag, verbose=timeline) as node:
                if mode == "warm":
                    self._settle()
                mark = self._mark()
                node.marks["pull_start"] = time.time()
                t0 = time.monotonic()
                node.pull(ref)
                t1 = time.monotonic()
                node.marks["pull_done"] = node.marks["run_start"] = time.time()
                t2, out = node.run_to_output(ref, f"c{tag}", argv)
                at_output = len(self.registry.blob_gets())
                t3 = time.monotonic()
                local_run = node.run_to_output(ref, f"c{tag}b", argv)[0] - t3
                if timeline:
                    self.timelines.append(_timeline(node, d, f"{img.name}/{workload}/{mode}/{side}"))
                self._keep(d, f"{img.name}-{workload}-{mode}-{side}-{i}")
        finally:
            _remove(d)
        nbytes, nreq = self._served_since(mark)
        rows = self.registry.blob_gets()[mark:at_output]
        at_out = sum(r[2] for r in rows if r[1] in ("200", "206"))
        return Result(img.name, workload, mode, side, i, t1 - t0, t2 - t1, t2 - t0, node.ready_s, nbytes, at_out,
                      nreq, local_run, out.strip()[-200:])

    def update(self, u: images.UpdateImage, side: str, i: int, timeline: bool = False) -> UpdateResult:
        """v1 pulled and run on a fresh node, then v2 (one small layer changed) timed from its pull to
        its output; the bytes are v2's alone (registry log from v2's pull on)."""
        node_side = "remora" if side.startswith("remora") else side
        d = Path(tempfile.mkdtemp(prefix=f"upd-{side[:3]}-", dir=self.workdir))
        argv = images.RECIPES[u.v1.name].workloads["traced"]
        ref1 = f"{self.host}/{u.v1.repo}:{u.v1.tag(node_side)}"
        ref2 = f"{self.host}/{u.v1.repo}:{u.tag(side)}"
        tag = f"u{side[:3]}{side[-4:]}{i}"
        try:
            with Node(node_side, d, self.stargz_bin, tag, verbose=timeline) as node:
                s = time.monotonic()
                node.pull(ref1)
                node.run_to_output(ref1, f"c{tag}v1", argv)
                v1_total = time.monotonic() - s
                # The timeline and marks are v2's: forget v1's.
                node.events.clear()
                mark = self._mark()
                node.marks = {"daemons_start": time.time(), "pull_start": time.time()}
                t0 = time.monotonic()
                node.pull(ref2)
                t1 = time.monotonic()
                node.marks["pull_done"] = node.marks["run_start"] = time.time()
                t2, out = node.run_to_output(ref2, f"c{tag}v2", argv)
                if "-v2" not in out:
                    raise RuntimeError(f"{side}: v2 did not run v2's program: {out[-300:]!r}")
                at_output = len(self.registry.blob_gets())
                if timeline:
                    self.timelines.append(_timeline(node, d, f"update {u.v1.name} v1 -> v2/{side}"))
                self._keep(d, f"update-{u.v1.name}-{side}-{i}")
        finally:
            _remove(d)
        nbytes, nreq = self._served_since(mark)
        rows = self.registry.blob_gets()[mark:at_output]
        at_out = sum(r[2] for r in rows if r[1] in ("200", "206"))
        return UpdateResult(u.v1.name, side, i, t1 - t0, t2 - t1, t2 - t0, nbytes, at_out, nreq, v1_total)

    def burst(self, imgs: list[images.PreparedImage], side: str, kind: str, i: int) -> BurstResult:
        """Every image's traced workload on one just-started node: all at once, or back to back."""
        d = Path(tempfile.mkdtemp(prefix=f"burst-{side[:3]}-", dir=self.workdir))
        per: dict[str, float] = {}
        errors: list[str] = []
        try:
            with Node(side, d, self.stargz_bin, f"b{side[:3]}{i}{kind[0]}") as node:
                mark = self._mark()
                t0 = time.monotonic()

                def one(img):
                    try:
                        s = time.monotonic()
                        ref = self.ref(img, side)
                        node.pull(ref)
                        t, _ = node.run_to_output(ref, f"b{img.name}{i}", images.RECIPES[img.name].workloads["traced"])
                        per[img.name] = t - (t0 if kind == "parallel" else s)
                    except Exception as exc:  # noqa: BLE001 - raised below with every image's error
                        errors.append(f"{img.name}: {exc}")
                if kind == "parallel":
                    threads = [threading.Thread(target=one, args=(img,)) for img in imgs]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                else:
                    for img in imgs:
                        one(img)
                total = time.monotonic() - t0
        finally:
            _remove(d)
        if errors:
            raise RuntimeError("; ".join(errors))
        nbytes, _ = self._served_since(mark)
        return BurstResult(kind, side, i, total, per, nbytes)

    def _keep(self, d: Path, name: str) -> None:
        if self.keep_logs:  # named paths only: a glob would walk into a mounted image's /var/log
            for f in [d / "snap.log", d / "stargz.log", d / "ctd" / "containerd.log",
                      *d.glob("snap/lazy/mounts/*.log")]:
                if f.is_file():
                    dest = self.keep_logs / name / f.relative_to(d)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, dest)

    def link_check(self, img: images.PreparedImage) -> tuple[float, float]:
        """(Mbit/s, ms) seen through the forwarder: a whole-layer GET and a small request's round trip."""
        import requests

        with requests.Session() as http:
            base = f"http://{self.host}/v2/{img.repo}"
            manifest = http.get(f"{base}/manifests/{images.OCI_TAG}", timeout=30,
                                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
            layer = max(manifest["layers"], key=lambda layer: layer["size"])
            rtts = []
            for _ in range(5):
                t0 = time.monotonic()
                http.get(f"http://{self.host}/v2/", timeout=30)
                rtts.append(time.monotonic() - t0)
            t0 = time.monotonic()
            n = 0
            with http.get(f"{base}/blobs/{layer['digest']}", stream=True, timeout=120) as r:
                for chunk in r.iter_content(1 << 20):
                    n += len(chunk)
            secs = time.monotonic() - t0
        return n * 8 / secs / 1e6, statistics.median(rtts) * 1000

    def transfer_bound_s(self, nbytes: int) -> float:
        return nbytes * 8 / self.rate_bps + 3 * self.rtt_s


# --------------------------------------------------------------------------------------- timeline

_TS_PATTERNS = [
    (re.compile(r'"time":"([0-9T:.\-]+)Z?"'), "iso"),                               # stargz (logrus JSON)
    (re.compile(r'time="([0-9T:.\-]+)Z?"'), "iso"),                                 # containerd (logrus text)
    (re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "), "py"),                # remora (logging)
]
_CTD_KEEP = re.compile(r"starting signal loop|shim disconnected")  # containerd: the runc shim's start and end
_JSON_FIELDS = ("operation", "layer_sha", "digest", "metrics")


def _event_text(src: str, line: str) -> str:
    """The message of a log line without its timestamp (JSON lines: msg + a few fields)."""
    line = line.strip()
    if line.startswith("{"):
        try:
            rec = json.loads(line)
        except ValueError:
            return line[:200]
        extra = " ".join(f"{k}={str(rec[k])[:24]}" for k in _JSON_FIELDS if rec.get(k))
        return f"{rec.get('msg', '')} {extra}".strip()[:200]
    m = re.search(r'msg="((?:[^"\\]|\\.)*)"(.*)', line)
    if m:
        ids = " ".join(re.findall(r"\b(?:id|pid)=\S+", m.group(2)))
        return f"{m.group(1)} {ids}".strip()[:200]
    return re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "", line)[:200]


def _parse_ts(line: str) -> float | None:
    for rx, kind in _TS_PATTERNS:
        m = rx.search(line)
        if m:
            s = m.group(1)
            try:
                if kind == "py":
                    return datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp()
                return datetime.fromisoformat(s[:26]).replace(tzinfo=UTC).timestamp()
            except ValueError:
                return None
    return None


def _timeline(node: Node, d: Path, label: str, limit: int = 90) -> dict:
    """One cold start's phases, relative to the pull's start, up to the workload's output: the
    harness's own marks (daemons started/ready, pull start/done, ctr run spawned, output), every line
    the pull client printed (stamped as it arrived: its start-up is the gap before the first), every
    timestamped line the snapshotter and its fs processes logged (the pull's registry round trips and
    containerd RPCs with their durations, the access check, the bootstrap's download/validation/fsync,
    Prepare/mount per layer, prefetch, fs process start) and containerd's shim start lines. Each
    event carries ``gap``, the time since the previous one: what the critical path spent there."""
    t0 = node.marks["pull_start"]
    end = min(v for k, v in node.marks.items() if k.startswith("output:")) + 0.005
    events = [{"t": round(v - t0, 4), "src": "harness", "event": k} for k, v in node.marks.items() if v <= end]
    logs = [("snapshotter", d / "snap.log"), ("snapshotter", d / "stargz.log"),
            ("containerd", d / "ctd" / "containerd.log"),
            *[("fs process", p) for p in d.glob("snap/lazy/mounts/*.log")]]
    for src, path in logs:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            ts = _parse_ts(line)
            if ts is None or ts < node.marks["daemons_start"] - 0.01 or ts > end:
                continue
            if src == "containerd" and not _CTD_KEEP.search(line):
                continue
            events.append({"t": round(ts - t0, 4), "src": src, "event": _event_text(src, line)})
    events.extend({"t": round(ts - t0, 4), "src": src, "event": text} for ts, src, text in node.events if ts <= end)
    events.sort(key=lambda e: e["t"])
    if len(events) > limit:  # keep the harness marks, thin the log lines evenly
        logs_only = [e for e in events if e["src"] != "harness"]
        n = limit - (len(events) - len(logs_only))
        keep = {id(logs_only[int(k * len(logs_only) / n)]) for k in range(n)}
        events = [e for e in events if e["src"] == "harness" or id(e) in keep]
    for prev, e in zip([None, *events], events):  # the gap before each event: time spent getting there
        e["gap"] = None if prev is None else round(e["t"] - prev["t"], 4)
    return {"label": label, "events": events}


# ----------------------------------------------------------------------------------------- helpers

def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _quiet(threshold: float = 0.25, window: float = 0.2, limit: float = 10.0) -> float:
    """Wait until the machine is idle (the daemons just started have settled), at most ``limit`` s."""
    deadline = time.monotonic() + limit
    busy0, total0 = _cpu_times()
    while True:
        time.sleep(window)
        busy1, total1 = _cpu_times()
        frac = (busy1 - busy0) / max(1, total1 - total0)
        if frac < threshold or time.monotonic() > deadline:
            return frac
        busy0, total0 = busy1, total1


def _compile_remora() -> None:
    """Bytecode for remora's modules, as a pip install leaves it."""
    import compileall

    import remora

    root = Path(remora.__file__).resolve().parent.parent
    for package in ("remora", "converter", "snapshotter", "plugins"):
        compileall.compile_dir(root / package, quiet=1)


def _remove(d: Path) -> None:
    from remora.snapshotter.storage import detach_mount, mountpoints_under

    for mp in mountpoints_under(d):
        try:
            detach_mount(mp)
        except Exception as exc:  # noqa: BLE001 - keep cleaning; report what stays
            print(f"warning: {exc}", file=sys.stderr)
    shutil.rmtree(d, ignore_errors=True)


def stargz_binary(cache: Path, given: Path | None) -> Path:
    """The stargz snapshotter daemon: ``given``, or built once into the cache by build.sh."""
    if given:
        return given
    out = cache / "stargz" / "containerd-stargz-grpc"
    stamp = hashlib.sha256((HERE.parent / "stargz" / "main.go").read_bytes()).hexdigest()[:12]
    if not out.exists() or (out.parent / "main.go.sha").read_text().strip() != stamp:
        print("building the stargz snapshotter from Debian's sources (benchmarks/stargz/build.sh) ...", flush=True)
        proc = subprocess.run(["sh", str(HERE.parent / "stargz" / "build.sh"), str(out)], check=False,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"benchmarks/stargz/build.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        (out.parent / "main.go.sha").write_text(stamp)
    return out


# ------------------------------------------------------------------------------------------- report

def _med(vals):
    vals = [v for v in vals if not math.isnan(v)]
    return statistics.median(vals) if vals else float("nan")


def summarize(results: list[Result], bursts: list[BurstResult], bench: Bench) -> dict:
    """Medians per (image, workload, mode, side), with the bound and the ratios the issue sets."""
    keys = sorted({(r.image, r.workload, r.mode, r.side) for r in results},
                  key=lambda k: (k[0], k[1], k[2], SIDES.index(k[3])))
    local = {}  # (image, workload) -> median local run phase on overlayfs
    for r in results:
        if r.side == "overlayfs":
            local.setdefault((r.image, r.workload), []).append(r.local_run_s)
    rows = []
    for k in keys:
        rs = [r for r in results if (r.image, r.workload, r.mode, r.side) == k]
        total = _med([r.total_s for r in rs])
        b_out = int(_med([r.bytes_at_output for r in rs]))
        ovl_local = _med(local.get(k[:2], []))
        bound = max(bench.transfer_bound_s(b_out), 0.0 if math.isnan(ovl_local) else ovl_local)
        row = {"image": k[0], "workload": k[1], "mode": k[2], "side": k[3], "runs": len(rs),
               "pull_s": _med([r.pull_s for r in rs]), "run_s": _med([r.run_s for r in rs]), "total_s": total,
               "daemon_ready_s": _med([r.daemon_ready_s for r in rs]), "bytes": int(_med([r.bytes for r in rs])),
               "bytes_at_output": b_out, "requests": _med([r.requests for r in rs]),
               "local_run_s": _med([r.local_run_s for r in rs]), "bound_s": bound,
               "transfer_bound_s": bench.transfer_bound_s(b_out), "overlayfs_local_run_s": ovl_local,
               "vs_bound": total / bound if bound else float("nan")}
        rows.append(row)
    by = {(r["image"], r["workload"], r["mode"], r["side"]): r for r in rows}
    for r in rows:
        for other in ("overlayfs", "estargz"):
            o = by.get((r["image"], r["workload"], r["mode"], other))
            r[f"vs_{other}"] = r["total_s"] / o["total_s"] if o else float("nan")
    burst_rows = []
    for kind in ("parallel", "serial"):
        for side in SIDES:
            bs = [b for b in bursts if b.kind == kind and b.side == side]
            if bs:
                burst_rows.append({"kind": kind, "side": side, "runs": len(bs),
                                   "total_s": _med([b.total_s for b in bs]),
                                   "bytes": int(_med([b.bytes for b in bs])),
                                   "per_image_s": {n: _med([b.per_image_s.get(n, float("nan")) for b in bs])
                                                   for n in bs[0].per_image_s}})
    for b in burst_rows:
        o = [x for x in burst_rows if x["kind"] == b["kind"] and x["side"] == "estargz"]
        b["vs_estargz"] = b["total_s"] / o[0]["total_s"] if o else float("nan")
    return {"rows": rows, "burst": burst_rows}


def summarize_updates(updates: list[UpdateResult], bench: Bench) -> list[dict]:
    """Medians per (image, side) of the update scenario, with the ratio to overlayfs the issue sets."""
    rows = []
    for key in sorted({(u.image, u.side) for u in updates}, key=lambda k: (k[0], UPDATE_SIDES.index(k[1]))):
        us = [u for u in updates if (u.image, u.side) == key]
        b_out = int(_med([u.bytes_at_output for u in us]))
        rows.append({"image": key[0], "side": key[1], "runs": len(us), "pull_s": _med([u.pull_s for u in us]),
                     "run_s": _med([u.run_s for u in us]), "total_s": _med([u.total_s for u in us]),
                     "total_s_all": sorted(u.total_s for u in us), "bytes": int(_med([u.bytes for u in us])),
                     "bytes_at_output": b_out, "requests": _med([u.requests for u in us]),
                     "transfer_bound_s": bench.transfer_bound_s(b_out)})
    by_run = {(u.image, u.side, u.run): u.total_s for u in updates}
    for r in rows:
        for other in ("overlayfs", "estargz"):
            o = [x for x in rows if x["image"] == r["image"] and x["side"] == other]
            r[f"vs_{other}"] = r["total_s"] / o[0]["total_s"] if o else float("nan")
            # run by run (the two sides of one run ran back to back): robust to a load spike that hits
            # one run of every side, which the ratio of medians is not
            pairs = [t / by_run[(r["image"], other, run)] for (img, side, run), t in by_run.items()
                     if img == r["image"] and side == r["side"] and (img, other, run) in by_run]
            r[f"vs_{other}_paired"] = _med(pairs) if pairs else float("nan")
    return rows


def _f(x: float, fmt: str = "{:.2f}") -> str:
    return "-" if math.isnan(x) else fmt.format(x)


def print_report(summary: dict, timelines: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))
    t = Table(title=title)
    for col in ("image", "workload", "daemon", "side", "n", "pull s", "run s", "total s", "ready s", "MB@out", "MB",
                "bound s", "x bound", "x estargz", "x overlayfs", "local run s"):
        t.add_column(col, justify="left" if col in ("image", "workload", "daemon", "side") else "right")
    last = None
    for r in summary["rows"]:
        if last and last != (r["image"], r["workload"], r["mode"]):
            t.add_section() if last[0] != r["image"] else None
        last = (r["image"], r["workload"], r["mode"])
        t.add_row(r["image"], r["workload"], r["mode"], r["side"], str(r["runs"]), _f(r["pull_s"]), _f(r["run_s"]),
                  _f(r["total_s"]), _f(r["daemon_ready_s"]), _f(r["bytes_at_output"] / 1e6, "{:.1f}"),
                  _f(r["bytes"] / 1e6, "{:.1f}"), _f(r["bound_s"]), _f(r["vs_bound"]), _f(r["vs_estargz"]),
                  _f(r["vs_overlayfs"]), _f(r["local_run_s"]))
    console.print(t)
    if summary["burst"]:
        b = Table(title="burst: every image's traced workload on one just-started node")
        for col in ("kind", "side", "n", "total s", "MB", "x estargz", "per image s (median)"):
            b.add_column(col)
        for r in summary["burst"]:
            b.add_row(r["kind"], r["side"], str(r["runs"]), _f(r["total_s"]), _f(r["bytes"] / 1e6, "{:.1f}"),
                      _f(r["vs_estargz"]), " ".join(f"{k}={_f(v)}" for k, v in r["per_image_s"].items()))
        console.print(b)
    if summary.get("update"):
        u = Table(title="update: v2 (one small layer changed) started on a node where v1 was pulled and run")
        for col in ("image", "side", "n", "pull s", "run s", "total s", "MB@out", "MB", "requests",
                    "transfer bound s", "x overlayfs", "x overlayfs paired", "x estargz", "totals (sorted)"):
            u.add_column(col, justify="left" if col in ("image", "side") else "right")
        for r in summary["update"]:
            u.add_row(r["image"], r["side"], str(r["runs"]), _f(r["pull_s"]), _f(r["run_s"]), _f(r["total_s"]),
                      _f(r["bytes_at_output"] / 1e6, "{:.2f}"), _f(r["bytes"] / 1e6, "{:.2f}"),
                      _f(r["requests"], "{:.0f}"), _f(r["transfer_bound_s"]), _f(r["vs_overlayfs"]),
                      _f(r["vs_overlayfs_paired"]), _f(r["vs_estargz"]), " ".join(f"{x:.2f}" for x in r["total_s_all"]))
        console.print(u)
    for tl in timelines:
        print(f"\ntimeline of one cold start ({tl['label']}), seconds from the pull's start (gap: since the "
              "previous event):")
        for e in tl["events"]:
            gap = f"{e['gap']:+7.3f}" if e.get("gap") is not None else " " * 7
            print(f"  {e['t']:+8.3f} {gap}  {e['src']:<11} {e['event']}")


# --------------------------------------------------------------------------------------------- main

def open_lab(host_image: images.PreparedImage, registry_roots: list[Path], workdir: Path, rate: str, delay_ms: float,
             stargz_bin: Path | None, warm_s: float, keep_logs: Path | None):
    """Context manager: a Bench whose registry (in the lab, behind tbf + delay) serves every image.

    The images live in separate registry directories (cached per recipe); the lab registry serves a
    merged directory of hard links (``docker/registry/v2``: blobs and repositories)."""
    import contextlib

    from remora_testing.netlab import Lab
    from remora_testing.netlab.services import NsRegistry
    from remora_testing.netlab.shaping import parse_rate

    merged = workdir / "registry"
    for root in registry_roots:
        _link_tree(root, merged)

    @contextlib.contextmanager
    def cm():
        with Lab(workdir=workdir / "lab") as lab:
            reg_node = lab.add_node("registry", up=rate, down=rate)
            client = lab.add_node("client", up=rate, down=rate)
            registry = NsRegistry(reg_node, merged).start()
            fwd, port = start_forwarder(client.ns, registry.host, delay_ms, workdir)
            try:
                yield Bench(registry, f"127.0.0.1:{port}", workdir, 2 * delay_ms / 1000, parse_rate(rate), stargz_bin,
                            warm_s, keep_logs)
            finally:
                fwd.stop()
                registry.stop()
    return cm()


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` into ``dst`` (same content-addressed blobs merge harmlessly)."""
    for dirpath, _, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            target = dst / rel / name
            if not target.exists():
                try:
                    os.link(Path(dirpath) / name, target)
                except OSError:
                    shutil.copy2(Path(dirpath) / name, target)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["forward"]:
        return forward_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="see the module docstring for the method",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="cold starts per cell, alternating sides (default %(default)s)")
    ap.add_argument("--images", default=",".join(images.RECIPES), help="comma list (default %(default)s)")
    ap.add_argument("--workloads", default="traced,other", help="comma list (default %(default)s)")
    ap.add_argument("--modes", default="cold,warm", help="daemon states, comma list (default %(default)s)")
    ap.add_argument("--other-modes", default="warm",
                    help="daemon states for the 'other' workload (default %(default)s; 'cold,warm' for all)")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma list (default %(default)s)")
    ap.add_argument("--burst-runs", type=int, default=None, help="burst repetitions (default: --runs, 0 = none)")
    ap.add_argument("--update-runs", type=int, default=None,
                    help="update scenario repetitions (v2 after v1 of the python image; default: --runs when "
                         "python is among --images, 0 = none)")
    ap.add_argument("--update-sides", default=",".join(UPDATE_SIDES),
                    help="update arms, comma list (default %(default)s; remora-dict: v2 converted with v1 as chunk "
                         "dictionary)")
    ap.add_argument("--warm-s", type=float, default=5.0,
                    help="warm daemon: seconds between the daemons' readiness and the pull (default %(default)s, as "
                         "the issue's 'daemons up 5 s'; 0 = until the machine is idle, at most 10 s)")
    ap.add_argument("--rate", default=None, help="registry link rate, tc syntax (default 100mbit; --smoke: 1gbit)")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default %(default)s)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("REMORA_TEST_CACHE", "/var/cache/remora-test")))
    ap.add_argument("--stargz-bin", type=Path, help="containerd-stargz-grpc binary (default: build it)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild, re-trace, re-convert and re-optimize the images")
    ap.add_argument("--json-out", type=Path, default=Path("cold_start.json"), help="every figure (default %(default)s)")
    ap.add_argument("--timeline", default="cold,update",
                    help="daemon states whose first cold start per side of the first image is printed as a timeline, "
                         "and 'update' for the first update run per side (default %(default)s)")
    ap.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy each run's daemon logs into DIR")
    ap.add_argument("--smoke", action="store_true",
                    help="CI check of the harness: minimal image, traced workload, cold daemon, one run per side, "
                         "one burst each way with the image alone")
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.workloads, args.modes, args.runs = ",".join(images.SMOKE_RECIPES), "traced", "cold", 1
        args.burst_runs = 1
        args.rate = args.rate or "1gbit"  # the smoke checks the harness, not the link: keep overlayfs short
    args.rate = args.rate or "100mbit"
    names = [n for n in args.images.split(",") if n]
    sides = [s for s in args.sides.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    modes = [m for m in args.modes.split(",") if m]
    other_modes = [m for m in args.other_modes.split(",") if m in modes]
    unknown = set(names) - set(images.RECIPES) | set(sides) - set(SIDES)
    if unknown:
        raise SystemExit(f"unknown image or side: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        raise SystemExit("run as root (network namespaces, containerd, FUSE)")
    load_before = os.getloadavg()
    _compile_remora()
    stargz_bin = stargz_binary(args.cache, args.stargz_bin) if "estargz" in sides else None
    prepared = [images.prepare(args.cache, images.RECIPES[n], estargz="estargz" in sides, rebuild=args.rebuild)
                for n in names]
    for p in prepared:
        print(f"image {p.name}: OCI {p.oci_bytes / 1e6:.1f} MB, remora {p.remora_bytes / 1e6:.1f} MB, "
              f"eStargz-opt {p.esgz_bytes / 1e6:.1f} MB, {p.prefetch_files} prefetch files", flush=True)
    update_runs = (args.runs if "python" in names else 0) if args.update_runs is None else args.update_runs
    update_sides = [s for s in args.update_sides.split(",") if s and (s.split("-")[0] in sides)]
    if set(update_sides) - set(UPDATE_SIDES):
        raise SystemExit(f"unknown update side: {', '.join(sorted(set(update_sides) - set(UPDATE_SIDES)))}")
    upd = None
    if update_runs:
        py = next((p for p in prepared if p.name == "python"), None)
        if py is None:
            raise SystemExit("the update scenario needs the python image in --images")
        upd = images.prepare_update(args.cache, images.RECIPES["python"], py, estargz="estargz" in sides)
        print(f"update python v1 -> v2: changed OCI layers {upd.changed_oci_bytes / 1e6:.3f} MB, remora v2 "
              f"{upd.remora_bytes / 1e6:.1f} MB (default), {upd.remora_dict_bytes / 1e6:.2f} MB (--chunk-dict v1)",
              flush=True)
    cells = [(p, w, m) for p in prepared for w in workloads for m in modes if w == "traced" or m in other_modes]
    workdir = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    results: list[Result] = []
    bursts: list[BurstResult] = []
    errors: list[str] = []
    try:
        with open_lab(prepared[0], [p.registry_root for p in prepared], workdir, args.rate, args.delay_ms, stargz_bin,
                      args.warm_s, args.keep_logs) as bench:
            mbit, rtt_ms = bench.link_check(prepared[0])
            print(f"link as measured through the forwarder: {mbit:.1f} Mbit/s, request round trip {rtt_ms:.1f} ms",
                  flush=True)
            timeline_done = set()
            for i in range(args.runs):
                for img, wl, mode in cells:
                    order = sides if i % 2 == 0 else sides[::-1]  # alternate: drift hits every side alike
                    for side in order:
                        want_tl = (mode in args.timeline.split(",") and img is prepared[0] and wl == "traced"
                                   and (mode, side) not in timeline_done)
                        try:
                            r = bench.cold_start(img, wl, mode, side, i, timeline=want_tl)
                        except Exception as exc:  # noqa: BLE001 - report the other cells anyway
                            errors.append(f"{img.name}/{wl}/{mode}/{side} run {i}: {exc}")
                            print(f"ERROR {errors[-1]}", file=sys.stderr, flush=True)
                            continue
                        if want_tl:
                            timeline_done.add((mode, side))
                        results.append(r)
                        print(f"{r.image}/{r.workload}/{r.mode}/{r.side} run {i}: total {r.total_s:.2f}s (pull "
                              f"{r.pull_s:.2f} run {r.run_s:.2f}), ready {r.daemon_ready_s:.2f}s, "
                              f"{r.bytes_at_output / 1e6:.1f}/{r.bytes / 1e6:.1f} MB, local run {r.local_run_s:.2f}s",
                              flush=True)
            updates: list[UpdateResult] = []
            for i in range(update_runs):
                for side in (update_sides if i % 2 == 0 else update_sides[::-1]):
                    try:
                        u = bench.update(upd, side, i, timeline=i == 0 and "update" in args.timeline.split(","))
                    except Exception as exc:  # noqa: BLE001 - report the other cells anyway
                        errors.append(f"update {side} run {i}: {exc}")
                        print(f"ERROR {errors[-1]}", file=sys.stderr, flush=True)
                        continue
                    updates.append(u)
                    print(f"update python/{side} run {i}: total {u.total_s:.2f}s (pull {u.pull_s:.2f} run "
                          f"{u.run_s:.2f}), {u.bytes_at_output / 1e6:.2f}/{u.bytes / 1e6:.2f} MB, {u.requests} GETs",
                          flush=True)
            burst_runs = args.runs if args.burst_runs is None else args.burst_runs
            for i in range(burst_runs):
                for kind in ("parallel", "serial"):
                    for side in (sides if i % 2 == 0 else sides[::-1]):
                        try:
                            b = bench.burst(prepared, side, kind, i)
                        except Exception as exc:  # noqa: BLE001 - report the other cells anyway
                            errors.append(f"burst {kind}/{side} run {i}: {exc}")
                            print(f"ERROR {errors[-1]}", file=sys.stderr, flush=True)
                            continue
                        bursts.append(b)
                        print(f"burst {kind}/{side} run {i}: {b.total_s:.2f}s {b.bytes / 1e6:.1f} MB", flush=True)
            summary = summarize(results, bursts, bench)
            summary["update"] = summarize_updates(updates, bench)
            load_after = os.getloadavg()
            title = (f"cold start, registry behind {args.rate} + {args.delay_ms:g} ms one way, medians of "
                     f"{args.runs} alternating runs; load avg {load_before[0]:.1f} -> {load_after[0]:.1f}")
            print_report(summary, bench.timelines, title)
            doc = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "link": {"mbit_s": mbit, "rtt_ms": rtt_ms, "rate_bps": bench.rate_bps, "delay_ms": args.delay_ms},
                   "load_avg_before": load_before, "load_avg_after": load_after,
                   "images": [images.describe(p) for p in prepared],
                   "results": [asdict(r) for r in results], "bursts": [asdict(b) for b in bursts],
                   "updates": [asdict(u) for u in updates],
                   "update_image": ({k: v for k, v in vars(upd).items() if k != "v1"} if upd else None),
                   "summary": summary, "timelines": bench.timelines, "errors": errors}
            args.json_out.write_text(json.dumps(doc, indent=1, default=str))
            print(f"\nJSON: {args.json_out}")
            for e in errors:
                print(f"ERROR {e}")
    finally:
        _remove(workdir)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
