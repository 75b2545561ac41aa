"""The bootstrap: an image's metadata as one SQLite database (format version 1).

It holds the merged file tree (inodes, directory entries, xattrs, per-file chunk lists), the chunk
table (blobs, frames, chunks) and the prefetch order. SQLite gives what a lazy filesystem needs: a
lookup by (parent inode, name) or by inode touches a few pages, never the whole file, and the
snapshotter can open the database straight from its local copy. The schema is the contract; it is
specified in docs/format.md, and :data:`SCHEMA` here is its single source of truth.

The writer is deterministic: the same tree and table give the same bytes (rows are inserted in a fixed
order into a fresh database that is then compacted with ``VACUUM INTO``).
"""
from __future__ import annotations

import bisect
import os
import sqlite3
import struct
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from remora.errors import InvalidInput, NotFound
from remora.format import FORMAT_VERSION
from remora.format.chunktable import Chunk, ChunkTable, Frame
from remora.format.sqlguard import DB_ERRORS, check_schema, connect, database_error, step_budget
from remora.format.tree import Tree, split_path

ROOT_INO = 1
_EXTENT = struct.Struct("<QI")  # (file offset, chunk id) per chunk of a regular file

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE blobs (id INTEGER PRIMARY KEY, digest TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE frames (id INTEGER PRIMARY KEY, blob INTEGER NOT NULL, offset INTEGER NOT NULL,
                     csize INTEGER NOT NULL, usize INTEGER NOT NULL);
CREATE TABLE chunks (id INTEGER PRIMARY KEY, digest BLOB NOT NULL, size INTEGER NOT NULL,
                     frame INTEGER NOT NULL, frame_offset INTEGER NOT NULL);
CREATE TABLE inodes (ino INTEGER PRIMARY KEY, mode INTEGER NOT NULL, uid INTEGER NOT NULL,
                     gid INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                     rdev INTEGER NOT NULL, nlink INTEGER NOT NULL, target BLOB, extents BLOB);
CREATE TABLE dirents (parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL,
                      PRIMARY KEY (parent, name)) WITHOUT ROWID;
CREATE TABLE xattrs (ino INTEGER NOT NULL, name TEXT NOT NULL, value BLOB NOT NULL,
                     PRIMARY KEY (ino, name)) WITHOUT ROWID;
CREATE TABLE prefetch (seq INTEGER PRIMARY KEY, ino INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class InodeRecord:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int
    nlink: int
    target: bytes | None


@dataclass(frozen=True, slots=True)
class Extent:
    """A piece of a regular file: ``file_offset`` .. + ``chunk.size`` is chunk ``chunk_id``."""

    file_offset: int
    chunk_id: int
    chunk: Chunk
    frame: Frame
    blob: str


def write_bootstrap(path: Path, tree: Tree, table: ChunkTable, prefetch: Iterable[int] = (),
                    meta: dict[str, str] | None = None) -> None:
    """Write ``tree`` (already numbered with :meth:`Tree.number`) and ``table`` to ``path``."""
    path = Path(path)
    path.unlink(missing_ok=True)
    # Built in memory (no temporary file to write page by page), then compacted into ``path``:
    # VACUUM INTO writes the same bytes whatever the source database lives on.
    db = sqlite3.connect(":memory:", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA page_size=4096")
        db.executescript(SCHEMA)
        db.execute("BEGIN")
        info = {"format_version": str(FORMAT_VERSION), **(meta or {})}
        db.executemany("INSERT INTO meta VALUES (?, ?)", sorted(info.items()))
        db.executemany("INSERT INTO blobs VALUES (?, ?, ?)", ((i, d, s) for i, (d, s) in enumerate(table.blobs)))
        db.executemany("INSERT INTO frames VALUES (?, ?, ?, ?, ?)",
                       ((i, f.blob, f.offset, f.csize, f.usize) for i, f in enumerate(table.frames)))
        db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?)",
                       ((i, c.digest, c.size, c.frame, c.frame_offset) for i, c in enumerate(table.chunks)))
        inodes: list[tuple[object, ...]] = []
        dirents: list[tuple[int, bytes, int]] = []
        xattrs: list[tuple[int, str, bytes]] = []
        seen: set[int] = set()
        by_digest, pack = table.by_digest, _EXTENT.pack
        # Tree.walk's order (depth first, names sorted), one sort per directory for both the
        # walk and its entries: this loop runs once per file of the image.
        stack = [tree.root]
        while stack:
            node = stack.pop()
            children = node.children
            if children:
                names = sorted(children)
                ino = node.ino
                dirents.extend([(ino, name, children[name].ino) for name in names])
                stack.extend([children[name] for name in reversed(names)])
            if node.ino in seen:
                continue
            seen.add(node.ino)
            extents = None
            chunks = node.chunks
            if chunks is not None:
                if len(chunks) == 1:
                    ref = chunks[0]
                    extents, off = pack(0, by_digest[ref.digest]), ref.size
                else:
                    buf, off = bytearray(), 0
                    for ref in chunks:
                        buf += pack(off, by_digest[ref.digest])
                        off += ref.size
                    extents = bytes(buf)
                if off != node.size:
                    raise InvalidInput(f"inode {node.ino}: chunks cover {off} bytes, size is {node.size}")
            inodes.append((node.ino, node.mode, node.uid, node.gid, node.size, node.mtime_ns, node.rdev,
                           node.nlink, node.target, extents))
            if node.xattrs:
                xattrs.extend((node.ino, k, v) for k, v in sorted(node.xattrs.items()))
        inodes.sort()
        db.executemany("INSERT INTO inodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", inodes)
        db.executemany("INSERT INTO dirents VALUES (?, ?, ?)", dirents)
        db.executemany("INSERT INTO xattrs VALUES (?, ?, ?)", xattrs)
        db.executemany("INSERT INTO prefetch VALUES (?, ?)", enumerate(prefetch))
        db.execute("COMMIT")
        db.execute("VACUUM INTO ?", (str(path),))
    finally:
        db.close()


def write_chunk_table(path: Path, table: ChunkTable, meta: dict[str, str] | None = None) -> None:
    """A chunk dictionary file: a bootstrap with the chunk table and no tree."""
    write_bootstrap(path, Tree(), table, meta={"kind": "chunk-dict", **(meta or {})})


class Bootstrap:
    """Read-only access to a bootstrap file.

    Thread-safe: a connection is never used by two threads at once. Callers on many threads borrow
    one from a pool (:meth:`pooled`) rather than keeping one per thread: a FUSE server's worker
    threads come and go, and opening a connection costs more than most lookups.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise NotFound(f"bootstrap {self.path} not found")
        self._pool: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._steps = step_budget(self.path)
        self._db = self._connect()
        try:
            # Cheap (sqlite_master only) and before any user table is read: a view or trigger never
            # runs here. The full check is remora.format.validate, run when a bootstrap is fetched.
            check_schema(self._db, SCHEMA, str(self.path))
            self.meta = dict(self._db.execute("SELECT key, value FROM meta"))
            if self.meta.get("format_version") != str(FORMAT_VERSION):
                raise InvalidInput(f"{self.path}: bootstrap format version {self.meta.get('format_version')!r}, "
                                   f"this remora reads {FORMAT_VERSION}")
            self.blobs: list[str] = [d for (d,) in self._db.execute("SELECT digest FROM blobs ORDER BY id")]
            self._blob_sizes: list[int] = [s for (s,) in self._db.execute("SELECT size FROM blobs ORDER BY id")]
        except DB_ERRORS as exc:
            self._db.close()
            raise database_error(exc, str(self.path)) from None
        except BaseException:
            self._db.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        """Read-only, immutable, ``trusted_schema=OFF``, every statement under a work budget
        proportional to the file's size (remora.format.sqlguard)."""
        try:
            return connect(self.path, steps=self._steps, per_statement=True, check_same_thread=False)
        except DB_ERRORS as exc:
            raise database_error(exc, str(self.path)) from None

    def connection(self) -> sqlite3.Connection:
        """A new connection for another thread (sqlite3 connections are not shared across threads)."""
        return self._connect()

    @contextmanager
    def pooled(self) -> Iterator[sqlite3.Connection]:
        """Borrow a connection for the duration of one operation (returned to the pool after)."""
        with self._pool_lock:
            db = self._pool.pop() if self._pool else None
        if db is None:
            db = self._connect()
        try:
            yield db
        finally:
            with self._pool_lock:
                self._pool.append(db)

    def xattr_inodes(self) -> frozenset[int]:
        """Inodes that carry extended attributes (often none: then a FUSE server can tell the kernel
        to stop asking)."""
        return frozenset(i for (i,) in self._db.execute("SELECT DISTINCT ino FROM xattrs"))

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for db in pool:
            db.close()
        self._db.close()

    # -- tree ---------------------------------------------------------------------------------
    _INODE_COLS = "ino, mode, uid, gid, size, mtime_ns, rdev, nlink, target"

    def getattr(self, ino: int, db: sqlite3.Connection | None = None) -> InodeRecord:
        row = (db or self._db).execute(f"SELECT {self._INODE_COLS} FROM inodes WHERE ino=?", (ino,)).fetchone()
        if row is None:
            raise NotFound(f"inode {ino}")
        return InodeRecord(*row)

    def lookup(self, parent: int, name: bytes, db: sqlite3.Connection | None = None) -> InodeRecord | None:
        row = (db or self._db).execute(
            f"SELECT {', '.join('i.' + c.strip() for c in self._INODE_COLS.split(','))} FROM dirents d "
            "JOIN inodes i ON i.ino = d.ino WHERE d.parent=? AND d.name=?", (parent, name)).fetchone()
        return InodeRecord(*row) if row else None

    def lookup_path(self, path: bytes | str) -> InodeRecord | None:
        """Resolve an absolute path (symlinks are not followed)."""
        node = self.getattr(ROOT_INO)
        for part in split_path(path):
            child = self.lookup(node.ino, part)
            if child is None:
                return None
            node = child
        return node

    def readdir(self, ino: int, after: bytes = b"", db: sqlite3.Connection | None = None,
                limit: int = -1) -> list[tuple[bytes, InodeRecord]]:
        """Entries of directory ``ino`` with names sorted as bytes and greater than ``after``."""
        cols = ", ".join("i." + c.strip() for c in self._INODE_COLS.split(","))
        rows = (db or self._db).execute(
            f"SELECT d.name, {cols} FROM dirents d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent=? AND d.name>? ORDER BY d.name LIMIT ?", (ino, after, limit))
        return [(r[0], InodeRecord(*r[1:])) for r in rows]

    def xattrs(self, ino: int, db: sqlite3.Connection | None = None) -> dict[str, bytes]:
        return dict((db or self._db).execute("SELECT name, value FROM xattrs WHERE ino=?", (ino,)))

    def extents(self, ino: int, db: sqlite3.Connection | None = None) -> list[tuple[int, int]]:
        """``[(file offset, chunk id), ...]`` of a regular file, in file order."""
        row = (db or self._db).execute("SELECT extents FROM inodes WHERE ino=?", (ino,)).fetchone()
        if row is None:
            raise NotFound(f"inode {ino}")
        return list(_EXTENT.iter_unpack(row[0])) if row[0] else []

    def read_plan(self, ino: int, offset: int, size: int, extents: list[tuple[int, int]] | None = None,
                  db: sqlite3.Connection | None = None) -> list[Extent]:
        """The chunks covering bytes ``[offset, offset+size)`` of file ``ino``, with their locations."""
        ext = extents if extents is not None else self.extents(ino, db)
        if not ext or size <= 0:
            return []
        starts = [e[0] for e in ext]
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        out = []
        end = offset + size
        while i < len(ext) and ext[i][0] < end:
            out.append(self.extent(ext[i][0], ext[i][1], db))
            i += 1
        return out

    def extent(self, file_offset: int, chunk_id: int, db: sqlite3.Connection | None = None) -> Extent:
        row = (db or self._db).execute(
            "SELECT c.digest, c.size, c.frame, c.frame_offset, f.blob, f.offset, f.csize, f.usize "
            "FROM chunks c JOIN frames f ON f.id = c.frame WHERE c.id=?", (chunk_id,)).fetchone()
        if row is None:
            raise InvalidInput(f"bootstrap: chunk {chunk_id} missing from the chunk table")
        chunk = Chunk(row[0], row[1], row[2], row[3])
        frame = Frame(row[4], row[5], row[6], row[7])
        return Extent(file_offset, chunk_id, chunk, frame, self.blobs[frame.blob])

    def frame_chunks(self, frame_id: int, db: sqlite3.Connection | None = None) -> list[Chunk]:
        """Every chunk stored in one frame (a fetched frame fills the cache with all of them)."""
        return [Chunk(*r) for r in (db or self._db).execute(
            "SELECT digest, size, frame, frame_offset FROM chunks WHERE frame=? ORDER BY frame_offset", (frame_id,))]

    def walk(self) -> Iterator[tuple[bytes, InodeRecord]]:
        """Every path, depth first in name order (hard links appear once per path)."""
        stack = [(b"/", self.getattr(ROOT_INO))]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.mode & 0o170000 == 0o040000:
                prefix = path if path.endswith(b"/") else path + b"/"
                for name, child in reversed(self.readdir(node.ino)):
                    stack.append((prefix + name, child))

    def prefetch_inodes(self) -> list[int]:
        return [i for (i,) in self._db.execute("SELECT ino FROM prefetch ORDER BY seq")]

    def paths_of(self, inos: Iterable[int]) -> dict[int, bytes]:
        """One absolute path of each inode in ``inos`` (for a hard link, any of its names); inodes
        not in the tree are left out. One pass over the directory entries (dirents are keyed by
        parent, not by inode), so call it for many inodes at once."""
        want = set(inos)
        parent: dict[int, tuple[int, bytes]] = {}
        for p, name, ino in self._db.execute("SELECT parent, name, ino FROM dirents"):
            parent.setdefault(ino, (p, name))
        out = {}
        for ino in want:
            parts: list[bytes] = []
            cur = ino
            while cur != ROOT_INO and cur in parent and len(parts) < 4096:
                cur, name = parent[cur]
                parts.append(name)
            if cur == ROOT_INO:
                out[ino] = b"/" + b"/".join(reversed(parts))
        return out

    # -- chunk table --------------------------------------------------------------------------
    def chunk_table(self) -> ChunkTable:
        """Load the whole chunk table (for chunk dictionaries, checks and statistics)."""
        t = ChunkTable()
        for digest, size in zip(self.blobs, self._blob_sizes):
            t.blob_id(digest, size)
        for blob, off, csize, usize in self._db.execute("SELECT blob, offset, csize, usize FROM frames ORDER BY id"):
            t.frames.append(Frame(blob, off, csize, usize))
        chunks = self._db.execute("SELECT digest, size, frame, frame_offset FROM chunks ORDER BY id")
        for digest, size, frame, foff in chunks:
            t.by_digest.setdefault(digest, len(t.chunks))
            t.chunks.append(Chunk(digest, size, frame, foff))
        return t

    def blob_size(self, index: int) -> int:
        return self._blob_sizes[index]

    def stats(self) -> dict[str, int]:
        def q(sql: str) -> int:
            value: int = self._db.execute(sql).fetchone()[0] or 0
            return value

        return {"inodes": q("SELECT count(*) FROM inodes"), "chunks": q("SELECT count(*) FROM chunks"),
                "frames": q("SELECT count(*) FROM frames"), "blobs": len(self.blobs),
                "bytes": q("SELECT sum(size) FROM inodes WHERE extents IS NOT NULL"),
                "bootstrap_size": os.path.getsize(self.path)}
