"""A content-addressed chunk cache on local disk, shared by every mount process, split in partitions.

Layout::

    ROOT/sha256/ab/<64 hex>     partition "" (shared): one file per chunk, named by the sha256 of its bytes
    ROOT/parts/<P>/sha256/ab/<64 hex>   partition P (e.g. ``ns-default``): the same, for one tenant only
    ROOT/tmp/                   half-written chunks (renamed into place, so readers never see them)
    ROOT/index.db               SQLite (WAL): partition, size and last access of every chunk, and the pins

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
* **Partitions** (``ChunkCache(root, limit, partition="ns-a")``) isolate tenants. A chunk is looked up
  only in the instance's own partition, so knowing a digest is not enough to read another tenant's
  chunk: the bytes must come from a source that tenant may read (docs/snapshotter.md, "Cache
  isolation"). The price is that identical chunks are stored (and fetched) once per partition. The
  size limit is global; eviction is max-min fair: the target is split by water-filling (a partition
  using less than an equal share keeps everything), each partition over its share loses its own
  least-recently-used unpinned chunks first, so one tenant's churn cannot flush another's cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from remora.errors import InvalidInput, StorageError

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 10 << 30
LOW_WATERMARK = 0.9          # evict down to this fraction of the limit, so eviction is not per put
TOUCH_FLUSH_SECONDS = 2.0
TOUCH_FLUSH_COUNT = 512

SHARED = ""                  # the partition of ``--cache-isolation none``: ROOT/sha256, as before partitions
_PARTITION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# Version 2 (partitions) uses new table names: the tables of version 1 (chunks, pins, usage) are copied
# once into partition "" and left in place, so an fs process of the previous version that outlives an
# upgrade (mounts survive snapshotter restarts) keeps writing to tables it knows instead of failing.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pchunks (part TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL,
    atime REAL NOT NULL, PRIMARY KEY (part, digest)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pchunks_atime ON pchunks (atime);
CREATE INDEX IF NOT EXISTS pchunks_part_atime ON pchunks (part, atime);
CREATE TABLE IF NOT EXISTS ppins (owner TEXT NOT NULL, part TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (owner, part, digest)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ppins_digest ON ppins (part, digest);
CREATE TABLE IF NOT EXISTS pusage (part TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
"""
_SCHEMA_VERSION = 2


def check_partition(name: str) -> str:
    """A partition name is a single path component: letters, digits, ``_.-`` (max 128), or "" (shared)."""
    if name != SHARED and not _PARTITION_RE.match(name):
        raise InvalidInput(f"bad cache partition name {name!r}: use letters, digits, '.', '_', '-' (max 128)")
    return name


def fair_quotas(usage: dict[str, int], target: int) -> dict[str, int]:
    """Max-min fair split of ``target`` bytes over partitions using ``usage`` bytes (water-filling):
    a partition using less than the level keeps all it has, the others are cut to the common level."""
    quotas: dict[str, int] = {}
    remaining, left = max(target, 0), len(usage)
    for part, used in sorted(usage.items(), key=lambda kv: kv[1]):
        level = remaining // left
        quotas[part] = min(used, level)
        remaining -= quotas[part]
        left -= 1
    return quotas


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


def partition_dir(root: Path, part: str) -> Path:
    """Where partition ``part``'s chunk files live (``root`` itself for the shared partition)."""
    return root if part == SHARED else root / "parts" / check_partition(part)


class ChunkCache:
    """``ChunkCache(root, limit_bytes, partition="")``: ``get(digest)`` -> bytes or None, ``put(digest, data)``.

    Thread-safe and multi-process safe. ``digest`` arguments are raw 32-byte sha256 digests (as in the
    bootstrap's chunk table) or ``sha256:<hex>`` strings. Every read, write and pin of an instance is
    confined to its ``partition``; ``limit_bytes`` bounds all partitions together. Counters (``hits``,
    ``misses``, ``corrupt``, ``evicted_chunks``, ``evicted_bytes``, ``stored_bytes``) are per process,
    for metrics.
    """

    def __init__(self, root: Path | str, limit_bytes: int = DEFAULT_LIMIT, partition: str = SHARED):
        self.root = Path(root)
        self.partition = check_partition(partition)
        self.dir = partition_dir(self.root, self.partition)
        self.limit = int(limit_bytes)
        if self.limit <= 0:
            raise InvalidInput(f"cache size limit must be positive, got {limit_bytes}")
        try:
            (self.root / "sha256").mkdir(parents=True, exist_ok=True)
            (self.dir / "sha256").mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create chunk cache at {self.dir}: {exc}") from None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}
        self._last_flush = time.monotonic()
        self.hits = self.misses = self.corrupt = 0
        self.evicted_chunks = self.evicted_bytes = self.stored_bytes = 0
        self._clean_tmp()
        new_index = not (self.root / "index.db").exists()
        self._open_index(new_index)

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
        return self.dir / "sha256" / h[:2] / h

    def _open_index(self, new_index: bool) -> None:
        """Create the tables; on the first open of a version-1 index, copy its rows into partition ""."""
        db = self._db()
        if db.execute("PRAGMA user_version").fetchone()[0] >= _SCHEMA_VERSION:
            return
        with self._tx() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] >= _SCHEMA_VERSION:
                return  # another process did it meanwhile
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)
            old = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "chunks" in old:
                db.execute("INSERT OR IGNORE INTO pchunks SELECT '', digest, size, atime FROM chunks")
            if "pins" in old:
                db.execute("INSERT OR IGNORE INTO ppins SELECT owner, '', digest FROM pins")
            db.execute("INSERT OR REPLACE INTO pusage SELECT part, sum(size) FROM pchunks GROUP BY part")
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        if new_index:
            self._rebuild_index()

    def _partitions_on_disk(self):
        yield SHARED, self.root
        parts = self.root / "parts"
        if parts.is_dir():
            for d in parts.iterdir():
                if _PARTITION_RE.match(d.name) and d.is_dir():
                    yield d.name, d

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
        for part, base in self._partitions_on_disk():
            if not (base / "sha256").is_dir():
                continue
            for sub in (base / "sha256").iterdir():
                for f in sub.iterdir():
                    try:
                        st = f.stat()
                    except FileNotFoundError:
                        continue
                    rows.append((part, f.name, st.st_size, st.st_mtime))
        if rows:
            with self._tx() as db:
                db.executemany("INSERT OR IGNORE INTO pchunks VALUES (?, ?, ?, ?)", rows)
                db.execute("DELETE FROM pusage")
                db.execute("INSERT INTO pusage SELECT part, sum(size) FROM pchunks GROUP BY part")
            log.info("chunk cache %s: rebuilt index of %d chunks", self.root, len(rows))

    # -- reads --------------------------------------------------------------------------------
    def contains(self, digest: bytes | str) -> bool:
        """Cheap existence test (no verification): for planning fetches, not for serving data."""
        return self.path(digest).exists()

    def get(self, digest: bytes | str) -> bytes | None:
        """The chunk's bytes, verified against ``digest``; ``None`` if absent or corrupt (then removed)."""
        h = _hex(digest)
        p = self.dir / "sha256" / h[:2] / h
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
                db.executemany("UPDATE pchunks SET atime=? WHERE part=? AND digest=? AND atime<?",
                               ((t, self.partition, h, t) for h, t in touched.items()))

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
            final = self.dir / "sha256" / h[:2] / h
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
        part = self.partition
        with self._tx() as db:
            added = 0
            for h, size, t in rows:
                if db.execute("UPDATE pchunks SET atime=? WHERE part=? AND digest=?", (t, part, h)).rowcount == 0:
                    db.execute("INSERT INTO pchunks VALUES (?, ?, ?, ?)", (part, h, size, t))
                    added += size
            if added:
                db.execute("INSERT INTO pusage VALUES (?, ?) ON CONFLICT (part) DO UPDATE SET bytes = bytes + ?",
                           (part, added, added))
        if self.usage() > self.limit:
            self.evict(int(self.limit * LOW_WATERMARK))

    # -- size limit ---------------------------------------------------------------------------
    def usage(self) -> int:
        """Bytes in all partitions together (what the limit bounds)."""
        return self._db().execute("SELECT coalesce(sum(bytes), 0) FROM pusage").fetchone()[0]

    def partition_usage(self, part: str | None = None) -> int:
        row = self._db().execute("SELECT bytes FROM pusage WHERE part=?",
                                 (self.partition if part is None else part,)).fetchone()
        return row[0] if row else 0

    _UNPINNED = ("NOT EXISTS (SELECT 1 FROM ppins p WHERE p.part = c.part AND p.digest = c.digest)")

    def evict(self, target: int) -> int:
        """Remove unpinned chunks until usage <= ``target``, fairly (see the module docstring): each
        partition over its water-filling share loses its own least-recently-used chunks first; if
        pins keep some from reaching their share, the rest goes in global LRU order. Returns bytes freed."""
        self.flush()
        freed = 0
        victims: list[tuple[str, str]] = []
        with self._tx() as db:  # the write lock is held while victims are chosen and removed
            usage = dict(db.execute("SELECT part, bytes FROM pusage WHERE bytes > 0"))
            excess = sum(usage.values()) - target
            if excess <= 0:
                return 0
            chosen: set[tuple[str, str]] = set()
            for part, quota in fair_quotas(usage, target).items():
                over = usage[part] - quota
                got = 0
                if over <= 0:
                    continue
                for h, size in db.execute(f"SELECT digest, size FROM pchunks c WHERE part=? AND {self._UNPINNED} "
                                          "ORDER BY atime", (part,)):
                    victims.append((part, h))
                    chosen.add((part, h))
                    got += size
                    if got >= over:
                        break
                freed += got
            if freed < excess:  # some partitions are pinned below their share: take from the others
                for part, h, size in db.execute(f"SELECT part, digest, size FROM pchunks c WHERE {self._UNPINNED} "
                                                "ORDER BY atime"):
                    if (part, h) in chosen:
                        continue
                    victims.append((part, h))
                    freed += size
                    if freed >= excess:
                        break
            self._remove(victims, db)
        self._count(evicted_chunks=len(victims), evicted_bytes=freed)
        if freed < excess:
            log.warning("chunk cache %s: %d bytes over target but the rest is pinned by live mounts",
                        self.root, excess - freed)
        return freed

    def _remove(self, victims: list[str] | list[tuple[str, str]], db: sqlite3.Connection | None = None) -> None:
        """Delete files and their index rows (inside the caller's transaction if ``db`` is given).
        ``victims``: hex digests of this partition, or ``(partition, hex)`` pairs."""
        if db is None:
            with self._tx() as db:
                return self._remove(victims, db)
        for v in victims:
            part, h = v if isinstance(v, tuple) else (self.partition, v)
            try:
                (partition_dir(self.root, part) / "sha256" / h[:2] / h).unlink()
            except FileNotFoundError:
                pass
            row = db.execute("DELETE FROM pchunks WHERE part=? AND digest=? RETURNING size", (part, h)).fetchone()
            if row:
                db.execute("UPDATE pusage SET bytes = bytes - ? WHERE part=?", (row[0], part))

    def drop_partition(self, part: str) -> int:
        """Delete every chunk of partition ``part`` (a throw-away partition whose mount is gone);
        returns the bytes freed. Refused while a mount pins chunks in it."""
        if check_partition(part) == SHARED:
            raise InvalidInput("the shared cache partition cannot be dropped")
        with self._tx() as db:
            if db.execute("SELECT 1 FROM ppins WHERE part=? LIMIT 1", (part,)).fetchone():
                raise InvalidInput(f"cache partition {part!r} is pinned by a live mount")
            row = db.execute("DELETE FROM pusage WHERE part=? RETURNING bytes", (part,)).fetchone()
            db.execute("DELETE FROM pchunks WHERE part=?", (part,))
            shutil.rmtree(partition_dir(self.root, part), ignore_errors=True)
        return row[0] if row else 0

    # -- pins ---------------------------------------------------------------------------------
    def pin(self, owner: str, digests: Iterable[bytes | str]) -> None:
        """Protect ``digests`` (in this partition) from eviction on behalf of ``owner`` (e.g. a mount id)."""
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO ppins VALUES (?, ?, ?)",
                           ((owner, self.partition, _hex(d)) for d in digests))

    def unpin(self, owner: str) -> None:
        """Drop every pin of ``owner``, in whichever partition."""
        with self._tx() as db:
            db.execute("DELETE FROM ppins WHERE owner=?", (owner,))

    def owners(self) -> list[str]:
        return [o for (o,) in self._db().execute("SELECT DISTINCT owner FROM ppins ORDER BY owner")]

    def info(self) -> dict:
        """Totals over all partitions (``bytes``, ``limit``, ``chunks``, ``pinned_chunks``) and the same
        per partition under ``partitions`` (see :func:`partition_info`)."""
        return index_info(self._db(), self.limit)

    def close(self) -> None:
        self.flush()
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def index_info(db: sqlite3.Connection, limit: int) -> dict:
    """Totals and per-partition figures from an open index (also used read-only by ``remora stats``)."""
    parts: dict[str, dict[str, int]] = {}
    for part, nbytes in db.execute("SELECT part, bytes FROM pusage"):
        parts[part] = {"bytes": nbytes, "chunks": 0, "pinned_chunks": 0}
    for part, n in db.execute("SELECT part, count(*) FROM pchunks GROUP BY part"):
        parts.setdefault(part, {"bytes": 0, "chunks": 0, "pinned_chunks": 0})["chunks"] = n
    for part, n in db.execute("SELECT part, count(DISTINCT digest) FROM ppins GROUP BY part"):
        parts.setdefault(part, {"bytes": 0, "chunks": 0, "pinned_chunks": 0})["pinned_chunks"] = n
    parts = {p: v for p, v in parts.items() if v["bytes"] or v["chunks"] or v["pinned_chunks"]}
    return {"bytes": sum(v["bytes"] for v in parts.values()), "limit": limit,
            "chunks": sum(v["chunks"] for v in parts.values()),
            "pinned_chunks": sum(v["pinned_chunks"] for v in parts.values()), "partitions": parts}
