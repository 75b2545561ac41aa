"""The piece store: blobs kept on disk as fixed-size pieces, with their piece digests, and its GC.

Layout under ``<data-dir>/tasks/<sha256 hex>/``::

    meta.json      content length, piece size, sha256 of every known piece, "verified" once the
                   whole blob matched its digest
    pieces/<n>     piece n, exactly piece_size bytes (the last one shorter)

A piece file only ever appears by ``rename`` of a fully written temporary file, so a crash can leave a
stray ``.tmp`` (removed on the next open) but never a short piece that looks complete. A piece is only
written after it was checked against its piece digest (children) or hashed as it came from the registry
(the seed). Pieces are not fsync'ed one by one as they land (on a node that moves a blob through the mesh,
a flush per piece stalled the seed's stream and cost every peer CPU: see :meth:`BlobEntry.sync_pieces`):
they are flushed in batches behind the download and all of them before the blob is recorded as verified.
So after a power loss, pieces of a verified blob are whole, and the pieces of a blob that was still
downloading are each hashed against their digest when the store opens it again (a piece whose bytes
never reached the disk is dropped and fetched again). Disks still rot and people still edit files:
every piece is hashed again against the digest kept in meta.json before it leaves this node
(:meth:`BlobEntry.verify_piece`), and a piece that does not match is dropped and fetched again instead of
being served.

GC evicts whole blobs, least recently used first: those idle longer than the TTL, and then as many as
needed to bring the disk from the high watermark down to the low one. Blobs in use (a download running,
a response being streamed) are never evicted.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from remora.errors import InvalidInput, StorageError

from .config import Watermark

log = logging.getLogger(__name__)

DIGEST_PREFIX = "sha256:"
#: Piece digests learned while a blob downloads are written to meta.json at most this often (and always
#: when the layout is fixed and when the blob is verified). The seed learns one per piece and children
#: learn them from the scheduler several times a second: rewriting the whole list each time, in the event
#: loop, was a measurable share of a peer's CPU. A crash loses at most this much: pieces whose digest is not
#: on disk are dropped at the next start and fetched again.
META_EVERY = 1.0


#: Bytes hashed per read when a stored piece is re-verified (memory stays bounded whatever the piece size).
VERIFY_CHUNK = 1 << 20


class CorruptPiece(StorageError):
    """A stored piece no longer matches its piece digest (or is missing): it must not be served."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def check_digest(digest: str) -> str:
    """Validate a blob digest and return its hex part (also the directory name: no path tricks)."""
    hexpart = digest[len(DIGEST_PREFIX):] if digest.startswith(DIGEST_PREFIX) else ""
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidInput(f"unsupported or malformed digest {digest!r} (only sha256 is supported)")
    return hexpart


def sha256_digest(data: bytes) -> str:
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


#: Bytes read per worker-thread trip when a piece goes out over TLS (see :func:`send_file`).
TLS_CHUNK = 4 << 20


async def send_file(request, fobj, offset: int, count: int) -> None:
    """Send ``count`` bytes of an open file from ``offset`` on the response's connection with sendfile(2):
    the kernel copies from the page cache to the socket (asyncio falls back to reads and writes, with
    flow control, where sendfile cannot work). The response's headers must be out already
    (``await resp.prepare(request)``)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("connection lost")
    if transport.get_extra_info("ssl_object") is not None:
        # TLS (the mesh's upload port, issue 10): the kernel cannot encrypt, and asyncio's sendfile
        # fallback for SSL transports (a thread hop and a flow-control wait per 256 KiB, with the
        # protocol swapped out) cost 5x the CPU and 9x the time per byte of this, measured on loopback.
        await _copy_file(request, fobj, offset, count)
        return
    try:
        await asyncio.get_running_loop().sendfile(transport, fobj, offset, count)
    except NotImplementedError:  # an event loop without sendfile (uvloop): reads and writes
        await _copy_file(request, fobj, offset, count)
    except RuntimeError as exc:  # asyncio's "Transport is closing": the client went away meanwhile
        if transport.is_closing():
            raise ConnectionResetError(f"connection lost: {exc}") from exc
        raise


async def _copy_file(request, fobj, offset: int, count: int) -> None:
    """Big reads in a worker thread, written through the response's writer (its flow control)."""
    end = offset + count
    while offset < end:
        chunk = await asyncio.to_thread(os.pread, fobj.fileno(), min(end - offset, TLS_CHUNK), offset)
        if not chunk:
            return   # the file is shorter: like sendfile, the caller's Content-Length decides
        await request.writer.write(chunk)
        offset += len(chunk)


def _write_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc


class BlobEntry:
    """The pieces of one blob on disk. Mutated only from the event loop thread (I/O is thread-safe)."""

    def __init__(self, root: Path, digest: str):
        self.digest = digest
        self.dir = root / check_digest(digest)
        self.piece_dir = self.dir / "pieces"
        self.content_length = 0
        self.piece_size = 0
        self.piece_digests: list[str] = []
        self.verified = False
        self.have: set[int] = set()
        self.users = 0          # downloads/responses holding it: GC skips it while > 0
        self._unsynced: set[int] = set()   # pieces written but not yet flushed to the disk
        self._sync_lock = threading.Lock()
        self._meta_saved_at = 0.0
        self._meta_dirty = False
        self._load()

    # -- layout ---------------------------------------------------------------------------------------
    @property
    def n_pieces(self) -> int:
        if not self.piece_size:
            return 0
        return max(1, -(-self.content_length // self.piece_size)) if self.content_length else 0

    @property
    def has_layout(self) -> bool:
        return self.piece_size > 0 and self.content_length > 0

    @property
    def complete(self) -> bool:
        return self.has_layout and len(self.have) == self.n_pieces

    def piece_span(self, index: int) -> tuple[int, int]:
        """``(start, end)`` byte offsets of a piece, end exclusive."""
        start = index * self.piece_size
        return start, min(start + self.piece_size, self.content_length)

    def pieces_for_range(self, start: int, end: int) -> range:
        """Pieces covering bytes ``[start, end)``."""
        return range(start // self.piece_size, (end - 1) // self.piece_size + 1)

    def set_layout(self, content_length: int, piece_size: int) -> None:
        """Fix the layout; a different layout than the one on disk throws the old pieces away."""
        if content_length <= 0 or piece_size <= 0 or piece_size & (piece_size - 1):
            raise InvalidInput(f"{self.digest}: bad layout: length {content_length}, piece size {piece_size}")
        if (self.content_length, self.piece_size) == (content_length, piece_size):
            return
        if self.has_layout:
            log.warning("%s: layout changed (%d/%d -> %d/%d): dropping stored pieces", self.digest,
                        self.content_length, self.piece_size, content_length, piece_size)
            self.reset()
        self.content_length, self.piece_size = content_length, piece_size
        self.piece_digests = [""] * self.n_pieces
        self.save_meta()

    def set_piece_digests(self, digests: list[str]) -> None:
        """Learn piece digests (``""`` = unknown). A known digest that changes invalidates the piece."""
        changed = False
        for i, d in enumerate(digests[: self.n_pieces]):
            if d and self.piece_digests[i] != d:
                if self.piece_digests[i]:
                    log.warning("%s: piece %d digest changed: dropping it", self.digest, i)
                    self.drop_piece(i)
                self.piece_digests[i] = d
                changed = True
        if changed:
            self._digests_changed()

    # -- pieces ---------------------------------------------------------------------------------------
    def piece_path(self, index: int) -> Path:
        return self.piece_dir / str(index)

    def write_piece(self, index: int, data: bytes, digest: str) -> None:
        """Store a piece (blocking: call from a thread). The caller verified ``data`` against ``digest``."""
        start, end = self.piece_span(index)
        if len(data) != end - start:
            raise InvalidInput(f"{self.digest}: piece {index} has {len(data)} bytes, expected {end - start}")
        self.piece_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.piece_path(index), data, fsync=False)
        with self._sync_lock:
            self._unsynced.add(index)

    @property
    def unsynced(self) -> int:
        """How many written pieces still wait for :meth:`sync_pieces`."""
        return len(self._unsynced)

    def sync_pieces(self) -> int:
        """Flush the pieces written since the last call to the disk, and the directory that names them
        (blocking: call from a thread). Returns how many were flushed. One flush per batch of pieces
        instead of one per piece: the kernel writes a batch in one go, and nothing waits on each piece."""
        with self._sync_lock:
            batch, self._unsynced = self._unsynced, set()
        if not batch:
            return 0
        try:
            for index in sorted(batch):
                try:
                    fd = os.open(self.piece_path(index), os.O_RDONLY)
                except FileNotFoundError:
                    continue   # dropped meanwhile
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            try:
                fd = os.open(self.piece_dir, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                return 0   # the blob was dropped meanwhile (reset, GC): nothing left to flush
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with self._sync_lock:
                self._unsynced |= batch
            raise StorageError(f"{self.digest}: cannot flush pieces to disk: {exc.strerror or exc}") from exc
        return len(batch)

    def commit_piece(self, index: int, digest: str) -> None:
        """Record (in the loop thread) a piece :meth:`write_piece` stored."""
        self.have.add(index)
        if self.piece_digests[index] != digest:
            self.piece_digests[index] = digest
            self._digests_changed()

    def read_piece(self, index: int, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of a piece (blocking)."""
        try:
            with open(self.piece_path(index), "rb") as f:
                if start:
                    f.seek(start)
                return f.read(-1 if end is None else end - start)
        except OSError as exc:
            raise StorageError(f"{self.digest}: cannot read piece {index}: {exc.strerror or exc}") from exc

    def read_piece_into(self, index: int, buf: bytearray) -> memoryview:
        """The whole piece read into ``buf`` (at least a piece long), without allocating (blocking)."""
        start, end = self.piece_span(index)
        view = memoryview(buf)[:end - start]
        try:
            with open(self.piece_path(index), "rb", buffering=0) as f:
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise StorageError(f"{self.digest}: piece {index} is short on disk")
                    got += n
        except OSError as exc:
            raise StorageError(f"{self.digest}: cannot read piece {index}: {exc.strerror or exc}") from exc
        return view

    def verify_piece(self, index: int) -> None:
        """Hash piece ``index`` on disk against its recorded digest (blocking: call from a thread); raises
        :class:`CorruptPiece` when it differs, is short or long, is gone, or has no digest to check."""
        expected = self.piece_digests[index] if index < len(self.piece_digests) else ""
        start, end = self.piece_span(index)
        h = hashlib.sha256()
        try:
            with open(self.piece_path(index), "rb", buffering=0) as f:
                size = 0
                while size <= end - start and (chunk := f.read(VERIFY_CHUNK)):
                    h.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise CorruptPiece(f"{self.digest}: cannot read piece {index}: {exc.strerror or exc}", index) from exc
        actual = DIGEST_PREFIX + h.hexdigest()
        if not expected or size != end - start or actual != expected:
            raise CorruptPiece(f"{self.digest}: stored piece {index} is corrupt ({size} bytes, {actual[:19]}; "
                               f"expected {end - start} bytes, {expected[:19] or 'no digest'})", index)

    def read_verified(self, index: int) -> bytes:
        """Piece ``index`` read from disk in one go and checked against its recorded digest (blocking: call
        from a thread): the bytes returned are the bytes that matched, so an upload that sends them sends
        nothing the check did not see (and reads the file once, not once to check and again to send).
        Raises :class:`CorruptPiece` like :meth:`verify_piece`."""
        expected = self.piece_digests[index] if index < len(self.piece_digests) else ""
        start, end = self.piece_span(index)
        try:
            with open(self.piece_path(index), "rb", buffering=0) as f:
                data = f.read(end - start + 1)   # one byte more: a long file must not pass for a good one
        except OSError as exc:
            raise CorruptPiece(f"{self.digest}: cannot read piece {index}: {exc.strerror or exc}", index) from exc
        actual = sha256_digest(data)
        if not expected or len(data) != end - start or actual != expected:
            raise CorruptPiece(f"{self.digest}: stored piece {index} is corrupt ({len(data)} bytes, {actual[:19]}; "
                               f"expected {end - start} bytes, {expected[:19] or 'no digest'})", index)
        return data

    def verify_pieces(self, indexes) -> list[int]:
        """The pieces among ``indexes`` that fail :meth:`verify_piece` (blocking)."""
        bad = []
        for i in indexes:
            try:
                self.verify_piece(i)
            except CorruptPiece:
                bad.append(i)
        return bad

    def drop_piece(self, index: int) -> None:
        was_verified = self.verified
        self.have.discard(index)
        self.verified = False
        try:
            self.piece_path(index).unlink()
        except FileNotFoundError:
            pass
        if was_verified and self.has_layout:
            self.save_meta(fsync=False)   # a restart must not take the blob for verified any more

    def mark_verified(self) -> None:
        """Record the blob as verified (on disk, fsync'ed). Every piece must be on the disk first: call
        :meth:`sync_pieces` (in a thread) before; pieces still unsynced are flushed here."""
        if self._unsynced:
            self.sync_pieces()
        self.verified = True
        self.save_meta()

    def reset(self) -> None:
        """Forget everything about this blob (a failed back-to-source, a mismatching whole blob)."""
        shutil.rmtree(self.piece_dir, ignore_errors=True)
        with self._sync_lock:
            self._unsynced.clear()
        self.have.clear()
        self.verified = False
        self.content_length = self.piece_size = 0
        self.piece_digests = []
        try:
            (self.dir / "meta.json").unlink()
        except FileNotFoundError:
            pass

    def touch(self) -> None:
        """Record an access (the directory mtime is the LRU clock of the GC)."""
        try:
            os.utime(self.dir)
        except FileNotFoundError:
            pass

    def size_on_disk(self) -> int:
        return sum(self.piece_span(i)[1] - self.piece_span(i)[0] for i in self.have) if self.has_layout else 0

    # -- persistence ----------------------------------------------------------------------------------
    def _digests_changed(self) -> None:
        """New piece digests: on disk now if the last write is :data:`META_EVERY` old, else with a later
        change, the verification, or :meth:`flush_meta`."""
        self._meta_dirty = True
        if time.monotonic() - self._meta_saved_at >= META_EVERY:
            self.save_meta(fsync=False)

    def flush_meta(self) -> None:
        """Write digests still held back by :meth:`_digests_changed` (a download that stopped)."""
        if self._meta_dirty and self.has_layout:
            self.save_meta(fsync=False)

    def save_meta(self, fsync: bool = True) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"digest": self.digest, "content_length": self.content_length, "piece_size": self.piece_size,
                "piece_digests": self.piece_digests, "verified": self.verified}
        _write_atomic(self.dir / "meta.json", json.dumps(meta).encode(), fsync=fsync)
        self._meta_saved_at, self._meta_dirty = time.monotonic(), False

    def _load(self) -> None:
        try:
            meta = json.loads((self.dir / "meta.json").read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable meta.json (%s): starting over", self.digest, exc)
            self.reset()
            return
        self.content_length = int(meta.get("content_length", 0))
        self.piece_size = int(meta.get("piece_size", 0))
        self.piece_digests = list(meta.get("piece_digests", []))
        self.verified = bool(meta.get("verified"))
        if not self.has_layout or len(self.piece_digests) != self.n_pieces:
            self.reset()
            return
        try:
            names = os.listdir(self.piece_dir)
        except FileNotFoundError:
            names = []
        for name in names:
            path = self.piece_dir / name
            if not name.isdigit():  # leftover temporary file of a crash
                path.unlink(missing_ok=True)
                continue
            i = int(name)
            start, end = self.piece_span(i) if i < self.n_pieces else (0, -1)
            if i < self.n_pieces and self.piece_digests[i] and path.stat().st_size == end - start:
                self.have.add(i)
            else:
                path.unlink(missing_ok=True)
        if not self.verified and self.have:
            # Pieces of a blob still downloading may not have reached the disk before a crash (they are
            # flushed in batches): each is hashed before it counts. A verified blob's were all flushed.
            bad = self.verify_pieces(sorted(self.have))
            for i in bad:
                log.warning("%s: piece %d did not survive the last stop: fetching it again", self.digest, i)
                self.have.discard(i)
                self.piece_path(i).unlink(missing_ok=True)
        if self.verified and not self.complete:
            self.verified = False


class PieceStore:
    """All blobs of one peer. ``open(digest)`` returns the (cached) :class:`BlobEntry`."""

    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "tasks"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create piece store {self.root}: {exc.strerror or exc}") from exc
        self._entries: dict[str, BlobEntry] = {}

    def open(self, digest: str) -> BlobEntry:
        entry = self._entries.get(digest)
        if entry is None:
            entry = self._entries[digest] = BlobEntry(self.root, digest)
        return entry

    def get(self, digest: str) -> BlobEntry | None:
        """The entry if the blob has anything on disk, without creating one."""
        entry = self._entries.get(digest)
        if entry is None:
            check_digest(digest)
            if not (self.root / digest[len(DIGEST_PREFIX):]).is_dir():
                return None
            entry = self.open(digest)
        return entry

    def forget(self, digest: str) -> None:
        """Drop the in-memory entry of a blob that has nothing on disk."""
        entry = self._entries.get(digest)
        if entry is not None and entry.users == 0 and not entry.have:
            del self._entries[digest]

    def entries(self) -> list[BlobEntry]:
        for name in os.listdir(self.root):
            if len(name) == 64:
                self.open(DIGEST_PREFIX + name)
        return list(self._entries.values())

    def usage_bytes(self) -> int:
        return sum(e.size_on_disk() for e in self.entries())

    def known_usage_bytes(self) -> int:
        """Bytes of the blobs opened so far (every blob once :meth:`entries` ran): cheap, no directory
        listing, for the ``remora_peer_store_bytes`` gauge read at every scrape."""
        return sum(e.size_on_disk() for e in list(self._entries.values()))

    def disk_percent_used(self) -> float:
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        return 100.0 * (total - st.f_bavail * st.f_frsize) / total if total else 0.0

    def _excess(self, high: Watermark, low: Watermark) -> int:
        """Bytes to free: 0 below the high watermark, else down to the low one."""
        if high.percent is not None:
            st = os.statvfs(self.root)
            total = st.f_blocks * st.f_frsize
            used = total - st.f_bavail * st.f_frsize
            if not total or 100.0 * used / total <= high.percent:
                return 0
            return int(used - total * low.percent / 100.0)
        usage = self.usage_bytes()
        return usage - low.bytes if usage > high.bytes else 0

    def gc(self, ttl: float, high: Watermark, low: Watermark, now: float | None = None) -> list[BlobEntry]:
        """Choose and detach the blobs to evict; the caller deletes them with :meth:`delete`.

        Runs in the event loop thread (stat calls only), so that no request can pick up an entry
        between the decision and the detaching; the slow part, deleting files, happens in a thread.
        Blobs in use and blobs whose download has not created anything yet are never candidates.
        """
        now = time.time() if now is None else now

        def atime(e: BlobEntry) -> float | None:
            try:
                return e.dir.stat().st_mtime
            except FileNotFoundError:
                return None

        aged = [(t, e) for e in self.entries() if e.users == 0 and (t := atime(e)) is not None]
        aged.sort(key=lambda te: te[0])
        evicted = [e for t, e in aged if now - t > ttl]
        excess = self._excess(high, low) - sum(e.size_on_disk() for e in evicted)
        for _, e in aged:
            if excess <= 0:
                break
            if e not in evicted:
                evicted.append(e)
                excess -= e.size_on_disk()
        for e in evicted:
            self._entries.pop(e.digest, None)
        if evicted:
            log.info("gc evicts %d blob(s): %s", len(evicted), ", ".join(e.digest[:19] for e in evicted))
        return evicted

    @staticmethod
    def delete(entries: list[BlobEntry]) -> None:
        """Remove evicted blobs from disk (blocking)."""
        for e in entries:
            shutil.rmtree(e.dir, ignore_errors=True)
