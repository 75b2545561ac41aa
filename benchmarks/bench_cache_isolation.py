#!/usr/bin/env python3
"""What cache isolation costs: two containerd namespaces start the same image one after the other.

``remora snapshotter --cache-isolation namespace`` (the default) gives every containerd namespace its
own chunk cache partition, so a chunk fetched for one tenant is never read for another
(docs/snapshotter.md, "Cache isolation"); ``none`` shares one cache by digest. The price of isolation
is paid when a *second* tenant starts an image the node already has: with ``none`` its reads are
cache hits, with ``namespace`` it fetches the chunks again. This measures that price, both modes in
the same run (alternating order from run to run), in two scenarios:

* ``same``: both tenants start the same image. containerd names remote layers by chain ID only, so
  B's Prepare finds A's lazily mounted layer; with isolation it is shared only after B's registry
  served B the first byte of every blob of the image (snapshotter/isolation.py), so the price is
  those round trips, not bytes;
* ``sibling``: B starts another image of the same base (the same rootfs plus a small app layer: a new
  bootstrap, almost every chunk in common), so B gets a mount of its own: with ``none`` its reads
  hit A's chunks in the shared cache, with ``namespace`` it fetches them again (the real price).

Per scenario and mode:

* one node = a fresh ``remora snapshotter`` (with the mode) + a private containerd;
* namespace ``tenant-a`` pulls (``remora pull``) and runs the workload, then its background
  prefetch is waited for (every mount publishes ``prefetch_done``);
* namespace ``tenant-b`` does the same: ``cold start`` = from its pull's start until ``ctr run``
  returned (the workload printed its marker and exited); ``MB@start`` = blob bytes the registry served
  during that, ``MB`` = the same once tenant B's prefetch has finished too.

Bytes come from the registry's own access log (body bytes of blob GETs). The registry is reached
through a loopback :class:`remora_testing.netlab.delay.DelayProxy` (``--delay-ms`` each way and ``--rate``),
so fetching costs what a link costs; everything stays on 127.0.0.1. The image is Debian bookworm
minbase + python3 (~175 MB uncompressed; debootstrapped once and cached), converted with defaults.

Usage (root)::

    python benchmarks/bench_cache_isolation.py [--runs 3] [--rate-mbit 100] [--delay-ms 5]
        [--json-out cache_isolation.json]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path

from remora.procutil import wait_until
from remora.snapshotter.mount import MountManager
from remora.snapshotter.pull import pull
from remora.snapshotter.storage import detach_mount, mountpoints_under
from remora_testing.containerd import PrivateContainerd, RemoraSnapshotter
from remora_testing.imagebuild import LayerSpec, debian_rootfs, write_image
from remora_testing.netlab.delay import DelayProxy
from remora_testing.registry import LocalRegistry

MODES = ("none", "namespace")
SCENARIOS = ("same", "sibling")
TENANTS = ("tenant-a", "tenant-b")
WORKLOAD = ["python3", "-c", "import json, decimal, email.parser, http.client; print('isolation-bench-ok')"]
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LoggingRegistry(LocalRegistry):
    """A LocalRegistry that logs every request (level info): the bytes it served are counted from it."""

    _LINE = re.compile(r'msg="response completed".*http\.request\.method=GET.*'
                       r'http\.request\.uri="/v2/.+?/blobs/sha256:[0-9a-f]{64}".*http\.response\.written=(\d+)')

    def config_text(self) -> str:
        return super().config_text().replace("level: warn", "level: info", 1)

    def mark(self) -> int:
        return (self.root / "registry.log").stat().st_size

    def blob_bytes(self, since: int) -> int:
        with open(self.root / "registry.log", "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return sum(int(m.group(1)) for m in map(self._LINE.search, text.splitlines()) if m)


class Link:
    """The DelayProxy on its own event loop thread: 127.0.0.1:<port> -> the registry."""

    def __init__(self, upstream_port: int, delay_s: float, rate_bytes: float):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.proxy = asyncio.run_coroutine_threadsafe(
            DelayProxy(("127.0.0.1", 0), ("127.0.0.1", upstream_port), delay_s, delay_s, rate_bytes).start(),
            self.loop).result(10)
        self.host = f"127.0.0.1:{self.proxy.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _prefetch_settled(root: Path, timeout: float = 180.0) -> None:
    """Wait until every lazy mount of the node says its background prefetch is done."""
    mm = MountManager(root / "lazy", root / "cache", read_only=True)
    wait_until(lambda: mm.ids() and all(mm.stats(m).get("fetch", {}).get("prefetch_done") for m in mm.ids()),
               timeout, interval=0.1, what="background prefetch of every mount")


def app_layer() -> bytes:
    """A small layer on top of the base: the sibling image's own bit."""
    body = b"print('sibling app')\n" * 20
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        d = tarfile.TarInfo("app")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        f = tarfile.TarInfo("app/main.py")
        f.size, f.mode = len(body), 0o644
        tar.addfile(f, io.BytesIO(body))
    return buf.getvalue()


def one_node(base: Path, mode: str, refs: tuple[str, str], reg: LoggingRegistry) -> dict:
    """Tenant A starts ``refs[0]``, then tenant B ``refs[1]``, on one fresh node; figures of each start."""
    snap = RemoraSnapshotter(base / "snap", argv=[sys.executable, "-m", "remora.snapshotter.cli",
                                                  "--cache-isolation", mode]).start()
    ctd = None
    out: dict = {"mode": mode, "tenants": {}}
    try:
        ctd = PrivateContainerd(base / "ctd", snap.address).start()
        for ns, ref in zip(TENANTS, refs):
            mark = reg.mark()
            t0 = time.monotonic()
            pull(ref, address=str(ctd.address), namespace=ns)
            run = ctd.ctr("run", "--rm", "--snapshotter", "remora", ref, f"c-{uuid.uuid4().hex[:8]}", *WORKLOAD,
                          namespace=ns, timeout=180)
            elapsed = time.monotonic() - t0
            if "isolation-bench-ok" not in run.stdout:
                raise RuntimeError(f"{ns}: the workload did not print its marker: {run.stdout!r} {run.stderr!r}")
            at_start = reg.blob_bytes(mark)
            _prefetch_settled(snap.root)
            out["tenants"][ns] = {"cold_start_s": round(elapsed, 3), "bytes_at_start": at_start,
                                  "bytes": reg.blob_bytes(mark)}
        from remora.cache import ChunkCache

        info = ChunkCache(snap.root / "cache").info()
        out["cache_bytes"] = info["bytes"]
        out["partitions"] = {p or "(shared)": v["bytes"] for p, v in info["partitions"].items()}
    finally:
        if ctd is not None:
            for ns in TENANTS:
                for cid in ctd.ctr("containers", "ls", "-q", check=False, namespace=ns).stdout.split():
                    ctd.ctr("containers", "delete", cid, check=False, namespace=ns)
            ctd.close()
        snap.close()
        MountManager(snap.root / "lazy", snap.root / "cache").unmount_all()
        for mp in mountpoints_under(base):
            detach_mount(mp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--delay-ms", type=float, default=5.0)
    ap.add_argument("--cache-dir", default="/var/cache/remora-test", help="where the debootstrapped rootfs is cached")
    ap.add_argument("--json-out", default="cache_isolation.json")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-iso-", dir="/tmp"))
    reg = LoggingRegistry(root=work / "registry").start()
    link = None
    try:
        rootfs = LayerSpec(debian_rootfs(args.cache_dir), created_by="debootstrap python3")
        for name, layers in (("python", [rootfs]), ("sibling", [rootfs, LayerSpec(app_layer(), created_by="app")])):
            src = f"{reg.host}/bench-iso/{name}:1"
            write_image(src, None, layers, {"Cmd": ["python3"], "Env": [PATH_ENV]}, compression="none")
            subprocess.run([sys.executable, "-m", "remora.cli", "convert", "--no-progress", src, src + "-remora"],
                           check=True, capture_output=True, timeout=600)
        link = Link(int(reg.host.rsplit(":", 1)[1]), args.delay_ms / 1000, args.rate_mbit * 1e6 / 8)
        first = f"{link.host}/bench-iso/python:1-remora"
        second = {"same": first, "sibling": f"{link.host}/bench-iso/sibling:1-remora"}
        runs = []
        for i in range(args.runs):
            for scenario in SCENARIOS:
                for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                    r = one_node(work / f"run{i}-{scenario}-{mode}", mode, (first, second[scenario]), reg)
                    r.update(run=i, scenario=scenario)
                    runs.append(r)
                    b = r["tenants"]["tenant-b"]
                    print(f"run {i} {scenario:7s} {mode:9s}: tenant-b cold start {b['cold_start_s']:.2f}s, "
                          f"{b['bytes_at_start'] / 1e6:.1f} MB at start, {b['bytes'] / 1e6:.1f} MB settled", flush=True)
    finally:
        if link is not None:
            link.close()
        reg.stop()

    summary = {}
    for scenario, mode in ((sc, m) for sc in SCENARIOS for m in MODES):
        rs = [r for r in runs if r["mode"] == mode and r["scenario"] == scenario]

        def med(f, rs=rs):
            return statistics.median(f(r) for r in rs)

        summary[f"{scenario}/{mode}"] = {
            "a_cold_start_s": med(lambda r: r["tenants"]["tenant-a"]["cold_start_s"]),
            "a_bytes": med(lambda r: r["tenants"]["tenant-a"]["bytes"]),
            "b_cold_start_s": med(lambda r: r["tenants"]["tenant-b"]["cold_start_s"]),
            "b_bytes_at_start": med(lambda r: r["tenants"]["tenant-b"]["bytes_at_start"]),
            "b_bytes": med(lambda r: r["tenants"]["tenant-b"]["bytes"]),
            "cache_bytes": med(lambda r: r["cache_bytes"]),
        }
    print(f"\nsecond tenant starting the same image (median of {args.runs} runs; link {args.rate_mbit:g} Mbit/s, "
          f"{args.delay_ms:g} ms each way)")
    print(f"{'scenario/isolation':18s} {'A start s':>9s} {'A MB':>7s} {'B start s':>9s} {'B MB@start':>10s} "
          f"{'B MB':>7s} {'cache MB':>9s}")
    for mode, s in summary.items():
        print(f"{mode:18s} {s['a_cold_start_s']:9.2f} {s['a_bytes'] / 1e6:7.1f} {s['b_cold_start_s']:9.2f} "
              f"{s['b_bytes_at_start'] / 1e6:10.1f} {s['b_bytes'] / 1e6:7.1f} {s['cache_bytes'] / 1e6:9.1f}")
    result = {"args": vars(args), "summary": summary, "runs": runs}
    Path(args.json_out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
