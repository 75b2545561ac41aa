"""The lazy filesystem: a read-only FUSE view of a remora image, served from its bootstrap.

Metadata (lookup, getattr, readdir, readlink, xattrs) is answered from the bootstrap's SQLite database
only, never the network; file contents come through the :class:`~remora.snapshotter.fetch.ChunkFetcher`.
Each mount runs in its own process (``python -m remora.snapshotter.fs --spec FILE``), managed by
:class:`remora.snapshotter.mount.MountManager`.
"""
