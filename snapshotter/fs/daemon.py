"""The lazy-mount process: read a MountSpec, mount, serve until unmounted or told to stop.

One process per mount, started in its own session by :class:`remora.snapshotter.mount.MountManager`,
so FUSE traffic never competes with the snapshotter's gRPC threads and a crash takes down one mount,
not the snapshotter. libfuse installs the SIGTERM/SIGINT/SIGHUP handlers: any of them ends the loop
and unmounts cleanly. Before serving, the process pins every chunk of its image in the shared cache
(owner = mount id), so the cache's eviction never takes data this mount may need offline. It opens
only its spec's cache partition (its tenant's: docs/snapshotter.md, "Cache isolation").
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

from remora.cache import ChunkCache
from remora.format.bootstrap import Bootstrap
from remora.snapshotter.fetch import ChunkFetcher, Prefetcher, Stats
from remora.snapshotter.fs.spec import MountSpec
from remora.snapshotter.fs.warm import warm_lookups
from remora.snapshotter.metrics import OpLatency, StatsWriter
from remora.snapshotter.sources import open_source

log = logging.getLogger(__name__)


def serve(spec: MountSpec, prevalidated: dict[str, Prevalidation] | None = None) -> int:
    import mfusepy

    from remora.snapshotter.fs.lazyfs import LazyFS

    t0 = time.monotonic()
    if spec.validate_bootstrap:  # before the file is opened, and so before any byte is served from it
        validate(spec, (prevalidated or {}).get(spec.bootstrap))
    bootstrap = Bootstrap(spec.bootstrap)
    cache = ChunkCache(spec.cache_dir, spec.cache_limit, partition=spec.cache_partition)  # its tenant's only
    stats = Stats()
    fetcher = ChunkFetcher(bootstrap, cache, [open_source(s) for s in spec.sources], max_gap=spec.max_gap,
                           max_range=spec.max_range, parallel=spec.parallel, stats=stats)
    latency = OpLatency()
    ops = LazyFS(bootstrap, fetcher, latency)

    def collect() -> dict:
        return {"id": spec.id, "pid": os.getpid(), "fetch": stats.snapshot(), "ops": latency.snapshot(),
                "cache": {"cache_hits": cache.hits, "cache_misses": cache.misses, "cache_corrupt": cache.corrupt,
                          "partition": spec.cache_partition}}

    writer = StatsWriter(spec.stats_file, collect, spec.stats_interval).start()
    prefetcher = Prefetcher(fetcher, prefetch_all=spec.prefetch_all).start() if spec.prefetch else None
    # Pinning every chunk of the image is one transaction over thousands of rows (~40 ms of CPU): it
    # waits until the prefetch is done (at most PIN_DELAY), off the cold start that needs the CPU. A
    # chunk evicted meanwhile is simply fetched again.
    unmounted = threading.Event()
    pinner = threading.Thread(target=_pin, args=(cache, spec.id, bootstrap, prefetcher, unmounted), name="pin",
                              daemon=True)
    pinner.start()
    if spec.prefetch:  # the prefetch files' paths into the kernel's caches before the container asks
        # (ismount: the manager detached anything stale at the mountpoint before starting us)
        threading.Thread(target=warm_lookups, name="warm-lookups", daemon=True,
                         args=(bootstrap, spec.mountpoint, lambda: os.path.ismount(spec.mountpoint), stats)).start()
    t = int(spec.kernel_timeout)
    log.info("mounting %s at %s (pid %d, ready in %.3fs)", spec.bootstrap, spec.mountpoint, os.getpid(),
             time.monotonic() - t0)
    try:
        mfusepy.FUSE(ops, spec.mountpoint, foreground=True, ro=True, allow_other=True, default_permissions=True,
                     fsname=f"remora:{spec.id}", subtype="remora", use_ino=True, kernel_cache=True,
                     entry_timeout=t, attr_timeout=t, negative_timeout=t)
    finally:
        unmounted.set()  # a pinner still waiting for the prefetch gives up: the mount is gone
        if prefetcher:
            prefetcher.stop()
        pinner.join()
        writer.stop()
        cache.flush()
        fetcher.close()
    log.info("unmounted %s", spec.mountpoint)
    return 0


def _identity(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Prevalidation:
    """A bootstrap validated by this (spare) process as soon as the snapshotter has it, before the
    mount that will use it is asked for: the validation overlaps the pull's remaining Prepares.
    The result counts only for the very same file (device, inode, size, mtime unchanged from
    before the validation to the mount)."""

    def __init__(self, path: str):
        self.path, self.identity, self.error, self.seconds = path, None, None, 0.0
        self._thread = threading.Thread(target=self._run, name="prevalidate", daemon=True)

    def start(self) -> Prevalidation:
        self._thread.start()
        return self

    def _run(self) -> None:
        from remora.format.validate import validate_bootstrap

        t0 = time.monotonic()
        before = _identity(self.path)
        try:
            validate_bootstrap(self.path)
        except Exception as exc:  # noqa: BLE001 - kept and raised by the mount that uses the file
            self.error = exc
        self.seconds = time.monotonic() - t0
        if before is not None and _identity(self.path) == before:
            self.identity = before

    def result_for(self, path: str) -> tuple[bool, BaseException | None]:
        """(usable, error): waits for the validation; usable only if it covered ``path`` as it is now."""
        self._thread.join()
        return self.identity is not None and self.identity == _identity(path), self.error


def validate(spec: MountSpec, pre: Prevalidation | None = None) -> None:
    """Validate the spec's bootstrap (remora.format.validate), or take this process's earlier
    validation of the same file, and write the verdict where the snapshotter waits for it; an
    invalid bootstrap raises :class:`InvalidInput` (the process exits 3 without mounting). The
    verdict file is written atomically: the snapshotter reads it whole."""
    from remora.errors import InvalidInput
    from remora.format.validate import validate_bootstrap

    t0 = time.monotonic()
    usable, error = pre.result_for(spec.bootstrap) if pre is not None else (False, None)
    try:
        if not usable:
            validate_bootstrap(spec.bootstrap)
        elif error is not None:
            raise error
    except InvalidInput as exc:
        _verdict(spec.validation_file, f"invalid: {exc}")
        raise
    _verdict(spec.validation_file, "ok")
    if usable:
        log.info("bootstrap %s validated in %.3fs, before its mount was asked for (waited %.3fs)", spec.bootstrap,
                 pre.seconds, time.monotonic() - t0)
    else:
        log.info("bootstrap %s validated in %.3fs", spec.bootstrap, time.monotonic() - t0)


def _verdict(path: str, text: str) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


PIN_DELAY = 10.0  # seconds a mount's pins may wait for its prefetch


def _pin(cache: ChunkCache, owner: str, bootstrap: Bootstrap, prefetcher: Prefetcher | None,
         unmounted: threading.Event) -> None:
    deadline = time.monotonic() + PIN_DELAY
    while prefetcher is not None and not prefetcher.done.is_set() and time.monotonic() < deadline:
        if unmounted.wait(0.05):
            return
    if unmounted.is_set():
        return
    try:  # streamed straight from the bootstrap's chunk table (docs/format.md), not loaded whole
        with bootstrap.pooled() as db:
            cache.pin(owner, (d for (d,) in db.execute("SELECT digest FROM chunks")))
    except Exception:  # unpinned chunks are only evictable, never wrong
        log.exception("could not pin the image's chunks in the cache")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m remora.snapshotter.fs",
                                     description="Serve one remora lazy mount (started by the snapshotter).")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--spec", help="mount spec JSON written by the snapshotter")
    what.add_argument("--standby", action="store_true",
                      help="import everything, then read the spec's path from stdin (a warm spare: the "
                           "snapshotter hands it the next mount); exit quietly on EOF")
    parser.add_argument("--ready-fd", type=int, default=None,
                        help="with --standby: write one byte to this inherited pipe, and close it, once "
                             "the imports are done (the snapshotter waits for it before it says it is ready)")
    parser.add_argument("--cache-dir", default=None,
                        help="with --standby: the chunk cache the mounts will use; its index is created "
                             "(or opened once) now, not on the first mount")
    args = parser.parse_args(argv)
    if args.standby:
        return standby(args.ready_fd, args.cache_dir)
    return run_spec(args.spec)


def standby(ready_fd: int | None = None, cache_dir: str | None = None) -> int:
    """Wait, fully imported, for the path of a spec on stdin; EOF (the snapshotter went away) ends it.

    Before it says it is ready it also creates the chunk cache's index if there is none yet (a fresh
    node): its schema and first transaction (~50-90 ms with the fsyncs) were on the first mount's path."""
    import mfusepy  # noqa: F401 - the point is to have paid for these imports before a mount is asked for

    import remora.format.validate  # a fetched bootstrap is validated here before its mount
    import remora.registry.client  # what a registry source uses
    import remora.snapshotter.fs.lazyfs  # noqa: F401

    if cache_dir:
        try:  # the shared partition: creating it reads no chunk of anybody's (docs/snapshotter.md)
            ChunkCache(cache_dir).close()
        except Exception as exc:  # noqa: BLE001 - the mount opens the cache itself and reports
            print(f"remora fs standby: chunk cache {cache_dir} not prepared: {exc}", file=sys.stderr)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        except OSError:  # the snapshotter stopped waiting: nothing to tell
            pass
    # "validate PATH" lines (a bootstrap the next mount will likely use: validated at once, in a
    # thread) may come before the spec's path; EOF (the snapshotter went away) ends it.
    prevalidated: dict[str, Prevalidation] = {}
    while True:
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        line = line.strip()
        if line.startswith(VALIDATE_PREFIX):
            path = line[len(VALIDATE_PREFIX):]
            if path not in prevalidated and len(prevalidated) < 16:
                prevalidated[path] = Prevalidation(path).start()
            continue
        return run_spec(line, prevalidated)


VALIDATE_PREFIX = "validate "  # a spec path is absolute: never starts with this


def run_spec(path: str, prevalidated: dict[str, Prevalidation] | None = None) -> int:
    from remora.errors import RemoraError

    try:
        spec = MountSpec.load(path)
    except RemoraError as exc:
        print(f"remora fs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    logging.basicConfig(level=getattr(logging, spec.log_level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s fs[{spec.id}] %(name)s: %(message)s", stream=sys.stderr)
    try:
        return serve(spec, prevalidated)
    except RemoraError as exc:
        log.error("%s", exc)
        return exc.exit_code
