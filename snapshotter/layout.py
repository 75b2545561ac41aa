"""The snapshotter's state directory (``--root``), in one place: every path under it is named here.

Layout::

    lock                   an flock held by the one server that owns this root (kernel-released on death)
    metadata.db            snapshots table (SQLite, WAL; remora.snapshotter.storage)
    snapshots/<id>/fs      a snapshot's filesystem (overlay upperdir / a lowerdir once committed; a lazy
                           remora layer is FUSE-mounted here)
    snapshots/<id>/work    overlay workdir (active snapshots only)
    snapshots/new-XXXX/    a directory being prepared (never referenced by the database)
    bootstraps/            fetched, validated bootstraps by digest (``.tmp-*``: a fetch in progress)
    lazy/mounts/           one record per lazy mount: its spec, pid, log, published counters
    cache/                 the chunk cache (index.db + chunk files), partitioned per tenant
                           (remora.snapshotter.isolation)
    staging/               hot blobs streamed from a layer's Prepare on, before its bootstrap is mounted

The daemon, ``remora stats`` (read-only) and the tests use the same names from here, so that a rename
cannot leave one of them reading a directory nobody writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class StateLayout(NamedTuple):
    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def metadata_db(self) -> Path:
        return self.root / "metadata.db"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def bootstraps(self) -> Path:
        return self.root / "bootstraps"

    @property
    def lazy(self) -> Path:
        """The mount manager's state directory (it keeps its records under ``lazy/mounts``)."""
        return self.root / "lazy"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    def is_state_dir(self) -> bool:
        """Whether a snapshotter has ever run here (its metadata database exists)."""
        return self.metadata_db.is_file()
