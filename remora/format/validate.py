"""One validator for bootstrap files, run before a bootstrap is used at all.

``remora check``, ``remora unpack``, ``remora dict build`` and the snapshotter read bootstraps that
anyone able to push an image can write. The reader (:class:`remora.format.bootstrap.Bootstrap`) and
everything built on it assume what remora's writer guarantees; this module checks exactly that, so a
hostile but digest-valid bootstrap is refused with :class:`~remora.errors.InvalidInput` (exit 3)
instead of hanging a command, looping, or steering unpack outside its target:

1. the file is an SQLite database in rollback-journal mode, of bounded size;
2. its schema is exactly :data:`~remora.format.bootstrap.SCHEMA` (tables, columns, keys; no view,
   trigger, extra index or other object), before any user table is read;
3. ``PRAGMA quick_check`` passes;
4. ``meta`` holds text, and a format version this remora reads;
5. every column holds the type and range the writer puts there; ids of blobs, frames and chunks are
   ``0..n-1``; frames lie inside their blob, chunks inside their frame;
6. every directory entry's name is one path component (not empty, no ``/``, no NUL, not ``.`` or
   ``..``, at most 255 bytes), (parent, name) is unique, the parent is a directory;
7. the tree is a tree: the root is a directory with no entry, every other directory has exactly one
   entry and is reachable from the root (so there is no loop), every other inode has at least one
   entry (hard links: several entries, never to a directory);
8. every regular file's extents are contiguous from 0, name existing chunks, and cover its size;
   symlinks have a target, other inodes none;
9. xattrs and the prefetch list name existing inodes.

All of it runs under a bounded SQLite work budget (VM steps proportional to the file's size and a
wall-clock deadline) and with memory proportional to the chunk count, never to anything a row says.
"""
from __future__ import annotations

import sqlite3
import stat
import struct
from array import array
from pathlib import Path
from typing import Any

from remora.errors import InvalidInput
from remora.format import FORMAT_VERSION
from remora.format.blob import TAR_HEADER_SIZE
from remora.format.bootstrap import ROOT_INO, SCHEMA
from remora.format.bootstrap_layer import MAX_BOOTSTRAP_USIZE
from remora.format.sqlguard import DB_ERRORS, check_schema, connect, database_error, step_budget

MAX_ROWS = 50_000_000            # per table
MAX_BLOBS = 1_000_000            # the reader keeps blob digests in memory
MAX_META_ROWS = 10_000
MAX_FRAME_USIZE = 256 << 20      # a frame holds whole chunks (at most 16 MiB each) batched together
MAX_NAME = 255                   # NAME_MAX
MAX_TARGET = 4095                # PATH_MAX - 1
MAX_XATTR_VALUE = 64 * 1024      # XATTR_SIZE_MAX
MAX_OFFSET = 1 << 50             # any size or offset past this is not a real file or blob
DEADLINE_SECONDS = 300.0
_EXTENT = struct.Struct("<QI")
_FILE_TYPES = (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)
_SQLITE_MAGIC = b"SQLite format 3\0"


def validate_bootstrap(path: Path | str, *, require_tree: bool = True, seconds: float = DEADLINE_SECONDS,
                       steps: int | None = None, max_rows: int = MAX_ROWS) -> None:
    """Raise :class:`InvalidInput` unless ``path`` is a bootstrap exactly as remora writes it.

    ``require_tree=False`` accepts a chunk dictionary (a chunk table with no tree: no directory
    entries and at most the unnumbered root inode). ``seconds``/``steps`` bound the work."""
    path = Path(path)
    where = f"bootstrap {path.name}"
    _check_header(path, where)
    db = None
    try:
        db = connect(path, steps=steps if steps is not None else step_budget(path), seconds=seconds)
        check_schema(db, SCHEMA, where)
        _Validator(db, where, require_tree, max_rows).run()
    except DB_ERRORS as exc:
        raise database_error(exc, where) from None
    finally:
        if db is not None:
            db.close()


def _check_header(path: Path, where: str) -> None:
    try:
        st = path.stat()
        with open(path, "rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        raise InvalidInput(f"{where}: no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"{where}: not a regular file")
    if st.st_size > MAX_BOOTSTRAP_USIZE:
        raise InvalidInput(f"{where}: {st.st_size} bytes, over the {MAX_BOOTSTRAP_USIZE}-byte limit")
    if len(head) < 100 or not head.startswith(_SQLITE_MAGIC):
        raise InvalidInput(f"{where}: not an SQLite database")
    if head[18] != 1 or head[19] != 1:   # WAL (2) would need side files; remora writes rollback mode
        raise InvalidInput(f"{where}: not in rollback-journal mode (file format {head[18]}/{head[19]})")


class _Validator:
    def __init__(self, db: sqlite3.Connection, where: str, require_tree: bool, max_rows: int):
        self.db, self.where, self.require_tree, self.max_rows = db, where, require_tree, max_rows

    def fail(self, msg: str) -> None:
        raise InvalidInput(f"{self.where}: {msg}")

    def one(self, sql: str, *args: object) -> Any:
        return self.db.execute(sql, args).fetchone()

    def bad(self, table: str, key: str, *pairs: str) -> None:
        """Fail with the first row of ``table`` matching one of the checks, given as pairs
        ``where_sql, what``. One scan for all of them; per-check queries run only to name a failure."""
        checks = list(zip(pairs[::2], pairs[1::2]))
        if len(checks) > 1 and self.one(f"SELECT 1 FROM {table} WHERE "
                                        f"{' OR '.join(f'({c})' for c, _ in checks)} LIMIT 1") is None:
            return
        for where_sql, what in checks:
            row = self.one(f"SELECT {key} FROM {table} WHERE {where_sql} LIMIT 1")
            if row is not None:
                self.fail(f"{table} row {row[0]!r}: {what}")

    def count(self, table: str) -> int:
        n: int = self.one(f"SELECT count(*) FROM {table}")[0]
        if n > self.max_rows:
            self.fail(f"{table} has {n} rows, over the {self.max_rows} limit")
        return n

    def run(self) -> None:
        verdict = self.one("PRAGMA quick_check(1)")
        if verdict is None or verdict[0] != "ok":
            self.fail(f"integrity check failed: {verdict[0] if verdict else 'no answer'}")
        self.meta()
        nblobs, nframes, nchunks = self.chunk_table()
        chunk_sizes = self.chunk_sizes(nchunks)
        ninodes, ndirents = self.count("inodes"), self.count("dirents")
        if not self.require_tree and ndirents == 0 and ninodes <= 1:
            if ninodes and self.one("SELECT mode & 61440 FROM inodes")[0] != stat.S_IFDIR:
                self.fail("a chunk dictionary's only inode must be its empty root directory")
            for table in ("xattrs", "prefetch"):
                if self.count(table):
                    self.fail(f"a chunk dictionary with no tree has {table} rows")
            return
        self.inodes(chunk_sizes)
        self.dirents()
        self.tree(ninodes)
        self.xattrs_and_prefetch()

    # -- meta and chunk table ------------------------------------------------------------------
    def meta(self) -> None:
        n = self.one("SELECT count(*) FROM meta")[0]
        if n > MAX_META_ROWS:
            self.fail(f"meta has {n} rows, over the {MAX_META_ROWS} limit")
        self.bad("meta", "key", "typeof(key) != 'text' OR typeof(value) != 'text'", "key and value must be text")
        row = self.one("SELECT value FROM meta WHERE key = 'format_version'")
        if row is None:
            self.fail("meta has no format_version")
        if row[0] != str(FORMAT_VERSION):
            self.fail(f"bootstrap format version {row[0][:20]!r}, this remora reads {FORMAT_VERSION}")

    def ids(self, table: str, col: str = "id") -> int:
        n = self.count(table)
        lo, hi = self.one(f"SELECT min({col}), max({col}) FROM {table}")
        if n and (lo != 0 or hi != n - 1):
            self.fail(f"{table} ids run {lo}..{hi} for {n} rows (must be 0..{n - 1})")
        return n

    def chunk_table(self) -> tuple[int, int, int]:
        nblobs = self.ids("blobs")
        if nblobs > MAX_BLOBS:
            self.fail(f"{nblobs} blobs, over the {MAX_BLOBS} limit")
        self.bad("blobs", "id", "typeof(digest) != 'text' OR length(digest) != 71 OR substr(digest, 1, 7) != 'sha256:' "
                 "OR substr(digest, 8) GLOB '*[^0-9a-f]*' OR typeof(size) != 'integer' OR size < 0 "
                 f"OR size > {MAX_OFFSET}", "bad digest or size")
        dup = self.one("SELECT digest FROM blobs GROUP BY digest HAVING count(*) > 1 LIMIT 1")
        if dup is not None:
            self.fail(f"blob {dup[0]} is listed twice")
        nframes = self.ids("frames")
        self.bad("frames", "id", "typeof(blob) != 'integer' OR typeof(offset) != 'integer' "
                 "OR typeof(csize) != 'integer' "
                 f"OR typeof(usize) != 'integer' OR blob < 0 OR blob >= {nblobs} OR offset < {TAR_HEADER_SIZE} "
                 f"OR offset > {MAX_OFFSET} OR csize <= 0 OR csize > {MAX_OFFSET} OR usize <= 0 "
                 f"OR usize > {MAX_FRAME_USIZE}", "blob, offset or size out of range")
        row = self.one("SELECT f.id FROM frames f JOIN blobs b ON b.id = f.blob "
                       "WHERE f.offset + f.csize > b.size LIMIT 1")
        if row is not None:
            self.fail(f"frame {row[0]} runs past the end of its blob")
        nchunks = self.ids("chunks")
        self.bad("chunks", "id", "typeof(digest) != 'blob' OR length(digest) != 32 OR typeof(size) != 'integer' "
                 f"OR typeof(frame) != 'integer' OR typeof(frame_offset) != 'integer' OR size < 0 "
                 f"OR size > {MAX_FRAME_USIZE} OR frame < 0 OR frame >= {nframes} OR frame_offset < 0 "
                 f"OR frame_offset > {MAX_FRAME_USIZE}", "digest, size or frame out of range")
        row = self.one("SELECT c.id FROM chunks c JOIN frames f ON f.id = c.frame "
                       "WHERE c.frame_offset + c.size > f.usize LIMIT 1")
        if row is not None:
            self.fail(f"chunk {row[0]} runs past the end of its frame")
        return nblobs, nframes, nchunks

    def chunk_sizes(self, nchunks: int) -> array[int]:
        sizes = array("I")            # 4 bytes a chunk: sizes are checked to be under MAX_FRAME_USIZE
        for (size,) in self.db.execute("SELECT size FROM chunks ORDER BY id"):
            sizes.append(size)
        if len(sizes) != nchunks:
            self.fail("chunk table changed while read")
        return sizes

    # -- inodes --------------------------------------------------------------------------------
    def inodes(self, chunk_sizes: array[int]) -> None:
        types = ", ".join(str(t) for t in _FILE_TYPES)
        lnk, reg = stat.S_IFLNK, stat.S_IFREG
        self.bad("inodes", "ino", "typeof(ino) != 'integer' "
                 "OR typeof(mode) != 'integer' OR typeof(uid) != 'integer' OR typeof(gid) != 'integer' "
                 "OR typeof(size) != 'integer' OR typeof(mtime_ns) != 'integer' OR typeof(rdev) != 'integer' "
                 "OR typeof(nlink) != 'integer' OR typeof(target) NOT IN ('blob', 'null') "
                 "OR typeof(extents) NOT IN ('blob', 'null')", "a column of the wrong type",
                 "ino < 1", "inode numbers start at 1 (a tree's root is inode 1)",
                 f"mode < 0 OR mode > 65535 OR (mode & 61440) NOT IN ({types}) "
                 f"OR uid < 0 OR uid > 4294967295 OR gid < 0 OR gid > 4294967295 OR size < 0 OR size > {MAX_OFFSET} "
                 "OR rdev < 0 OR nlink < 1 OR nlink > 4294967295", "mode, owner, size or link count out of range",
                 f"((mode & 61440) = {lnk}) != (target IS NOT NULL) "
                 f"OR length(target) NOT BETWEEN 1 AND {MAX_TARGET} OR instr(target, x'00') > 0",
                 "a symlink needs a target (1..4095 bytes, no NUL) and nothing else may have one",
                 f"(extents IS NOT NULL AND (mode & 61440) != {reg}) "
                 f"OR ((mode & 61440) = {reg} AND size > 0 AND extents IS NULL) OR length(extents) % 12 != 0",
                 "extents on a non-file, a non-empty file without extents, or a torn extent list")
        row = self.one(f"SELECT mode & 61440 FROM inodes WHERE ino = {ROOT_INO}")
        if row is None or row[0] != stat.S_IFDIR:
            self.fail(f"the root inode {ROOT_INO} is missing or not a directory")
        nchunks = len(chunk_sizes)
        for ino, size, blob in self.db.execute("SELECT ino, size, extents FROM inodes WHERE extents IS NOT NULL"):
            covered = 0
            for off, cid in _EXTENT.iter_unpack(blob):
                if off != covered:
                    self.fail(f"inode {ino}: extent at {off}, expected {covered}")
                if cid >= nchunks:
                    self.fail(f"inode {ino}: chunk id {cid} out of range (the table has {nchunks})")
                covered += chunk_sizes[cid]
                if covered > size:
                    self.fail(f"inode {ino}: extents cover more than its size {size}")
            if covered != size:
                self.fail(f"inode {ino}: extents cover {covered} bytes, size is {size}")

    # -- directory entries and the tree --------------------------------------------------------
    def dirents(self) -> None:
        prev: tuple[int, bytes] | None = None
        for parent, name, ino in self.db.execute("SELECT parent, name, ino FROM dirents"):
            if type(parent) is not int or type(ino) is not int or type(name) is not bytes:
                self.fail(f"directory entry {name!r} in {parent!r}: a column of the wrong type")
            if not name or len(name) > MAX_NAME or b"/" in name or b"\0" in name or name in (b".", b".."):
                self.fail(f"directory entry {name[:300]!r} in directory {parent} is not a single path component")
            key = (parent, name)
            if prev is not None and key <= prev:
                self.fail(f"directory {parent} has entry {name!r} twice (or its entries are out of order)")
            prev = key
        row = self.one("SELECT d.parent, d.name FROM dirents d LEFT JOIN inodes i ON i.ino = d.ino "
                       "WHERE i.ino IS NULL LIMIT 1")
        if row is not None:
            self.fail(f"entry {row[1]!r} in directory {row[0]} points at a missing inode")
        row = self.one("SELECT d.parent, d.name FROM dirents d LEFT JOIN inodes p ON p.ino = d.parent "
                       f"WHERE p.ino IS NULL OR (p.mode & 61440) != {stat.S_IFDIR} LIMIT 1")
        if row is not None:
            self.fail(f"entry {row[1]!r} has parent {row[0]}, which is not a directory")
        row = self.one(f"SELECT parent, name FROM dirents WHERE ino = {ROOT_INO} LIMIT 1")
        if row is not None:
            self.fail(f"entry {row[1]!r} in directory {row[0]} points back at the root")

    def tree(self, ninodes: int) -> None:
        row = self.one("SELECT d.ino, count(*) FROM dirents d JOIN inodes i ON i.ino = d.ino "
                       f"WHERE (i.mode & 61440) = {stat.S_IFDIR} GROUP BY d.ino HAVING count(*) > 1 LIMIT 1")
        if row is not None:
            self.fail(f"directory inode {row[0]} has {row[1]} entries (a directory hard link or a loop)")
        referenced = self.one("SELECT count(DISTINCT ino) FROM dirents")[0]
        if referenced != ninodes - 1:
            self.fail(f"{ninodes - 1 - referenced} inodes are not in the tree")
        ndirs = self.one(f"SELECT count(*) FROM inodes WHERE (mode & 61440) = {stat.S_IFDIR}")[0]
        # Every non-root directory has exactly one entry and the root none, so a walk from the root
        # meets each directory at most once; meeting all of them means no directory sits on a loop.
        # The walk is SQLite's (its queue spills to a temp file, not to this process's memory);
        # the LIMIT and the work budget bound it even if the reasoning above had a hole.
        seen = self.one(f"WITH RECURSIVE r(ino) AS (SELECT {ROOT_INO} UNION ALL SELECT d.ino FROM r "
                        f"JOIN dirents d ON d.parent = r.ino JOIN inodes i ON i.ino = d.ino "
                        f"WHERE (i.mode & 61440) = {stat.S_IFDIR} LIMIT {ndirs + 1}) SELECT count(*) FROM r")[0]
        if seen > ndirs:
            self.fail("directory entries form a loop")
        if seen != ndirs:
            self.fail(f"{ndirs - seen} directories are not reachable from the root (a loop of entries)")

    def xattrs_and_prefetch(self) -> None:
        self.count("xattrs")
        self.bad("xattrs", "ino", "typeof(ino) != 'integer' OR typeof(name) != 'text' OR typeof(value) != 'blob' "
                 f"OR length(CAST(name AS BLOB)) NOT BETWEEN 1 AND {MAX_NAME} OR length(value) > {MAX_XATTR_VALUE} "
                 "OR instr(name, char(0)) > 0", "bad xattr name or value")
        for _ in self.db.execute("SELECT name FROM xattrs"):
            pass  # decoding every name: text that is not UTF-8 raises here, not in a reader later
        row = self.one("SELECT x.ino FROM xattrs x LEFT JOIN inodes i ON i.ino = x.ino WHERE i.ino IS NULL LIMIT 1")
        if row is not None:
            self.fail(f"xattrs of missing inode {row[0]}")
        self.count("prefetch")
        self.bad("prefetch", "seq", "typeof(seq) != 'integer' OR typeof(ino) != 'integer'",
                 "a column of the wrong type")
        row = self.one("SELECT p.ino FROM prefetch p LEFT JOIN inodes i ON i.ino = p.ino "
                       "WHERE i.ino IS NULL LIMIT 1")
        if row is not None:
            self.fail(f"prefetch list names missing inode {row[0]}")
