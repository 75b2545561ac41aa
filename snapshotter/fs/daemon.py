"""The lazy-mount process: read a MountSpec, mount, serve until unmounted or told to stop.

One process per mount, started in its own session by :class:`remora.snapshotter.mount.MountManager`,
so FUSE traffic never competes with the snapshotter's gRPC threads and a crash takes down one mount,
not the snapshotter. libfuse installs the SIGTERM/SIGINT/SIGHUP handlers: any of them ends the loop
and unmounts cleanly. Before serving, the process pins every chunk of its image in the shared cache
(owner = mount id), so the cache's eviction never takes data this mount may need offline.
"""
from __future__ import annotations

import logging
import os
import sys

from remora.cache import ChunkCache
from remora.format.bootstrap import Bootstrap
from remora.snapshotter.fetch import ChunkFetcher, Prefetcher, Stats
from remora.snapshotter.fs.spec import MountSpec
from remora.snapshotter.metrics import OpLatency, StatsWriter
from remora.snapshotter.sources import open_source

log = logging.getLogger("remora.snapshotter.fs")


def serve(spec: MountSpec) -> int:
    import mfusepy

    from remora.snapshotter.fs.lazyfs import LazyFS

    bootstrap = Bootstrap(spec.bootstrap)
    cache = ChunkCache(spec.cache_dir, spec.cache_limit)
    # streamed straight from the bootstrap's chunk table (docs/format.md), not loaded whole
    cache.pin(spec.id, (d for (d,) in bootstrap.connection().execute("SELECT digest FROM chunks")))
    stats = Stats()
    fetcher = ChunkFetcher(bootstrap, cache, [open_source(s) for s in spec.sources], max_gap=spec.max_gap,
                           max_range=spec.max_range, parallel=spec.parallel, stats=stats)
    latency = OpLatency()
    ops = LazyFS(bootstrap, fetcher, latency)

    def collect() -> dict:
        return {"id": spec.id, "pid": os.getpid(), "fetch": stats.snapshot(), "ops": latency.snapshot(),
                "cache": {"cache_hits": cache.hits, "cache_misses": cache.misses, "cache_corrupt": cache.corrupt}}

    writer = StatsWriter(spec.stats_file, collect, spec.stats_interval).start()
    prefetcher = Prefetcher(fetcher, prefetch_all=spec.prefetch_all).start() if spec.prefetch else None
    t = int(spec.kernel_timeout)
    log.info("mounting %s at %s (pid %d)", spec.bootstrap, spec.mountpoint, os.getpid())
    try:
        mfusepy.FUSE(ops, spec.mountpoint, foreground=True, ro=True, allow_other=True, default_permissions=True,
                     fsname=f"remora:{spec.id}", subtype="remora", use_ino=True, kernel_cache=True,
                     entry_timeout=t, attr_timeout=t, negative_timeout=t)
    finally:
        if prefetcher:
            prefetcher.stop()
        writer.stop()
        cache.flush()
        fetcher.close()
    log.info("unmounted %s", spec.mountpoint)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m remora.snapshotter.fs",
                                     description="Serve one remora lazy mount (started by the snapshotter).")
    parser.add_argument("--spec", required=True, help="mount spec JSON written by the snapshotter")
    args = parser.parse_args(argv)
    return run_spec(args.spec)


def run_spec(path: str) -> int:
    from remora.errors import RemoraError

    try:
        spec = MountSpec.load(path)
    except RemoraError as exc:
        print(f"remora fs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    logging.basicConfig(level=getattr(logging, spec.log_level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s fs[{spec.id}] %(name)s: %(message)s", stream=sys.stderr)
    try:
        return serve(spec)
    except RemoraError as exc:
        log.error("%s", exc)
        return exc.exit_code
