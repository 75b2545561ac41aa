"""What lazy fetching and range merging buy, measured against a real registry on loopback.

A proxy in front of the registry adds ``--rtt`` ms to every request (loopback has no latency; real
registries are 5-50 ms away). Baselines are measured in the same run:

* ``first file``: read one small file through the fetcher (one frame) vs download every data blob
  of the image (what a non-lazy pull must do before the container can start);
* ``whole image``: fetch every chunk with range merging (default gap/size thresholds) vs with merging
  disabled (one request per frame).

Run: ``python benchmarks/bench_lazy_fetch.py [--files 2000] [--rtt 10] [--big-mib 64]``. Measured here
(2 shared cores under load, loopback + 10 ms per request, 2000 small files and a 64 MiB file that
dedups to 16 MiB, 160 frames, 18.6 MB of blobs; two runs):

===============================  ===============  ========  ============
case                             time             requests  bytes
===============================  ===============  ========  ============
first file, lazy                 106 / 41 ms      1         19,713
first file, full blob download   297 / 204 ms     2         18,650,624
whole image, merged ranges       742 / 607 ms     3         18,646,981
whole image, one request/frame   2691 / 3093 ms   160       18,646,981
===============================  ===============  ========  ============

Lazy first read: x2.8 / x5.0 faster and ~950x fewer bytes than downloading the blobs; merging:
x3.6 / x5.1 faster for a whole-image prefetch (53x fewer requests). The gap grows with RTT.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "snapshotter"))

from lazy_support import CountingProxy, build_image

from remora.cache import ChunkCache
from remora.format.bootstrap import Bootstrap
from remora.registry.client import RegistryClient
from remora.snapshotter.fetch import ChunkFetcher
from remora.snapshotter.sources import SourceSpec, open_source
from remora_testing.registry import LocalRegistry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rtt", type=float, default=10.0, help="added latency per request, ms")
    ap.add_argument("--big-mib", type=int, default=64, help="size of the one large file, MiB")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-lazy-"))
    try:
        with LocalRegistry(root=work / "registry") as reg:
            img = build_image(work / "img", reg.host, n_small=args.files, big_size=args.big_mib << 20)
            with CountingProxy(reg.url, delay=args.rtt / 1000) as px:
                bs = Bootstrap(img.bootstrap)
                rows = []

                def fetcher(name, **kw):
                    src = open_source(SourceSpec.registry(px.host, img.repo, retries=0))
                    return ChunkFetcher(bs, ChunkCache(work / name, 1 << 34), [src], **kw)

                px.reset()
                f = fetcher("c1")
                t = time.perf_counter()
                ino = bs.lookup_path(b"/etc/small001.txt").ino
                f.read(ino, 0, 1 << 20)
                rows.append(("first file, lazy", time.perf_counter() - t, len(px.blob_requests()), px.bytes))
                f.wait_stored(range(len(img.table.frames)))

                px.reset()
                client = RegistryClient(px.host)
                t = time.perf_counter()
                for digest in img.blob_paths:
                    with client.open_blob(img.repo, digest) as s:
                        while s.read(1 << 20):
                            pass
                rows.append(("first file, full blob download", time.perf_counter() - t,
                             len(px.blob_requests()), px.bytes))

                extents = [e for path in img.contents for e in
                           bs.read_plan(bs.lookup_path(path).ino, 0, 1 << 40)]
                for name, kw in (("whole image, merged ranges", {}),
                                 ("whole image, one request/frame", {"max_gap": 0, "max_range": 1})):
                    px.reset()
                    f = fetcher(name.replace(" ", "_").replace(",", "").replace("/", "-"), **kw)
                    t = time.perf_counter()
                    f.chunks(extents)
                    rows.append((name, time.perf_counter() - t, len(px.blob_requests()), px.bytes))
                    f.wait_stored({e.chunk.frame for e in extents})  # disk writes must not overlap the next case
        print(f"{args.files} small files + {args.big_mib} MiB file, {len(img.table.frames)} frames, "
              f"{sum(s for _, s in img.table.blobs)} blob bytes, +{args.rtt:.0f} ms per request")
        print(f"{'case':34} {'time':>9} {'requests':>9} {'bytes':>10}")
        for name, secs, n, nbytes in rows:
            print(f"{name:34} {secs * 1e3:7.1f}ms {n:9d} {nbytes:10d}")
        print(f"first file: lazy is x{rows[1][1] / rows[0][1]:.1f} faster; "
              f"merged whole-image fetch is x{rows[3][1] / rows[2][1]:.1f} faster than one request per frame")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
