"""A content-addressed chunk cache on local disk, shared by every image and every mount process.

Layout::

    ROOT/sha256/ab/<64 hex>     one file per chunk: its uncompressed bytes, named by their sha256
    ROOT/tmp/                   half-written chunks (renamed into place, so readers never see them)
    ROOT/index.db               SQLite (WAL): size and last access of every chunk, and the pins

Why this shape:

* Chunks are addressed by the digest of their bytes, so identical content from different images or
  layers is stored once, and every read can *verify* what it returns. A file that rotted, was
  truncated by a crash (entries are renamed into place but not fsynced) or was tampered with is
  detected by its digest on read, deleted and reported as a miss: the caller refetches it.
* The files are the truth, the index is bookkeeping for the size limit. Several processes (one per
  lazy mount) share the index through SQLite's locking; access times are batched in memory and
  written every few seconds, so a read costs no database write.
* The size limit is kept by evicting least-recently-used chunks that no mounted image has *pinned*.
  A mount pins every chunk its image references (``pin(owner, digests)``), so eviction can never take
  away data a running container may need when the registry is unreachable; the pins of a mount are
  dropped with ``unpin(owner)`` when it goes away. Pinned bytes may exceed the limit (logged): the
  limit bounds what the cache keeps *beyond* what live mounts need.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from remora.errors import InvalidInput, StorageError

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 10 << 30
LOW_WATERMARK = 0.9          # evict down to this fraction of the limit, so eviction is not per put
TOUCH_FLUSH_SECONDS = 2.0
TOUCH_FLUSH_COUNT = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, atime REAL NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_atime ON chunks (atime);
CREATE TABLE IF NOT EXISTS pins (owner TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (owner, digest))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pins_digest ON pins (digest);
CREATE TABLE IF NOT EXISTS usage (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO usage VALUES (0, 0);
"""


def _hex(digest: bytes | str) -> str:
    """Accept a raw 32-byte sha256, ``sha256:<hex>`` or bare hex; return validated lower-case hex."""
    if isinstance(digest, bytes):
        if len(digest) != 32:
            raise InvalidInput(f"chunk digest must be 32 raw bytes, got {len(digest)}")
        return digest.hex()
    hexpart = digest.removeprefix("sha256:")
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidInput(f"malformed chunk digest {digest!r}")
    return hexpart


class ChunkCache:
    """``ChunkCache(root, limit_bytes)``: ``get(digest)`` -> bytes or None, ``put(digest, data)``.

    Thread-safe and multi-process safe. ``digest`` arguments are raw 32-byte sha256 digests (as in the
    bootstrap's chunk table) or ``sha256:<hex>`` strings. Counters (``hits``, ``misses``, ``corrupt``,
    ``evicted_chunks``, ``evicted_bytes``, ``stored_bytes``) are per process, for metrics.
    """

    def __init__(self, root: Path | str, limit_bytes: int = DEFAULT_LIMIT):
        self.root = Path(root)
        self.limit = int(limit_bytes)
        if self.limit <= 0:
            raise InvalidInput(f"cache size limit must be positive, got {limit_bytes}")
        try:
            (self.root / "sha256").mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create chunk cache at {self.root}: {exc}") from None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}
        self._last_flush = time.monotonic()
        self.hits = self.misses = self.corrupt = 0
        self.evicted_chunks = self.evicted_bytes = self.stored_bytes = 0
        self._clean_tmp()
        new_index = not (self.root / "index.db").exists()
        self._db().executescript(_SCHEMA)
        if new_index:
            self._rebuild_index()

    # -- plumbing -----------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / "index.db", timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self):
        """One write transaction; IMMEDIATE takes SQLite's write lock up front (no upgrade deadlock)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def path(self, digest: bytes | str) -> Path:
        h = _hex(digest)
        return self.root / "sha256" / h[:2] / h

    def _clean_tmp(self) -> None:
        """Drop half-written chunks of processes that died mid-write (``<hex>.<pid>.<thread>``)."""
        for f in (self.root / "tmp").iterdir():
            try:
                pid = int(f.name.split(".")[1])
            except (IndexError, ValueError):
                pid = 0
            if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
                f.unlink(missing_ok=True)

    def _rebuild_index(self) -> None:
        """A missing index (first start, or deleted by hand) is rebuilt from the files on disk."""
        rows = []
        for sub in (self.root / "sha256").iterdir():
            for f in sub.iterdir():
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                rows.append((f.name, st.st_size, st.st_mtime))
        if rows:
            with self._tx() as db:
                db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?)", rows)
                db.execute("UPDATE usage SET bytes = (SELECT coalesce(sum(size), 0) FROM chunks)")
            log.info("chunk cache %s: rebuilt index of %d chunks", self.root, len(rows))

    # -- reads --------------------------------------------------------------------------------
    def contains(self, digest: bytes | str) -> bool:
        """Cheap existence test (no verification): for planning fetches, not for serving data."""
        return self.path(digest).exists()

    def get(self, digest: bytes | str) -> bytes | None:
        """The chunk's bytes, verified against ``digest``; ``None`` if absent or corrupt (then removed)."""
        h = _hex(digest)
        p = self.root / "sha256" / h[:2] / h
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            self._count(misses=1)
            return None
        except OSError as exc:
            raise StorageError(f"chunk cache: cannot read {p}: {exc}") from None
        if hashlib.sha256(data).hexdigest() != h:
            self._count(corrupt=1, misses=1)
            log.warning("chunk cache: %s is corrupt (%d bytes, digest mismatch); dropping it", p, len(data))
            self._remove([h])
            return None
        self._count(hits=1)
        self._touch(h)
        return data

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                setattr(self, name, getattr(self, name) + n)

    def _touch(self, h: str) -> None:
        with self._lock:
            self._touched[h] = time.time()
            due = (len(self._touched) >= TOUCH_FLUSH_COUNT
                   or time.monotonic() - self._last_flush >= TOUCH_FLUSH_SECONDS)
        if due:
            self.flush()

    def flush(self) -> None:
        """Write batched access times to the index (called periodically and at close)."""
        with self._lock:
            touched, self._touched = self._touched, {}
            self._last_flush = time.monotonic()
        if touched:
            with self._tx() as db:
                db.executemany("UPDATE chunks SET atime=? WHERE digest=? AND atime<?",
                               ((t, h, t) for h, t in touched.items()))

    # -- writes -------------------------------------------------------------------------------
    def put(self, digest: bytes | str, data: bytes) -> None:
        """Store verified bytes. The caller has checked them; this checks again (cheap, and fatal if not)."""
        self.put_many([(digest, data)])

    def put_many(self, items: Iterable[tuple[bytes | str, bytes]], verified: bool = False) -> None:
        """Store several chunks with one index transaction, then evict if over the limit.

        The bytes are hashed again unless the caller says it has just ``verified`` them against
        their digests itself (the chunk fetcher does, for every chunk, before anyone may read it):
        hashing twice was a third of a cold start's decompress-verify-store CPU."""
        rows = []
        now = time.time()
        for digest, data in items:
            h = _hex(digest)
            if not verified and hashlib.sha256(data).hexdigest() != h:
                raise InvalidInput(f"chunk cache: refusing to store bytes that do not match sha256:{h}")
            final = self.root / "sha256" / h[:2] / h
            if final.exists():
                rows.append((h, len(data), now))
                continue
            tmp = self.root / "tmp" / f"{h}.{os.getpid()}.{threading.get_ident()}"
            try:
                final.parent.mkdir(exist_ok=True)
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, final)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise StorageError(f"chunk cache: cannot write {final}: {exc}") from None
            self._count(stored_bytes=len(data))
            rows.append((h, len(data), now))
        if not rows:
            return
        with self._tx() as db:
            added = 0
            for h, size, t in rows:
                if db.execute("UPDATE chunks SET atime=? WHERE digest=?", (t, h)).rowcount == 0:
                    db.execute("INSERT INTO chunks VALUES (?, ?, ?)", (h, size, t))
                    added += size
            db.execute("UPDATE usage SET bytes = bytes + ?", (added,))
        if self.usage() > self.limit:
            self.evict(int(self.limit * LOW_WATERMARK))

    # -- size limit ---------------------------------------------------------------------------
    def usage(self) -> int:
        return self._db().execute("SELECT bytes FROM usage").fetchone()[0]

    def evict(self, target: int) -> int:
        """Remove least-recently-used unpinned chunks until usage <= ``target``; returns bytes freed."""
        self.flush()
        freed = 0
        with self._tx() as db:  # the write lock is held while victims are chosen and removed
            excess = db.execute("SELECT bytes FROM usage").fetchone()[0] - target
            if excess <= 0:
                return 0
            victims = []
            for h, size in db.execute("SELECT digest, size FROM chunks c WHERE NOT EXISTS "
                                      "(SELECT 1 FROM pins p WHERE p.digest = c.digest) ORDER BY atime"):
                victims.append(h)
                freed += size
                if freed >= excess:
                    break
            self._remove(victims, db)
        self._count(evicted_chunks=len(victims), evicted_bytes=freed)
        if freed < excess:
            log.warning("chunk cache %s: %d bytes over target but the rest is pinned by live mounts",
                        self.root, excess - freed)
        return freed

    def _remove(self, hexes: list[str], db: sqlite3.Connection | None = None) -> None:
        """Delete files and their index rows (inside the caller's transaction if ``db`` is given)."""
        if db is None:
            with self._tx() as db:
                return self._remove(hexes, db)
        for h in hexes:
            try:
                (self.root / "sha256" / h[:2] / h).unlink()
            except FileNotFoundError:
                pass
            row = db.execute("DELETE FROM chunks WHERE digest=? RETURNING size", (h,)).fetchone()
            if row:
                db.execute("UPDATE usage SET bytes = bytes - ?", (row[0],))

    # -- pins ---------------------------------------------------------------------------------
    def pin(self, owner: str, digests: Iterable[bytes | str]) -> None:
        """Protect ``digests`` from eviction on behalf of ``owner`` (e.g. a mount id)."""
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO pins VALUES (?, ?)", ((owner, _hex(d)) for d in digests))

    def unpin(self, owner: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM pins WHERE owner=?", (owner,))

    def owners(self) -> list[str]:
        return [o for (o,) in self._db().execute("SELECT DISTINCT owner FROM pins ORDER BY owner")]

    def info(self) -> dict[str, int]:
        db = self._db()
        return {"bytes": self.usage(), "limit": self.limit,
                "chunks": db.execute("SELECT count(*) FROM chunks").fetchone()[0],
                "pinned_chunks": db.execute("SELECT count(DISTINCT digest) FROM pins").fetchone()[0]}

    def close(self) -> None:
        self.flush()
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
