"""The remora image format: a library the converter writes and the snapshotter reads.

No network code lives here. See ``docs/format.md`` for the specification (the contract).

* :mod:`remora.format.tree` — the merged file tree model.
* :mod:`remora.format.chunker` — fixed-size and content-defined (FastCDC) chunking.
* :mod:`remora.format.blob` — data blobs: a tar-wrapped run of zstd frames holding chunks.
* :mod:`remora.format.bootstrap` — the bootstrap: a SQLite database with the tree, chunk table and
  prefetch order, queryable by path or inode without reading it whole.
* :mod:`remora.format.bootstrap_layer` — the bootstrap layer (tar+zstd): encode, and a streamed,
  bounded decode for hostile input.
* :mod:`remora.format.validate` — the one validator every reader runs before using a bootstrap.
* :mod:`remora.format.sqlguard` — read-only, budgeted SQLite connections to untrusted files.
* :mod:`remora.format.annotations` — how a remora image is described in an OCI manifest.
"""

FORMAT_VERSION = 1
