#!/usr/bin/env python3
"""Hot sequential read through remora's lazy mount vs a native read of the same unpacked tree.

The image is the cold-start benchmark's Debian + python3 with an app layer that adds a 64 MiB file.
It is pulled lazily the real way (``remora pull`` into a private containerd whose ``remora`` proxy
snapshotter mounts it with FUSE), and the same image is written to local disk with ``remora unpack``:
both sides serve byte-identical trees, which the warm-up checks (sha256 of every file read).

Two read sets, each timed on both sides:

* ``stdlib``: every regular file under ``/usr/lib/python3.11`` (thousands of small files), each
  opened, read to the end and closed, in directory order;
* ``big file``: ``/data/big.bin`` read front to back in 1 MiB reads.

"Hot" means after a warm-up pass that read everything once (so the lazy side has every chunk in its
cache and nothing is fetched while timing). Two hot states are reported:

* ``page cache warm``: what a container sees when it re-reads files (the lazy fs mounts with
  kernel caching, so reads need not reach the FUSE process);
* ``page cache dropped``: ``posix_fadvise(DONTNEED)`` on every file before each pass, so every read
  goes to the FUSE process (and its chunk cache) on the lazy side, to the disk on the native side.

The issue's target is hot sequential read >= 0.5x native. Each cell is the median of ``--repeat``
passes; the ratio is lazy MB/s / native MB/s from the same run.

Usage (root): ``python benchmarks/bench_lazy_read.py [--repeat 5] [--big-mib 64] [--json]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cold_start_images as images
from bench_cold_start import APP_MAIN, _check, _remove, prepare_image

from remora_testing.imagebuild import File

STDLIB = "usr/lib/python3.11"
BIG = "data/big.bin"
READ_SIZE = 1 << 20


def lazy_read_app(big_mib: int) -> dict[str, File]:
    # incompressible content, so the lazy side cannot win by reading less than native
    return {"app/main.py": File(APP_MAIN), BIG: File(random.Random(64).randbytes(big_mib << 20))}


def list_files(root: Path, rel: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root / rel):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out.append(str(p.relative_to(root)))
    return out


def read_all(root: Path, files: list[str], drop: bool = False, digest: bool = False) -> tuple[float, int, dict]:
    """Seconds and bytes to read ``files`` under ``root`` sequentially; optional sha256 per file."""
    sums = {}
    if drop:
        for rel in files:
            fd = os.open(root / rel, os.O_RDONLY)
            try:
                # DONTNEED skips dirty pages: a tree unpacked a moment ago must be written back first,
                # or its "dropped" passes read from memory (seen: 10 GB/s "from disk")
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    total = 0
    t0 = time.perf_counter()
    for rel in files:
        h = hashlib.sha256() if digest else None
        with open(root / rel, "rb", buffering=0) as f:
            while chunk := f.read(READ_SIZE):
                total += len(chunk)
                if h:
                    h.update(chunk)
        if h:
            sums[rel] = h.hexdigest()
    return time.perf_counter() - t0, total, sums


def lazy_mountpoint(snap_root: Path) -> Path:
    from remora.snapshotter.mount import MountManager

    mm = MountManager(snap_root / "lazy", snap_root / "cache")
    ids = mm.ids()
    if len(ids) != 1:
        raise SystemExit(f"expected one lazy mount under {snap_root}, found {ids}")
    return Path(mm.spec(ids[0]).mountpoint)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed passes per cell (default %(default)s)")
    ap.add_argument("--big-mib", type=int, default=64, help="size of the large file (default %(default)s)")
    ap.add_argument("--cache", type=Path, default=Path("/var/cache/remora-test"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (containerd, FUSE)")
    from remora.snapshotter.mount import MountManager
    from remora_testing.containerd import PrivateContainerd, RemoraSnapshotter
    from remora_testing.registry import LocalRegistry

    image = prepare_image(args.cache, f"lazy-read-{args.big_mib}m", lazy_read_app(args.big_mib), None)
    work = Path(tempfile.mkdtemp(prefix="bench-lazyread-"))
    rows = []
    try:
        with LocalRegistry(root=image.registry_root) as reg:
            ref = f"{reg.host}/{image.repo}:{image.remora_tag}"
            native = work / "native"
            t0 = time.monotonic()
            _check([*images.remora_command(), "unpack", ref, str(native)], "remora unpack")
            print(f"unpacked natively in {time.monotonic() - t0:.1f}s")
            snap = RemoraSnapshotter(work / "snap", log_level="warning")
            try:
                with snap, PrivateContainerd(work / "ctd", snap.address) as ctd:
                    _check([*images.remora_command(), "pull", "-q", "--address", str(ctd.address), "--namespace",
                            ctd.namespace, ref], "remora pull")
                    lazy = lazy_mountpoint(work / "snap")
                    sets = {"stdlib": list_files(native, STDLIB), "big file": [BIG]}
                    for name, files in sets.items():
                        # warm-up: fetch everything, and prove both trees hold the same bytes
                        t0 = time.monotonic()
                        _, nbytes, lazy_sums = read_all(lazy, files, digest=True)
                        cold_s = time.monotonic() - t0
                        _, _, native_sums = read_all(native, files, digest=True)
                        if lazy_sums != native_sums:
                            bad = [f for f in files if lazy_sums.get(f) != native_sums.get(f)][:5]
                            raise SystemExit(f"lazy mount and unpacked tree differ: {bad}")
                        print(f"{name}: {len(files)} files, {nbytes / 1e6:.1f} MB; warm-up (cold lazy read from "
                              f"a loopback registry) {cold_s:.2f}s", flush=True)
                        for drop in (False, True):
                            cell = {}
                            for side, root in (("native", native), ("lazy", lazy)):
                                times = [read_all(root, files, drop=drop)[0] for _ in range(args.repeat)]
                                cell[side] = nbytes / statistics.median(times) / 1e6
                            rows.append({"set": name, "files": len(files), "bytes": nbytes,
                                         "state": "page cache dropped" if drop else "page cache warm",
                                         "native_mb_s": cell["native"], "lazy_mb_s": cell["lazy"],
                                         "ratio": cell["lazy"] / cell["native"]})
            finally:
                MountManager(work / "snap" / "lazy", work / "snap" / "cache").unmount_all()
    finally:
        _remove(work)
    print_table(rows, args.repeat)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def print_table(rows: list[dict], repeat: int) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"hot sequential read, lazy mount vs native (median of {repeat} passes)")
    for col in ("read set", "files", "MB", "hot state", "native MB/s", "lazy MB/s", "lazy/native"):
        t.add_column(col, justify="left" if col in ("read set", "hot state") else "right")
    for r in rows:
        t.add_row(r["set"], str(r["files"]), f"{r['bytes'] / 1e6:.1f}", r["state"], f"{r['native_mb_s']:.0f}",
                  f"{r['lazy_mb_s']:.0f}", f"{r['ratio']:.2f}")
    Console(width=max(Console().width, 110)).print(t)
    print("target: hot sequential read >= 0.5x native")


if __name__ == "__main__":
    sys.exit(main())
