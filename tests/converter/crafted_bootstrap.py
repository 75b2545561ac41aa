"""Hostile but digest-valid remora images for tests: convert a normal image into an OCI layout,
rewrite its bootstrap with SQLite, and re-pack the bootstrap layer with correct digests.

The bootstrap's schema is remora.format.bootstrap.SCHEMA; these helpers only add rows (or relax a
key) the way an attacker with a hand-made bootstrap could.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import tarfile
from pathlib import Path

import zstandard

from remora import oci
from remora.format import annotations as ann
from remora.imagestore import open_store
from remora.layout import OCILayout


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def extract_bootstrap(layout: Path, tag: str, out: Path) -> Path:
    """The bootstrap database of the remora image ``oci:layout:tag``, copied to ``out``."""
    store = open_store(f"oci:{layout}:{tag}")
    manifest = oci.parse_manifest(store.resolve()[1])
    boot = next(desc for desc in manifest.layers if desc.annotations.get(ann.ROLE) == "bootstrap")
    raw = (layout / "blobs" / "sha256" / boot.digest[7:]).read_bytes()
    tar_bytes = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        out.write_bytes(tar.extractfile(ann.BOOTSTRAP_MEMBER).read())
    return out


def repack(layout: Path, tag: str, db: Path, new_tag: str) -> None:
    """Tag ``new_tag`` in ``layout``: image ``tag`` with its bootstrap replaced by ``db`` (all digests,
    sizes, annotations and the config's diff_id updated, so only the bootstrap's content is hostile)."""
    lay = OCILayout.open(layout)
    store = open_store(f"oci:{layout}:{tag}")
    manifest = oci.parse_manifest(store.resolve()[1])
    buf = io.BytesIO()
    info = tarfile.TarInfo(ann.BOOTSTRAP_MEMBER)
    data = db.read_bytes()
    info.size, info.mode = len(data), 0o444
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    tar_bytes = buf.getvalue()
    layer = zstandard.ZstdCompressor(write_content_size=True).compress(tar_bytes)
    bdigest, bsize = lay.write_blob_bytes(layer)
    layers = []
    for desc in manifest.layers:
        a = dict(desc.annotations)
        a[ann.BOOTSTRAP], a[ann.BOOTSTRAP_SIZE] = bdigest, str(bsize)
        if a.get(ann.ROLE) == "bootstrap":
            layers.append(oci.Descriptor(desc.media_type, bdigest, bsize, a))
        else:
            layers.append(oci.Descriptor(desc.media_type, desc.digest, desc.size, a))
    cfg = json.loads(lay.read_blob(manifest.config.digest))
    cfg["rootfs"]["diff_ids"][-1] = _sha(tar_bytes)
    cdigest, csize = lay.write_blob_bytes(oci.canonical_json(cfg))
    new = oci.Manifest(config=oci.Descriptor(manifest.config.media_type, cdigest, csize), layers=layers,
                       annotations=dict(manifest.annotations))
    mbytes = new.to_bytes()
    store.push_manifest(oci.Descriptor(oci.MEDIA_TYPE_OCI_MANIFEST, _sha(mbytes), len(mbytes)), mbytes, new_tag)


class Crafter:
    """Edit a copy of a bootstrap: ``c = Crafter(src, dst); c.add_symlink(...); c.close()``."""

    S_IFLNK, S_IFREG, S_IFDIR = 0o120000, 0o100000, 0o040000

    def __init__(self, src: Path, dst: Path, unique_names: bool = True):
        shutil.copyfile(src, dst)
        self.path = dst
        self.db = sqlite3.connect(dst, isolation_level=None)
        if not unique_names:
            # the same table without its (parent, name) key: two entries may share a name
            self.db.executescript("""
                ALTER TABLE dirents RENAME TO dirents_old;
                CREATE TABLE dirents (parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL);
                INSERT INTO dirents SELECT * FROM dirents_old;
                DROP TABLE dirents_old;""")

    def ino_of(self, path: str) -> int:
        ino = 1
        for part in path.strip("/").split("/"):
            (ino,) = self.db.execute("SELECT ino FROM dirents WHERE parent=? AND name=?",
                                     (ino, part.encode())).fetchone()
        return ino

    def _new_ino(self) -> int:
        return self.db.execute("SELECT max(ino) FROM inodes").fetchone()[0] + 1

    def add_symlink(self, parent: int, name: bytes, target: bytes) -> int:
        ino = self._new_ino()
        self.db.execute("INSERT INTO inodes VALUES (?, ?, 0, 0, ?, 0, 0, 1, ?, NULL)",
                        (ino, self.S_IFLNK | 0o777, len(target), target))
        self.db.execute("INSERT INTO dirents VALUES (?, ?, ?)", (parent, name, ino))
        return ino

    def add_copy(self, parent: int, name: bytes, like: int, mode: int | None = None) -> int:
        """A new inode with the content and metadata of inode ``like`` (a regular file)."""
        ino = self._new_ino()
        row = list(self.db.execute("SELECT * FROM inodes WHERE ino=?", (like,)).fetchone())
        row[0] = ino
        if mode is not None:
            row[1] = mode
        self.db.execute(f"INSERT INTO inodes VALUES ({', '.join('?' * len(row))})", row)
        self.db.execute("INSERT INTO dirents VALUES (?, ?, ?)", (parent, name, ino))
        return ino

    def add_entry(self, parent: int, name: bytes, ino: int) -> None:
        self.db.execute("INSERT INTO dirents VALUES (?, ?, ?)", (parent, name, ino))

    def close(self) -> Path:
        self.db.close()
        return self.path
