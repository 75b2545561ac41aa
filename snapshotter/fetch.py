"""The chunk fetcher: turn "these chunks of this image" into verified bytes, from cache or network.

A chunk lives inside a zstd *frame* of a data blob; the unit of transfer is the frame (one frame may
hold many small chunks). For a read the fetcher

1. serves chunks from a small in-memory LRU of recent chunks, then from the on-disk
   :class:`~remora.cache.ChunkCache` (verified by digest on read);
2. collects the frames of the missing chunks; frames another thread is already fetching are *waited
   for*, not fetched again (single-flight per frame);
3. groups its own frames by blob, sorts them by offset and merges neighbours into one HTTP range
   request while the gap between them is at most ``max_gap`` and the request at most ``max_range``
   bytes (one round trip instead of many; the gap bytes are the price);
4. runs the requests in a bounded thread pool; each response is cut into frames, every frame is
   decompressed and *every chunk in it* is verified against its sha256 before anything is cached or
   returned. A source that fails or lies is skipped for the next one (mirrors/peers first, then the
   registry); when none delivers, the read fails with :class:`FetchError` (the fs maps it to EIO).
   A source that was unreachable (connection error, timeout, 5xx) is skipped for ``cooldown``
   seconds while a later source remains, so a dead peer costs one timeout, not one per read.

:class:`Prefetcher` runs the same machinery in the background over the bootstrap's prefetch list
(then, optionally, every file), so the files a container needs first are local before it asks.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from remora.cache import ChunkCache
from remora.errors import InvalidInput, NotFound, RegistryError, RemoraError
from remora.format.blob import decompress_frame, verify_chunk
from remora.format.bootstrap import Bootstrap, Extent
from remora.format.chunktable import Frame

log = logging.getLogger(__name__)

DEFAULT_MAX_GAP = 256 << 10
DEFAULT_MAX_RANGE = 16 << 20
DEFAULT_PARALLEL = 4
DEFAULT_MEMORY_CACHE = 64 << 20
DEFAULT_COOLDOWN = 10.0


class FetchError(RegistryError):
    """No source delivered verified bytes for a frame (the read gets EIO)."""


class Stats:
    """Thread-safe counters of one fetcher; ``snapshot()`` is what the mount process publishes."""

    FIELDS = ("requests", "merged_requests", "frames_fetched", "bytes_fetched", "chunks_verified",
              "verify_failures", "source_errors", "fetch_failures", "singleflight_waits",
              "memory_hits", "prefetch_files_done", "prefetch_files_total", "prefetch_bytes",
              "prefetch_done")

    def __init__(self):
        self._lock = threading.Lock()
        self.values = dict.fromkeys(self.FIELDS, 0)

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.values[key] += n

    def set(self, key: str, n: int) -> None:
        with self._lock:
            self.values[key] = n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.values)


@dataclass
class _Job:
    blob: str
    frames: list[tuple[int, Frame]]  # (frame id, frame), sorted by offset
    background: bool = False         # a prefetch's: may wait for a source that has the bytes coming


class ChunkFetcher:
    """Verified chunk bytes of one image (one bootstrap) from a shared cache and a list of sources.

    ``sources`` are objects with ``name`` and ``read_range(blob, start, end_inclusive) -> bytes``
    (see :mod:`remora.snapshotter.sources`), tried in order.
    """

    def __init__(self, bootstrap: Bootstrap, cache: ChunkCache, sources: Sequence, *,
                 max_gap: int = DEFAULT_MAX_GAP, max_range: int = DEFAULT_MAX_RANGE,
                 parallel: int = DEFAULT_PARALLEL, memory_cache: int = DEFAULT_MEMORY_CACHE,
                 cooldown: float = DEFAULT_COOLDOWN, stats: Stats | None = None):
        if not sources:
            raise InvalidInput("a chunk fetcher needs at least one blob source")
        self.bootstrap = bootstrap
        self.cache = cache
        self.sources = list(sources)
        self.max_gap = max_gap
        self.max_range = max_range
        self.cooldown = cooldown
        self._down_until: dict[int, float] = {}  # source index -> monotonic time it may be tried again
        self.stats = stats or Stats()
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="fetch")
        # prefetch has its own workers: it never queues in front of a reader's request. Two, so one
        # request is on the wire while the previous response is decompressed, verified and cached.
        self._bg_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prefetch-io")
        self._lock = threading.Lock()
        self._inflight: dict[int, Future] = {}
        self._stored = threading.Condition(self._lock)  # notified when fetched frames are on disk
        self._mem: OrderedDict[bytes, bytes] = OrderedDict()
        self._mem_bytes = 0
        self._mem_limit = memory_cache
        self._extents: OrderedDict[int, list[tuple[int, int]]] = OrderedDict()

    def extents_of(self, ino: int) -> list[tuple[int, int]]:
        """A file's extent list, memoised (it is read on every FUSE read of that file)."""
        with self._lock:
            ext = self._extents.get(ino)
            if ext is not None:
                self._extents.move_to_end(ino)
                return ext
        with self.bootstrap.pooled() as db:
            ext = self.bootstrap.extents(ino, db)
        with self._lock:
            self._extents[ino] = ext
            if len(self._extents) > 4096:
                self._extents.popitem(last=False)
        return ext

    # -- reads --------------------------------------------------------------------------------
    def read(self, ino: int, offset: int, size: int) -> bytes:
        """Bytes ``offset .. offset+size`` of regular file ``ino`` (short at end of file)."""
        extents = self.extents_of(ino)
        with self.bootstrap.pooled() as db:
            plan = self.bootstrap.read_plan(ino, offset, size, extents, db)
        if not plan:
            return b""
        chunks = self.chunks(plan)
        end = offset + size
        parts = []
        for e in plan:  # memoryview slices: the only copy is the final join
            lo = max(offset - e.file_offset, 0)
            hi = min(end - e.file_offset, e.chunk.size)
            parts.append(memoryview(chunks[e.chunk.digest])[lo:hi])
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def chunks(self, extents: Iterable[Extent]) -> dict[bytes, bytes]:
        """``{chunk digest: verified bytes}`` for every extent, fetching what is missing."""
        extents = list(extents)
        out: dict[bytes, bytes] = {}
        missing: dict[int, Frame] = {}
        blobs: dict[int, str] = {}
        for e in extents:
            d = e.chunk.digest
            if d in out:
                continue
            data = self._mem_get(d)
            if data is None:
                data = self.cache.get(d)
                if data is not None:
                    self._mem_put(d, data)
            if data is not None:
                out[d] = data
            else:
                missing[e.chunk.frame] = e.frame
                blobs[e.chunk.frame] = e.blob
        if missing:
            results = self._fetch_frames(missing, blobs)
            for e in extents:
                if e.chunk.digest not in out:
                    out[e.chunk.digest] = results[e.chunk.frame][e.chunk.digest]
        return out

    def ensure(self, extents: Iterable[Extent], background: bool = True, wait_stored: bool = True) -> int:
        """Make sure the chunks are fetched and verified (prefetch); returns the frames fetched.

        With ``background`` the requests run on the prefetch workers, not the readers' pool. With
        ``wait_stored`` it returns once they are in the disk cache; without, as soon as readers can
        have them (the disk write finishes in the background: see :meth:`wait_stored`).
        """
        missing: dict[int, Frame] = {}
        blobs: dict[int, str] = {}
        for e in extents:
            if e.chunk.frame not in missing and not self.cache.contains(e.chunk.digest):
                missing[e.chunk.frame] = e.frame
                blobs[e.chunk.frame] = e.blob
        if missing:
            self._fetch_frames(missing, blobs, self._bg_pool if background else self._pool)
            if wait_stored:
                self.wait_stored(missing)
        return len(missing)

    def wait_all_stored(self, timeout: float = 60.0) -> bool:
        """Wait until no fetched frame is still waiting for its disk write."""
        with self._stored:
            return self._stored.wait_for(lambda: not any(f.done() for f in self._inflight.values()), timeout)

    def wait_stored(self, frames: Iterable[int], timeout: float = 60.0) -> bool:
        """Wait until fetched ``frames`` are written to the disk cache (readers do not wait for that)."""
        frames = list(frames)
        with self._stored:
            return self._stored.wait_for(lambda: not any(f in self._inflight for f in frames), timeout)

    # -- frames -------------------------------------------------------------------------------
    def _fetch_frames(self, frames: dict[int, Frame], blobs: dict[int, str],
                      pool: ThreadPoolExecutor | None = None) -> dict[int, dict[bytes, bytes]]:
        """Chunks of every frame in ``frames``, fetching (or waiting for) each frame once."""
        waiting: dict[int, Future] = {}
        mine: dict[int, Future] = {}
        with self._lock:
            for fid in frames:
                fut = self._inflight.get(fid)
                if fut is None:
                    fut = self._inflight[fid] = Future()
                    mine[fid] = fut
                else:
                    waiting[fid] = fut
        if waiting:
            self.stats.add("singleflight_waits", len(waiting))
        for job in self._plan({fid: frames[fid] for fid in mine}, blobs):
            job.background = pool is self._bg_pool
            (pool or self._pool).submit(self._run_job, job)
        results = {}
        errors = []
        for fid, fut in {**mine, **waiting}.items():
            try:
                results[fid] = fut.result()
            except RemoraError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return results

    def _plan(self, frames: dict[int, Frame], blobs: dict[int, str]) -> list[_Job]:
        """Group frames by blob and merge neighbours into range requests (gap/size thresholds)."""
        by_blob: dict[str, list[tuple[int, Frame]]] = {}
        for fid, fr in frames.items():
            by_blob.setdefault(blobs[fid], []).append((fid, fr))
        jobs = []
        for blob, items in by_blob.items():
            items.sort(key=lambda it: it[1].offset)
            cur = [items[0]]
            for fid, fr in items[1:]:
                start = cur[0][1].offset
                last = cur[-1][1]
                gap = fr.offset - (last.offset + last.csize)
                if gap <= self.max_gap and fr.offset + fr.csize - start <= self.max_range:
                    cur.append((fid, fr))
                else:
                    jobs.append(_Job(blob, cur))
                    cur = [(fid, fr)]
            jobs.append(_Job(blob, cur))
        return jobs

    def _run_job(self, job: _Job) -> None:
        """Fetch one merged range; resolve the futures of its frames (result or error) no matter what.

        Each frame's future is resolved the moment that frame is verified, while the rest of the range
        is still arriving: a reader (or the container behind it) waiting for the first frames of a
        large prefetch range does not wait for the whole range."""
        pending = list(job.frames)
        results: dict[int, dict[bytes, bytes]] = {}
        failures: list[str] = []

        def deliver(fid: int, chunks: dict[bytes, bytes]) -> None:
            results[fid] = chunks
            for d, b in chunks.items():
                self._mem_put(d, b)
            with self._lock:
                # stays in ``_inflight`` (done) until the chunks are on disk: a reader arriving
                # meanwhile takes them from the future
                self._inflight[fid].set_result(chunks)

        try:
            last = len(self.sources) - 1
            for i, source in enumerate(self.sources):
                if not pending:
                    break
                covers = getattr(source, "covers", None)  # a source for a few blobs only (staged)
                if covers is not None and not covers(job.blob, pending[0][1].offset, patient=job.background):
                    continue
                if i < last and time.monotonic() < self._down_until.get(i, 0.0):
                    failures.append(f"{source.name}: skipped (failed less than {self.cooldown:.0f}s ago)")
                    continue
                pending, unreachable = self._try_source(source, job.blob, pending, deliver, failures)
                if unreachable:
                    self._down_until[i] = time.monotonic() + self.cooldown
        except BaseException as exc:  # a bug must not leave readers waiting forever
            log.exception("fetch of %s failed unexpectedly", job.blob)
            failures.append(f"internal error: {exc!r}")
        missing = [fid for fid, _ in job.frames if fid not in results]
        if missing:
            self.stats.add("fetch_failures", len(missing))
            err = FetchError(f"cannot fetch {len(missing)} frame(s) of {job.blob}: " + "; ".join(failures))
            log.error("%s", err)
            with self._lock:
                for fid in missing:
                    self._inflight.pop(fid).set_exception(err)
        to_cache = [(d, b) for chunks in results.values() for d, b in chunks.items()]
        try:
            if to_cache:
                self.cache.put_many(to_cache, verified=True)  # _verify_frame checked every chunk
        except RemoraError as exc:  # a full/broken cache disk must not fail the read
            log.warning("could not cache %d chunks: %s", len(to_cache), exc)
        finally:
            with self._lock:
                for fid in results:
                    self._inflight.pop(fid, None)
                self._stored.notify_all()

    def _try_source(self, source, blob: str, frames: list[tuple[int, Frame]], deliver,
                    failures: list[str]) -> tuple[list[tuple[int, Frame]], bool]:
        """One range request for ``frames`` (sorted by offset) from ``source``, cut into frames as the
        body streams in; each verified frame goes to ``deliver`` at once.

        Returns the frames still not verified (in offset order), and whether the source looked
        unreachable. Frames delivered before a failure stay delivered: their bytes were verified.
        """
        start = frames[0][1].offset
        end = frames[-1][1].offset + frames[-1][1].csize - 1
        self.stats.add("requests")
        if len(frames) > 1:
            self.stats.add("merged_requests")
        queue = deque(frames)
        bad: list[tuple[int, Frame]] = []
        buf = bytearray()
        base = start       # blob offset of buf[0]
        received = 0

        def sink(piece: bytes) -> None:
            nonlocal base, received
            buf.extend(piece)
            received += len(piece)
            while queue and queue[0][1].offset + queue[0][1].csize <= base + len(buf):
                fid, fr = queue.popleft()
                lo = fr.offset - base
                self._verify_frame(source.name, blob, fid, fr, bytes(buf[lo:lo + fr.csize]), deliver, bad, failures)
                del buf[:lo + fr.csize]
                base = fr.offset + fr.csize

        t0 = time.monotonic()
        try:
            source.read_range(blob, start, end, sink=sink)
        except (NotFound, InvalidInput) as exc:  # the source answered: it is up, just not helpful
            self.stats.add("source_errors")
            log.info("%s", exc)  # the final FetchError (logged as an error) lists every source's failure
            failures.append(str(exc))
            return bad + list(queue), False
        except RemoraError as exc:  # unreachable, timed out, 5xx, auth: worth a cool-down
            self.stats.add("source_errors")
            log.info("%s", exc)
            failures.append(str(exc))
            return bad + list(queue), True
        finally:
            self.stats.add("bytes_fetched", received)
        log.debug("%s: %s bytes %d-%d (%d frames) in %.3fs", source.name, blob[:19], start, end, len(frames),
                  time.monotonic() - t0)
        if queue:  # the source said it was done, short of the range's end
            failures.append(f"{source.name}: {blob} range {start}-{end} ended {len(queue)} frame(s) early")
        return bad + list(queue), False

    def _verify_frame(self, source: str, blob: str, fid: int, fr: Frame, raw: bytes, deliver,
                      bad: list, failures: list[str]) -> None:
        """Decompress one frame and verify every chunk in it; deliver it, or record it as bad."""
        where = f"{source}: {blob} frame@{fr.offset}"
        try:
            plain = decompress_frame(raw, fr.usize, where)
            with self.bootstrap.pooled() as db:
                members = self.bootstrap.frame_chunks(fid, db)
            chunks = {c.digest: verify_chunk(plain[c.frame_offset:c.frame_offset + c.size], c.digest, where)
                      for c in members}
        except InvalidInput as exc:
            self.stats.add("verify_failures")
            log.error("%s", exc)
            failures.append(str(exc))
            bad.append((fid, fr))
            return
        self.stats.add("frames_fetched")
        self.stats.add("chunks_verified", len(chunks))
        deliver(fid, chunks)

    # -- in-memory LRU of recent chunks (a 128 KiB FUSE read of a 1 MiB chunk reads it once) -------
    def _mem_get(self, d: bytes) -> bytes | None:
        with self._lock:
            data = self._mem.get(d)
            if data is not None:
                self._mem.move_to_end(d)
        if data is not None:
            self.stats.add("memory_hits")
        return data

    def _mem_put(self, d: bytes, data: bytes) -> None:
        if len(data) > self._mem_limit // 4:
            return
        with self._lock:
            if d in self._mem:
                return
            self._mem[d] = data
            self._mem_bytes += len(data)
            while self._mem_bytes > self._mem_limit:
                _, old = self._mem.popitem(last=False)
                self._mem_bytes -= len(old)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._bg_pool.shutdown(wait=False)


class Prefetcher:
    """Background fetch of the bootstrap's prefetch list (in order), then optionally every file.

    Files are fetched in batches of chunk data so neighbouring frames still merge into few requests,
    while on-demand reads keep their own slots in the fetcher's pool. A batch ends at its size even inside a
    file: a reader waits for a frame the prefetch has in flight (single flight), so a big hot file taken
    whole would make a read of its far end wait for everything before it. The batches grow from
    ``first_batch`` to ``batch_bytes`` (doubling): the first files a container opens arrive after
    one small request instead of after the biggest one, and the later, larger requests keep the
    round trips few. ``depth`` batches are in flight at once, so the link never idles while a
    response is decompressed, verified and written to the cache. Errors are logged and the batch
    skipped: prefetch is an optimisation, a read will retry on demand.
    """

    def __init__(self, fetcher: ChunkFetcher, *, prefetch_all: bool = False, batch_bytes: int = 8 << 20,
                 first_batch: int = 1 << 20, depth: int = 2):
        self.fetcher = fetcher
        self.prefetch_all = prefetch_all
        self.batch_bytes = batch_bytes
        self.first_batch = min(first_batch, batch_bytes)
        self.depth = max(1, depth)
        self._stop = threading.Event()
        self.done = threading.Event()  # set when the prefetch has ended, whichever way
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def start(self) -> Prefetcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _files(self) -> list[int]:
        bs = self.fetcher.bootstrap
        order = list(dict.fromkeys(bs.prefetch_inodes()))
        if self.prefetch_all:
            seen = set(order)
            for _, rec in bs.walk():
                if rec.mode & 0o170000 == 0o100000 and rec.ino not in seen:
                    seen.add(rec.ino)
                    order.append(rec.ino)
        return order

    def _run(self) -> None:
        stats = self.fetcher.stats
        pool = ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="prefetch-batch")
        outstanding: list[Future] = []
        try:
            files = self._files()
            stats.set("prefetch_files_total", len(files))
            batch: list[Extent] = []
            batch_files = 0
            size = 0
            target = self.first_batch
            db = self.fetcher.bootstrap.connection()

            def submit(first: bool) -> None:
                outstanding.append(pool.submit(self._flush, batch, batch_files, size))
                # The first batch goes alone (what the container opens first gets the whole link),
                # then ``depth`` batches are kept in flight, no more.
                while len(outstanding) >= (1 if first else self.depth):
                    outstanding.pop(0).result()

            for ino in files:
                if self._stop.is_set():
                    return
                ext = self.fetcher.bootstrap.extents(ino, db)
                if not ext:
                    batch_files += 1
                for i, (off, cid) in enumerate(ext):
                    e = self.fetcher.bootstrap.extent(off, cid, db)
                    batch.append(e)
                    size += e.chunk.size
                    if i == len(ext) - 1:
                        batch_files += 1
                    # Cut inside a file too: a big hot file in one batch put all its frames in flight at
                    # once, so a reader of its far end waited for the prefetch to stream everything before
                    # (100 MiB: 7.7 s for a 4 MiB read at 80 MiB, the whole file through one range request).
                    if size >= target:
                        submit(target == self.first_batch)
                        batch, batch_files, size = [], 0, 0
                        target = min(target * 2, self.batch_bytes)
            if batch or batch_files:
                submit(False)
            for fut in outstanding:
                fut.result()
            self.fetcher.wait_all_stored()
            stats.set("prefetch_done", 1)
            log.info("prefetch finished: %d files", len(files))
        except Exception:
            log.exception("prefetch stopped")
        finally:
            pool.shutdown(wait=False)
            self.done.set()

    def _flush(self, batch: list[Extent], files: int, size: int) -> None:
        try:
            # not waiting for the disk write: readers get these chunks from memory meanwhile, and
            # the next request goes out while this one is being written
            self.fetcher.ensure(batch, wait_stored=False)
            self.fetcher.stats.add("prefetch_bytes", size)
        except RemoraError as exc:
            log.warning("prefetch: %s", exc)
        self.fetcher.stats.add("prefetch_files_done", files)
