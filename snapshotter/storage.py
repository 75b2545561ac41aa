"""The snapshot metadata store: SQLite (WAL) plus one directory per snapshot.

Its part of the snapshotter root (the whole layout: :mod:`remora.snapshotter.layout`)::

    metadata.db            snapshots table (one row per snapshot, labels as JSON)
    snapshots/<id>/fs      the snapshot's filesystem (overlay upperdir / a lowerdir once committed)
    snapshots/<id>/work    overlay workdir (active snapshots only)
    snapshots/new-XXXX/    a directory being prepared (never referenced by the database)

Crash safety (kill -9 at any instant leaves the old or the new state, never a mix):

* Prepare/View build the directory under a temporary ``new-*`` name first, then, inside ONE
  ``BEGIN IMMEDIATE`` transaction, insert the row, rename the directory to its id, fsync the parent
  directory and COMMIT. Dying before the commit leaves a directory the database does not know.
* Commit is a single UPDATE (the directory keeps its id: children reference parents by id).
* Remove deletes the row and commits, and only then deletes the directory.
* Every directory under ``snapshots/`` whose name is not the id of a row is an orphan; orphans are
  removed on start and by Cleanup. Ids come from ``AUTOINCREMENT`` so a rolled-back id that left an
  orphan is removed before anything can reuse it (and create() clears a stale directory anyway).

Directories never get deleted through a live mount: :func:`remove_tree` detaches any mount below
the path first (a lazily mounted remote layer sits on ``<id>/fs``).

The store is synchronous and thread-safe: writes go through one connection behind a lock (the
gRPC server calls them from worker threads, as they fsync); reads use a per-thread connection
without the lock (WAL readers never wait for the writer), cheap enough to run on the event loop.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from remora.errors import AlreadyExists, InvalidInput, NotFound, RemoraError, StorageError
from remora.mounts import detach_mount, mountpoints_under
from remora.snapshotter.layout import StateLayout

from . import filters as filterlang

log = logging.getLogger(__name__)

# containerd's labels.Validate: key + value of one label at most 4 KiB.
MAX_LABEL_SIZE = 4096


class FailedPrecondition(RemoraError):
    """The snapshot is in the wrong state for the operation (gRPC FAILED_PRECONDITION)."""


class InvalidArgument(InvalidInput):
    """A malformed request: empty key, bad parent kind, unknown update field (gRPC INVALID_ARGUMENT)."""


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as containerd's snapshots API enum."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass
class Info:
    """What containerd sees of a snapshot (snapshots.Info)."""

    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Snapshot:
    """Where a snapshot lives on disk: its id and its parents' ids, child-most first."""

    id: str
    kind: Kind
    parent_ids: list[str]
    remote: bool = False


@dataclass
class Usage:
    size: int = 0
    inodes: int = 0


@dataclass
class Removed:
    """A snapshot whose row is gone; its directory is removed by the caller after unmounting."""

    id: str
    path: Path
    remote: bool


SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    key       TEXT NOT NULL UNIQUE,          -- the key of an active/view snapshot, the name once committed
    kind      INTEGER NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    created   INTEGER NOT NULL,              -- ns since the epoch
    updated   INTEGER NOT NULL,
    labels    TEXT NOT NULL DEFAULT '{}',    -- JSON object
    size      INTEGER NOT NULL DEFAULT 0,    -- usage, recorded at commit
    inodes    INTEGER NOT NULL DEFAULT 0,
    remote    INTEGER NOT NULL DEFAULT 0     -- 1: fs/ is a lazily mounted remote layer
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""


def clean_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """Validate sizes and drop empty values (containerd never stores a label whose value is "")."""
    labels = {k: v for k, v in (labels or {}).items() if v != ""}
    validate_labels(labels)
    return labels


def validate_labels(labels: Mapping[str, str]) -> None:
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(f"label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), "
                                  f"key: {k[:64]}")


def disk_usage(path: Path) -> Usage:
    """Size (allocated blocks * 512) and inode count under ``path``, each inode counted once.

    Same accounting as containerd's ``fs.DiskUsage`` (continuity), which its overlayfs snapshotter uses.
    Mount points below ``path`` are not crossed.
    """
    seen: set[tuple[int, int]] = set()
    size = 0
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return Usage()
    stack = [str(path)]
    seen.add((top.st_dev, top.st_ino))
    size += top.st_blocks * 512
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            st = e.stat(follow_symlinks=False)
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                size += st.st_blocks * 512
            if e.is_dir(follow_symlinks=False) and st.st_dev == top.st_dev:
                stack.append(e.path)
    return Usage(size=size, inodes=len(seen))


def remove_tree(path: Path) -> None:
    """Delete a snapshot directory, unmounting anything mounted below it first.

    Without the unmount, ``rmtree`` would walk into a mounted remote layer (or a container rootfs a
    crashed consumer left behind) and delete or fail on the mounted files.
    """
    for mp in mountpoints_under(path):
        detach_mount(mp)
    if os.path.lexists(path):
        shutil.rmtree(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    """Snapshot metadata and directories under one root. See the module docstring for the rules."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.layout = StateLayout(self.root)
        self.snapshots_dir = self.layout.snapshots
        try:
            self.snapshots_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
        except OSError as exc:
            raise StorageError(f"cannot create snapshotter root {self.root}: {exc}") from exc
        self._lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._db = sqlite3.connect(self.layout.metadata_db, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (autocommit: every statement sees the latest commit)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.layout.metadata_db, isolation_level=None, check_same_thread=False)
            self._local.db = db
            with self._lock:
                self._readers.append(db)
        return db

    def close(self) -> None:
        with self._lock:
            for db in self._readers:
                db.close()
            self._db.close()

    # -- paths -------------------------------------------------------------------------------
    def dir(self, sid: str) -> Path:
        return self.snapshots_dir / sid

    def fs_path(self, sid: str) -> Path:
        return self.snapshots_dir / sid / "fs"

    def work_path(self, sid: str) -> Path:
        return self.snapshots_dir / sid / "work"

    # -- transactions --------------------------------------------------------------------------
    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        store = self

        class _Tx:
            def __enter__(self) -> sqlite3.Connection:
                store._lock.acquire()
                store._db.execute("BEGIN IMMEDIATE")
                return store._db

            def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                         tb: TracebackType | None) -> Literal[False]:
                try:
                    store._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
                finally:
                    store._lock.release()
                return False

        return _Tx()

    def _row(self, db: sqlite3.Connection, key: str) -> Any:
        return db.execute("SELECT id, kind, parent_id, created, updated, labels, size, inodes, remote "
                          "FROM snapshots WHERE key = ?", (key,)).fetchone()

    def _parent_ids(self, db: sqlite3.Connection, sid: int | None) -> list[str]:
        if sid is None:
            return []
        rows = db.execute("WITH RECURSIVE chain(id, parent_id, depth) AS ("
                          " SELECT id, parent_id, 0 FROM snapshots WHERE id = ?"
                          " UNION ALL SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s"
                          " JOIN chain c ON s.id = c.parent_id)"
                          " SELECT id FROM chain ORDER BY depth", (sid,)).fetchall()
        return [str(r[0]) for r in rows]

    def _info(self, db: sqlite3.Connection, key: str, row: Any) -> Info:
        parent = ""
        if row[2] is not None:
            parent = db.execute("SELECT key FROM snapshots WHERE id = ?", (row[2],)).fetchone()[0]
        return Info(name=key, parent=parent, kind=Kind(row[1]), created_ns=row[3], updated_ns=row[4],
                    labels=json.loads(row[5]))

    # -- operations ------------------------------------------------------------------------------
    def create(self, kind: Kind, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> Snapshot:
        """Prepare (ACTIVE) or View (VIEW) a snapshot on top of the committed ``parent``."""
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        labels = clean_labels(labels)
        tmp: Path | None = None
        try:
            with self._tx() as db:
                # The temporary directory is made under the lock so Cleanup never sees it half-built.
                try:
                    tmp = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
                    (tmp / "fs").mkdir(0o755)
                    os.chmod(tmp / "fs", 0o755)  # umask-proof: image layers rely on a 0755 root
                    if kind == Kind.ACTIVE:
                        (tmp / "work").mkdir(0o711)
                except OSError as exc:
                    raise StorageError(f"cannot create snapshot directory: {exc}") from exc
                if self._row(db, key) is not None:
                    raise AlreadyExists(f"snapshot {key} already exists")
                parent_id = None
                parent_ids: list[str] = []
                if parent:
                    prow = self._row(db, parent)
                    if prow is None:
                        raise NotFound(f"parent snapshot {parent} does not exist")
                    if prow[1] != Kind.COMMITTED:
                        raise InvalidArgument(f"parent {parent} is not a committed snapshot")
                    parent_id = prow[0]
                    parent_ids = self._parent_ids(db, parent_id)
                    st = os.stat(self.fs_path(parent_ids[0]))
                    os.lchown(tmp / "fs", st.st_uid, st.st_gid)
                now = time.time_ns()
                cur = db.execute("INSERT INTO snapshots (key, kind, parent_id, created, updated, labels) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", (key, int(kind), parent_id, now, now, json.dumps(labels)))
                sid = str(cur.lastrowid)
                final = self.dir(sid)
                if os.path.lexists(final):  # an orphan left by a crash between rename and COMMIT
                    remove_tree(final)
                os.rename(tmp, final)
                tmp = None
                _fsync_dir(self.snapshots_dir)
            return Snapshot(id=sid, kind=kind, parent_ids=parent_ids)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None, *,
               usage: Usage | None = None, remote: bool = False) -> Info:
        """Turn the active snapshot ``key`` into the committed snapshot ``name``.

        ``usage`` is measured before the transaction (a directory walk must not hold the lock); when
        None the fs directory is walked here. ``remote`` marks a lazily mounted remote layer.
        """
        if not name:
            raise InvalidArgument("commit name must not be empty")
        labels = clean_labels(labels)
        if usage is None:
            with self._lock:
                row = self._row(self._db, key)
            if row is None:
                raise NotFound(f"snapshot {key} does not exist")
            usage = Usage() if row[8] or remote else disk_usage(self.fs_path(str(row[0])))
        with self._tx() as db:
            row = self._row(db, key)
            if row is None:
                raise NotFound(f"snapshot {key} does not exist")
            if row[1] != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is not active")
            if self._row(db, name) is not None:
                raise AlreadyExists(f"snapshot {name} already exists")
            now = time.time_ns()  # a committed snapshot is created by the commit, as in containerd
            db.execute("UPDATE snapshots SET key = ?, kind = ?, created = ?, updated = ?, labels = ?, size = ?, "
                       "inodes = ?, remote = ? WHERE id = ?",
                       (name, int(Kind.COMMITTED), now, now, json.dumps(labels), usage.size, usage.inodes,
                        1 if (remote or row[8]) else 0, row[0]))
            return self._info(db, name, self._row(db, name))

    def remove(self, key: str) -> Removed:
        """Delete the row of ``key``; the caller removes the returned directory afterwards."""
        with self._tx() as db:
            row = self._row(db, key)
            if row is None:
                raise NotFound(f"snapshot {key} does not exist")
            if db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (row[0],)).fetchone():
                raise FailedPrecondition(f"cannot remove snapshot {key}: it has children")
            db.execute("DELETE FROM snapshots WHERE id = ?", (row[0],))
        return Removed(id=str(row[0]), path=self.dir(str(row[0])), remote=bool(row[8]))

    def stat(self, key: str) -> Info:
        db = self._reader()
        row = self._row(db, key)
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        return self._info(db, key, row)

    def snapshot_id(self, key: str) -> str:
        """The directory id of ``key`` (any kind)."""
        row = self._row(self._reader(), key)
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        return str(row[0])

    def snapshot(self, key: str) -> Snapshot:
        """Ids for building the mounts of an active or view snapshot."""
        db = self._reader()
        row = self._row(db, key)
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        if row[1] == Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key} is committed: it has no mounts (use View)")
        # the chain cannot change under us: a parent with a child cannot be removed
        return Snapshot(id=str(row[0]), kind=Kind(row[1]), parent_ids=self._parent_ids(db, row[2]),
                        remote=bool(row[8]))

    def update(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Info:
        """Update mutable fields (only labels are): no paths or "labels" replace all labels,
        "labels.KEY" sets that one label, or deletes it when absent or empty in ``labels``.

        As in containerd's store, a label with an empty value is never stored."""
        with self._tx() as db:
            row = self._row(db, name)
            if row is None:
                raise NotFound(f"snapshot {name} does not exist")
            current = json.loads(row[5])
            if not fieldpaths:
                current = dict(labels)
            for path in fieldpaths:
                if path.startswith("labels."):
                    k = path[len("labels."):]
                    current[k] = labels.get(k, "")
                elif path == "labels":
                    current = dict(labels)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {name!r}")
            current = clean_labels(current)
            db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                       (json.dumps(current), time.time_ns(), row[0]))
            return self._info(db, name, self._row(db, name))

    def walk(self, filter_strings: Sequence[str] = ()) -> Iterator[Info]:
        """Every snapshot matching the containerd filters (OR over strings, AND within one)."""
        flt = filterlang.parse_all(list(filter_strings))
        rows = self._reader().execute(
            "SELECT s.key, s.kind, p.key, s.created, s.updated, s.labels FROM snapshots s "
            "LEFT JOIN snapshots p ON s.parent_id = p.id ORDER BY s.id").fetchall()
        for key, kind, parent, created, updated, labels in rows:
            info = Info(name=key, parent=parent or "", kind=Kind(kind), created_ns=created, updated_ns=updated,
                        labels=json.loads(labels))
            if flt.match(filterlang.snapshot_adaptor(info.kind.label, info.name, info.parent, info.labels)):
                yield info

    def usage(self, key: str) -> Usage:
        """Committed: the usage recorded at commit. Active: walk the upper directory now."""
        row = self._row(self._reader(), key)
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        if row[1] == Kind.ACTIVE and not row[8]:
            return disk_usage(self.fs_path(str(row[0])))
        return Usage(size=row[6], inodes=row[7])

    def remote_snapshots(self) -> list[tuple[str, str, dict[str, str]]]:
        """(id, key, labels) of every snapshot whose fs is a remote-layer mount (to restore on start)."""
        rows = self._reader().execute("SELECT id, key, labels FROM snapshots WHERE remote = 1").fetchall()
        return [(str(i), k, json.loads(labels)) for i, k, labels in rows]

    def mark_remote(self, key: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE snapshots SET remote = 1 WHERE key = ?", (key,))

    def orphans(self) -> list[Path]:
        """Directories under snapshots/ that no row references (left by crashes or by Remove)."""
        with self._lock:
            ids = {str(r[0]) for r in self._db.execute("SELECT id FROM snapshots")}
            return [self.snapshots_dir / d for d in sorted(os.listdir(self.snapshots_dir)) if d not in ids]

    def cleanup(self) -> list[Path]:
        """Remove orphaned directories; returns what was removed. Failures are logged, not fatal.

        Under the lock each orphan is unmounted and renamed to ``rm-*`` (cheap, and no create() can
        then reuse its name); the slow recursive delete happens after the lock is released.
        """
        doomed = []
        with self._lock:
            for path in self.orphans():
                try:
                    for mp in mountpoints_under(path):
                        detach_mount(mp)
                    if path.name.startswith("rm-"):
                        doomed.append(path)
                        continue
                    target = self.snapshots_dir / f"rm-{uuid.uuid4().hex}"
                    os.rename(path, target)
                    doomed.append(target)
                except (OSError, StorageError) as exc:
                    log.warning("cleanup: cannot remove %s: %s", path, exc)
        removed = []
        for path in doomed:
            try:
                shutil.rmtree(path)
                removed.append(path)
            except OSError as exc:
                log.warning("cleanup: cannot remove %s: %s", path, exc)
        return removed
