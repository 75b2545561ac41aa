"""Crafting hostile bootstraps and bootstrap layers for tests (digest-valid, so only validation stops them).

* :func:`sample_bootstrap` writes a small, real bootstrap with remora's own writer;
* :func:`edit` changes one with plain SQL (``writable_schema`` when the edit touches the schema);
* :func:`zstd_bomb` hand-builds a zstd frame of RLE blocks: a few bytes per 128 KiB of output;
* :func:`replace_bootstrap` puts a new bootstrap layer into a converted image in an OCI layout,
  rewriting annotations, config and manifest so every digest checks out.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import stat
import struct
import tarfile
from pathlib import Path

from remora import oci
from remora.format import annotations as ann
from remora.format.bootstrap import write_bootstrap
from remora.format.bootstrap_layer import encode_bootstrap_layer
from remora.format.chunktable import ChunkTable
from remora.format.tree import ChunkRef, Inode, Tree

BLOB = "sha256:" + "ab" * 32


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sample_bootstrap(path: Path) -> Path:
    """/etc/hello (one chunk), /data/a (two chunks) hard-linked as /data/hl, a symlink, a device,
    an xattr and a prefetch entry; one blob with one frame."""
    table = ChunkTable()
    b = table.blob_id(BLOB, 100_000)
    f = table.add_frame(b, 512, 5000, 8192)
    d1, d2 = _digest(b"1" * 4096), _digest(b"2" * 4096)
    table.add_chunk(d1, 4096, f, 0)
    table.add_chunk(d2, 4096, f, 4096)
    tree = Tree()
    etc, data, dev = Inode.directory(), Inode.directory(0o750), Inode.directory()
    tree.root.children.update({b"etc": etc, b"data": data, b"dev": dev})
    hello = Inode(mode=stat.S_IFREG | 0o644, size=4096, chunks=[ChunkRef(d1, 4096)], xattrs={"user.x": b"\x00y"})
    a = Inode(mode=stat.S_IFREG | 0o4755, size=8192, chunks=[ChunkRef(d1, 4096), ChunkRef(d2, 4096)])
    etc.children[b"hello"] = hello
    etc.children[b"link"] = Inode(mode=stat.S_IFLNK | 0o777, size=5, target=b"hello")
    etc.children[b"empty"] = Inode(mode=stat.S_IFREG | 0o600, size=0, chunks=[])
    data.children[b"a"] = a
    data.children[b"hl"] = a
    dev.children[b"null"] = Inode(mode=stat.S_IFCHR | 0o666, rdev=(1 << 8) | 3)
    tree.number()
    write_bootstrap(Path(path), tree, table, [hello.ino], {"created_by": "tests"})
    return Path(path)


def edit(path: Path, *statements: str, schema: bool = False) -> Path:
    """Run SQL on a bootstrap in place (``schema``: with writable_schema, for edits of sqlite_master)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        if schema:
            db.execute("PRAGMA writable_schema=ON")
        for sql in statements:
            db.execute(sql)
    finally:
        db.close()
    return path


def ino_of(path: Path, name: bytes) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT ino FROM dirents WHERE name = ?", (name,)).fetchone()[0]
    finally:
        db.close()


def zstd_bomb(usize: int, declare: int | None = None, prefix: bytes = b"") -> bytes:
    """One zstd frame: ``prefix`` as a raw block, then zero bytes in RLE blocks, ``usize`` bytes in
    all; the header declares ``declare`` (default ``usize``; -1: no content size)."""
    declare = usize if declare is None else declare
    block = 128 * 1024
    out = bytearray(b"\x28\xb5\x2f\xfd")
    if declare < 0:
        out += bytes([0x00, 0x70])   # no content size, not single-segment; window descriptor: 2^(10+14)=16 MiB
    else:
        out += bytes([0xC0, 0x70]) + struct.pack("<Q", declare)  # FCS 8 bytes, window 16 MiB
    left = usize
    if prefix:
        out += struct.pack("<I", (len(prefix) << 3) | (0 << 1) | (0 if left > len(prefix) else 1))[:3] + prefix
        left -= len(prefix)
    while left > 0:
        n = min(block, left)
        left -= n
        out += struct.pack("<I", (n << 3) | (1 << 1) | (1 if left == 0 else 0))[:3] + b"\0"
    return bytes(out)


def bomb_layer(usize: int, declare: int | None = None) -> bytes:
    """A bootstrap layer whose tar says the bootstrap member is ``usize - 1536`` zero bytes."""
    info = tarfile.TarInfo(ann.BOOTSTRAP_MEMBER)
    info.size = usize - 1536
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    return zstd_bomb(usize, declare, prefix=header)


def layer_from_db(db: Path, workdir: Path) -> bytes:
    workdir.mkdir(parents=True, exist_ok=True)
    path, _, _, _ = encode_bootstrap_layer(db, workdir)
    return path.read_bytes()


def extract_db(layout: Path, tag: str, out: Path) -> Path:
    """The bootstrap database of a converted image in a layout (read with the stdlib, not remora)."""
    import zstandard

    from remora.imagestore import open_store

    store = open_store(f"oci:{layout}:{tag}")
    manifest = oci.parse_manifest(store.resolve()[1])
    boot = next(desc for desc in manifest.layers if desc.annotations.get(ann.ROLE) == "bootstrap")
    raw = (Path(layout) / "blobs" / "sha256" / boot.digest[7:]).read_bytes()
    tar = zstandard.ZstdDecompressor().decompress(raw)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        out.write_bytes(t.extractfile(ann.BOOTSTRAP_MEMBER).read())
    return out


def copy_layout(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def replace_bootstrap(layout_or_ref, tag: str | None, layer: bytes, new_tag: str | None = None) -> str:
    """Swap the bootstrap layer of an image for ``layer`` (tar+zstd bytes); every digest, annotation
    and diff_id is updated so the image is digest-valid. The image is ``oci:LAYOUT:TAG`` (a layout
    path and a tag) or any reference (``tag`` None: a registry image, re-tagged in place unless
    ``new_tag``). Returns the new reference."""
    import tempfile

    import zstandard

    from remora.imagestore import open_store

    ref = f"oci:{layout_or_ref}:{tag}" if tag is not None else str(layout_or_ref)
    store = open_store(ref)
    manifest = oci.parse_manifest(store.resolve()[1])
    digest, size = "sha256:" + hashlib.sha256(layer).hexdigest(), len(layer)
    with tempfile.NamedTemporaryFile(prefix="boot-", suffix=".zst") as f:
        f.write(layer)
        f.flush()
        store.push_blob(oci.Descriptor(ann.BOOTSTRAP_MEDIA_TYPE, digest, size), f.name)
    layers = []
    for desc in manifest.layers:
        a = dict(desc.annotations)
        a[ann.BOOTSTRAP], a[ann.BOOTSTRAP_SIZE] = digest, str(size)
        if a.get(ann.ROLE) == "bootstrap":
            layers.append(oci.Descriptor(desc.media_type, digest, size, a))
        else:
            layers.append(oci.Descriptor(desc.media_type, desc.digest, desc.size, a))
    cfg = json.loads(store.read_blob(manifest.config))
    try:
        tar = zstandard.ZstdDecompressor().decompress(layer, max_output_size=64 << 20)
        cfg["rootfs"]["diff_ids"][-1] = "sha256:" + hashlib.sha256(tar).hexdigest()
    except Exception:  # noqa: BLE001 - a bomb: any diff_id will do, nothing gets that far
        cfg["rootfs"]["diff_ids"][-1] = "sha256:" + "0" * 64
    cfg_bytes = oci.canonical_json(cfg)
    cdesc = oci.Descriptor(oci.MEDIA_TYPE_OCI_CONFIG, "sha256:" + hashlib.sha256(cfg_bytes).hexdigest(), len(cfg_bytes))
    with tempfile.NamedTemporaryFile(prefix="cfg-") as f:
        f.write(cfg_bytes)
        f.flush()
        store.push_blob(cdesc, f.name)
    new = oci.Manifest(config=cdesc, layers=layers, annotations=dict(manifest.annotations))
    data = new.to_bytes()
    if tag is not None:
        new_tag = new_tag or tag
        out = f"oci:{layout_or_ref}:{new_tag}"
    else:
        base = ref.rsplit(":", 1)[0] if ref.rsplit(":", 1)[-1].find("/") < 0 else ref
        new_tag = new_tag or ref.rsplit(":", 1)[1]
        out = f"{base}:{new_tag}"
    store.push_manifest(oci.Descriptor(oci.MEDIA_TYPE_OCI_MANIFEST, "sha256:" + hashlib.sha256(data).hexdigest(),
                                       len(data)), data, new_tag)
    return out
