"""Early prefetch: start fetching an image's hot data before its bootstrap is even mounted.

Why. On a cold start the first data byte used to be requested only once the bootstrap layer was
prepared and its fs process mounted, several round trips after the first layer's Prepare. But the
converter puts every file of the prefetch list into one data blob, in access order, and marks that
layer with ``containerd.io/snapshot/remora.prefetch-bytes`` (docs/format.md). So the snapshotter can
start streaming those bytes the moment it sees that layer (its Prepare, or ``remora pull``'s
warm-up), while the bootstrap is fetched and mounted; the fs process then reads them from here.

The contract between the two processes is a file, and nothing else:

* the snapshotter (:class:`StagingArea`) streams bytes ``0..n-1`` of the blob into
  ``<dir>/<hex>.part`` (blob offset = file offset, appended in order, so a reader can use every
  byte below the file's size at once), then renames it to ``<dir>/<hex>``. If every source fails it
  unlinks the ``.part`` file: a reader holding it open sees ``st_nlink == 0`` and gives up;
* the fs process (:class:`StagedSource`, a blob source like the registry's) knows ``n`` from its
  mount spec; it serves ranges below ``n`` from the file, waiting for bytes still on the wire, and
  answers :class:`NotFound` for anything else, so the fetcher asks the next source. The staged
  bytes are no more trusted than a registry's: the fetcher verifies every frame by digest.

Files are removed ``ttl`` seconds after they were written (by then the fs process has the frames
in its chunk cache), and all of them at start; the total is capped by ``limit`` bytes.

Scopes: a staged blob is offered only to mounts of the *scope* it was staged for (the snapshotter
uses the image's ``registry host/repository``), and each scope has a directory of its own
(``<dir>/<hash of scope>/``). Without that, an image naming another image's hot blob by digest would
be handed bytes that its own registry never gave it; with it, a hot blob is fetched through the
repository (and so the credentials) of the image that asks. Scope "" is ``<dir>`` itself.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from remora.errors import NotFound, RegistryError, RemoraError

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 256 << 20
DEFAULT_TTL = 600.0
POLL_INTERVAL = 0.002   # a reader ahead of the writer looks again after this long
STREAM_BLOCK = 256 << 10
#: A container's read waits for staged bytes no further than this ahead of the bytes written so far
#: (~0.35 s at 100 Mbit/s); further ahead it is asked of the next source (see StagedSource.covers).
READER_LEAD = 4 << 20


def _name(blob: str) -> str:
    algo, _, hexdigest = blob.partition(":")
    if not hexdigest or not hexdigest.isalnum() or not algo.isalnum():
        raise ValueError(f"not a digest: {blob!r}")
    return f"{algo}-{hexdigest}"


def scope_dir(directory: Path | str, scope: str) -> Path:
    """The directory of ``scope``'s staged blobs (``directory`` itself for scope "")."""
    return Path(directory) / hashlib.sha256(scope.encode()).hexdigest()[:32] if scope else Path(directory)


class StagingArea:
    """The snapshotter's side: stream hot blobs into ``directory``, one background thread each."""

    def __init__(self, directory: Path | str, limit: int = DEFAULT_LIMIT, ttl: float = DEFAULT_TTL):
        self.dir = Path(directory)
        self.limit = limit
        self.ttl = ttl
        self._lock = threading.Lock()
        self._staged: dict[tuple[str, str], tuple[int, float]] = {}   # (scope, blob) -> (bytes, time started)
        self._threads: dict[tuple[str, str], threading.Thread] = {}
        self._counters = {"blobs": 0, "bytes": 0, "failures": 0}
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # image bytes, maybe of a private image: root (the fs processes) only
        for stale in self.dir.iterdir():  # from before a restart: fs processes fetch on their own now
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)

    def dir_for(self, scope: str = "") -> Path:
        """Where ``scope``'s blobs are staged (what a mount's staging source reads)."""
        return scope_dir(self.dir, scope)

    def counters(self) -> dict[str, int]:
        """Stagings started, bytes streamed in, stagings that failed (for the metrics endpoint)."""
        with self._lock:
            return dict(self._counters)

    def staged(self, blobs: Sequence[str], scope: str = "") -> dict[str, int]:
        """``{blob: bytes}`` of those ``blobs`` being staged or staged for ``scope`` (for a mount spec)."""
        with self._lock:
            return {b: self._staged[(scope, b)][0] for b in blobs if (scope, b) in self._staged}

    def start(self, blob: str, nbytes: int, sources: Sequence, first=None, scope: str = "") -> bool:
        """Begin streaming the first ``nbytes`` of ``blob`` (capped by the area's limit) from the first
        source that delivers; False if it is already staged or there is no room. ``sources`` are
        objects with ``name`` and ``read_range(blob, start, end_inclusive, sink=...)``, closed (if
        they have ``close``) when the staging ends.

        ``first``: a callable the staging thread runs before it asks for a byte (the image's
        bootstrap download: the mount waits for it, so it should not share the link with the hot
        blob; on the same kept-alive connection, the hot blob then starts at full speed). Readers may
        open the file meanwhile: it exists from now on, and they wait for its bytes. ``scope``: whose
        staging this is (see the module docstring); ``sources`` must be that scope's."""
        key = (scope, blob)
        with self._lock:
            if key in self._staged or nbytes <= 0 or self.limit <= 0:
                return False
            used = sum(n for n, _ in self._staged.values())  # all scopes: the limit is the node's
            nbytes = min(nbytes, self.limit - used)
            if nbytes <= 0:
                log.info("early prefetch of %s skipped: staging area full (%d bytes)", blob[:19], used)
                return False
            self._staged[key] = (nbytes, time.monotonic())
            self._counters["blobs"] += 1
            part = self.dir_for(scope) / (_name(blob) + ".part")
            try:
                part.parent.mkdir(mode=0o700, exist_ok=True)
                part.touch()
            except OSError as exc:
                log.warning("early prefetch of %s: %s", blob[:19], exc)
                del self._staged[key]
                return False
            t = threading.Thread(target=self._stage, args=(blob, nbytes, list(sources), first, scope),
                                 name=f"stage-{blob[7:19]}", daemon=True)
            self._threads[key] = t
        t.start()
        return True

    def wait(self, blob: str, timeout: float | None = None, scope: str = "") -> None:
        """Wait for ``blob``'s staging thread (tests, shutdown)."""
        with self._lock:
            t = self._threads.get((scope, blob))
        if t is not None:
            t.join(timeout)

    def _stage(self, blob: str, nbytes: int, sources: list, first=None, scope: str = "") -> None:
        final = self.dir_for(scope) / _name(blob)
        part = final.with_name(final.name + ".part")
        got = 0
        errors = []
        try:
            if first is not None:
                try:
                    first()
                except Exception as exc:  # noqa: BLE001 - its owner reports; staging goes on
                    log.info("before early prefetch of %s: %s", blob[:19], exc)
            t0 = time.monotonic()
            with open(part, "r+b", buffering=0) as f:
                def sink(piece: bytes) -> None:
                    nonlocal got
                    f.write(piece)
                    got += len(piece)
                    with self._lock:
                        self._counters["bytes"] += len(piece)

                for source in sources:
                    if got >= nbytes:
                        break
                    try:
                        source.read_range(blob, got, nbytes - 1, sink=sink)
                    except RemoraError as exc:  # keep what arrived; the next source goes on from there
                        errors.append(str(exc))
            if got < nbytes:
                raise RegistryError(f"early prefetch of {blob}: {got} of {nbytes} bytes; " + "; ".join(errors))
            os.replace(part, final)
            log.info("early prefetch of %s: %d bytes in %.3fs", blob[:19], got, time.monotonic() - t0)
            timer = threading.Timer(self.ttl, self._drop, args=(blob, scope))
            timer.daemon = True
            timer.start()
        except (OSError, RemoraError) as exc:
            log.warning("%s", exc)
            part.unlink(missing_ok=True)  # readers holding it see nlink 0 and go to the next source
            with self._lock:
                self._staged.pop((scope, blob), None)
                self._threads.pop((scope, blob), None)
                self._counters["failures"] += 1
        finally:
            for source in sources:  # they were made for this staging: release their connections
                close = getattr(source, "close", None)
                if close is not None:
                    close()

    def _drop(self, blob: str, scope: str = "") -> None:
        """Forget a staged blob ``ttl`` seconds after it was written: its mounts have the frames in
        their chunk cache by then; a reader still holding the file open keeps reading it."""
        with self._lock:  # held: a start() of the same scope must not see its directory vanish
            self._staged.pop((scope, blob), None)
            self._threads.pop((scope, blob), None)
            (self.dir_for(scope) / _name(blob)).unlink(missing_ok=True)
            if scope:
                try:
                    self.dir_for(scope).rmdir()  # empty now (else another blob of the scope is still there)
                except OSError:
                    pass


class StagedSource:
    """The fs process's side: a blob source over the staging directory (see the module docstring).

    ``staged`` maps blob digests to the number of bytes staged from their start; ``stall_timeout``
    bounds how long a reader waits for a writer that stopped making progress.
    """

    def __init__(self, directory: Path | str, staged: dict[str, int], stall_timeout: float = 10.0):
        self.dir = Path(directory)
        self.staged = dict(staged)
        self.stall_timeout = stall_timeout
        self.name = f"early prefetch ({self.dir})"

    def covers(self, blob: str, start: int, patient: bool = True) -> bool:
        """Whether a range starting at ``start`` of ``blob`` can be served here: below the staged length,
        and, for a reader that is not ``patient`` (a container's read, not the prefetch), no further than
        :data:`READER_LEAD` ahead of the bytes written so far. Staging streams the hot blob from its start,
        so a read of a hot file's far end (a workload the prefetch list was not traced from) would wait
        for everything before it (a 4 MiB read at the 80th MiB of a 100 MiB hot file: 7.7 s at 100
        Mbit/s); it asks the next source instead, which costs the registry those few frames twice."""
        n = self.staged.get(blob, 0)
        if start >= n:
            return False
        if patient:
            return True
        final = self.dir / _name(blob)
        for path in (final, final.with_name(final.name + ".part")):
            try:
                written = os.stat(path).st_size
            except FileNotFoundError:
                continue
            return start < written + READER_LEAD
        return False   # not staged (any more), or between the rename's two names: ask elsewhere

    def _open(self, blob: str) -> int:
        final = self.dir / _name(blob)
        for path in (final, final.with_name(final.name + ".part"), final):  # the rename may fall between
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
        raise NotFound(f"{self.name}: {blob} is not staged (any more)")

    def read_range(self, blob: str, start: int, end: int, sink=None) -> bytes | int:
        """Bytes ``start..end`` (inclusive), as far as they are staged. Bytes past the staged length
        are not served: after handing over the staged part, :class:`NotFound` says the rest must come
        from another source (the fetcher keeps the whole frames it got)."""
        n = self.staged.get(blob, 0)
        if start >= n or (sink is None and end >= n):
            raise NotFound(f"{self.name}: {blob} bytes {start}-{end} are not staged")
        out: list[bytes] = []
        deliver = sink if sink is not None else out.append
        stop = min(end + 1, n)
        pos = start
        fd = self._open(blob)
        try:
            last_progress = time.monotonic()
            while pos < stop:
                data = os.pread(fd, min(STREAM_BLOCK, stop - pos), pos)
                if data:
                    deliver(data)
                    pos += len(data)
                    last_progress = time.monotonic()
                    continue
                if os.fstat(fd).st_nlink == 0:
                    raise NotFound(f"{self.name}: staging of {blob} was abandoned at byte {pos}")
                if time.monotonic() - last_progress > self.stall_timeout:
                    raise RegistryError(f"{self.name}: staging of {blob} stalled at byte {pos} for "
                                        f"{self.stall_timeout:.0f}s")
                time.sleep(POLL_INTERVAL)
        finally:
            os.close(fd)
        if stop <= end:
            raise NotFound(f"{self.name}: {blob} is staged up to byte {stop}; the rest of {start}-{end} is not")
        return b"".join(out) if sink is None else pos - start
