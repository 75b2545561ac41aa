"""The bootstrap layer: the bootstrap database wrapped in a one-member tar, zstd-compressed.

Both directions live here so the format has one owner (docs/format.md). Encoding is deterministic
(fixed tar header, ``write_content_size`` so the zstd frame declares the tar's exact size). Decoding is
written for hostile input: an image's bootstrap layer is the first thing a node reads of it, so a
small layer must not be able to make a reader allocate or write without bound.

* The layer is spooled to disk while its digest is checked (never held whole in memory).
* The zstd frame must declare its content size; that declared size, not the compressed size, bounds
  how much is decompressed, and it must be under a hard cap (:data:`MAX_BOOTSTRAP_USIZE`). A frame
  asking for a large window is refused before anything is allocated (``max_window_size``).
* Decompression streams block by block into a minimal tar reader that accepts exactly what the
  encoder writes: optionally one small PAX header, then one regular file named
  :data:`~remora.format.annotations.BOOTSTRAP_MEMBER`, then zero padding. The member's bytes go
  straight to a file on disk.
"""
from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast

import zstandard

from remora.errors import InvalidInput
from remora.format import annotations as ann

if TYPE_CHECKING:
    from remora.oci import Descriptor

#: Compression level of the bootstrap layer (small, fetched whole on every node: worth compressing well).
ZSTD_LEVEL = 10
#: Hard caps, whatever the layer declares: compressed size, uncompressed tar size, zstd window.
MAX_BOOTSTRAP_CSIZE = 1 << 30
MAX_BOOTSTRAP_USIZE = 1 << 30
MAX_WINDOW_SIZE = 1 << 25        # what a level <= 19 encoder uses for any input is far below this
#: The biggest PAX header accepted (the encoder writes none for its short, ASCII member name).
MAX_PAX_SIZE = 64 * 1024
_BLOCK = 512
_IO = 1 << 20


def encode_bootstrap_layer(db_path: Path, workdir: Path) -> tuple[Path, str, int, str]:
    """Wrap the bootstrap in a deterministic tar, zstd it: ``(path, digest, size, diff_id)``.

    One pass over the database: the tar (exactly what ``tarfile`` writes for this member: PAX
    format, padding, end-of-archive blocks, record padding) is produced in memory block by block,
    hashed (the diff_id) and fed to the compressor, whose output is hashed as it is written. No
    uncompressed tar on disk and no second read of either file."""
    db_path, workdir = Path(db_path), Path(workdir)
    size = db_path.stat().st_size
    info = tarfile.TarInfo(ann.BOOTSTRAP_MEMBER)
    info.size = size
    info.mode = 0o444
    info.mtime = 0
    info.uname = info.gname = ""
    header = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    body = len(header) + -(-size // _BLOCK) * _BLOCK + 2 * _BLOCK        # member, then two zero blocks
    tar_size = -(-body // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
    out = workdir / "bootstrap.tar.zst"
    tar_hash = hashlib.sha256(header)
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    with open(db_path, "rb") as fin, open(out, "wb") as raw:
        sink = _HashingFile(raw)
        with cctx.stream_writer(cast(BinaryIO, sink), size=tar_size, closefd=False) as z:  # a file in all but name
            z.write(header)
            left = size
            while left:
                block = fin.read(min(_IO, left))
                if not block:
                    raise InvalidInput(f"{db_path}: changed while it was being packed")
                tar_hash.update(block)
                z.write(block)
                left -= len(block)
            tail = bytes(tar_size - len(header) - size)
            tar_hash.update(tail)
            z.write(tail)
    return out, "sha256:" + sink.hash.hexdigest(), sink.size, "sha256:" + tar_hash.hexdigest()


class _HashingFile:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, f: BinaryIO):
        self._f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self.hash.update(data)
        self.size += len(data)
        return len(data)


def spool_layer(stream: BinaryIO, out: Path, max_size: int = MAX_BOOTSTRAP_CSIZE) -> Path:
    """Copy a (digest-verifying) blob stream to ``out`` block by block, at most ``max_size`` bytes.
    The stream raises at EOF if its digest is wrong, so a returned file is the layer's bytes."""
    n = 0
    try:
        with open(out, "wb") as w:
            while block := stream.read(_IO):
                n += len(block)
                if n > max_size:
                    raise InvalidInput(f"bootstrap layer is larger than the {max_size}-byte limit")
                w.write(block)
    except BaseException:
        Path(out).unlink(missing_ok=True)
        raise
    finally:
        stream.close()
    return Path(out)


def decode_bootstrap_layer(layer: Path, out: Path, max_usize: int = MAX_BOOTSTRAP_USIZE,
                           where: str = "bootstrap layer") -> Path:
    """Decompress and untar a spooled bootstrap layer into ``out`` (the database file), streaming and
    bounded; anything but what :func:`encode_bootstrap_layer` writes is :class:`InvalidInput`."""
    layer, out = Path(layer), Path(out)
    with open(layer, "rb") as f:
        head = f.read(18)   # a zstd frame header is at most 18 bytes
        try:
            params = zstandard.get_frame_parameters(head)
        except zstandard.ZstdError as exc:
            raise InvalidInput(f"{where}: not a zstd frame: {exc}") from None
        declared = params.content_size
        if declared in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
            raise InvalidInput(f"{where}: the zstd frame does not declare its uncompressed size")
        if declared > max_usize:
            raise InvalidInput(f"{where}: declares {declared} uncompressed bytes, over the {max_usize}-byte limit")
        if params.window_size > MAX_WINDOW_SIZE:
            raise InvalidInput(f"{where}: zstd window of {params.window_size} bytes, over the "
                               f"{MAX_WINDOW_SIZE}-byte limit")
        f.seek(0)
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
        try:
            with dctx.stream_reader(f, read_size=_IO, read_across_frames=True, closefd=False) as z:
                _untar(_Bounded(z, declared, where), out, where)
        except zstandard.ZstdError as exc:
            out.unlink(missing_ok=True)
            raise InvalidInput(f"{where}: corrupt zstd: {exc}") from None
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    return out


def fetch_bootstrap_layer(open_blob: Callable[[], BinaryIO], size: int, workdir: Path, name: str,
                          on_downloaded: Callable[[], None] | None = None, where: str = "bootstrap layer") -> Path:
    """Spool a bootstrap layer of declared ``size`` into ``workdir``, then decode it to
    ``workdir/name``; the spooled layer is removed either way. ``on_downloaded`` runs once the
    compressed bytes are in (verified)."""
    if size > MAX_BOOTSTRAP_CSIZE:
        raise InvalidInput(f"{where}: {size} bytes, over the {MAX_BOOTSTRAP_CSIZE}-byte limit")
    workdir = Path(workdir)
    spooled = workdir / (name + ".layer")
    try:
        spool_layer(open_blob(), spooled, MAX_BOOTSTRAP_CSIZE)
        if on_downloaded is not None:
            on_downloaded()
        return decode_bootstrap_layer(spooled, workdir / name, where=where)
    finally:
        spooled.unlink(missing_ok=True)


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class BlobSource(Protocol):
    """What :func:`fetch_bootstrap` reads from: anything that opens a blob by its descriptor."""

    def open_blob(self, desc: Descriptor, /) -> BinaryIO: ...


class _Bounded:
    """A reader that refuses to yield more than ``limit`` bytes: the decompressed stream may not
    exceed what its frame declared (a multi-frame or lying stream stops here)."""

    def __init__(self, f: _Readable, limit: int, where: str):
        self._f, self._left, self._where = f, limit, where

    def read(self, n: int) -> bytes:
        data = self._f.read(min(n, self._left + 1))
        if len(data) > self._left:
            raise InvalidInput(f"{self._where}: decompresses to more than its declared size")
        self._left -= len(data)
        return data

    def read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            block = self.read(n - len(buf))
            if not block:
                raise InvalidInput(f"{self._where}: truncated tar")
            buf += block
        return bytes(buf)


def _untar(src: _Bounded, out: Path, where: str) -> None:
    pax: dict[str, str] = {}
    header = src.read_exact(_BLOCK)
    kind, size, name = _header(header, where)
    if kind == b"x":                       # one PAX header for the member that follows
        if size > MAX_PAX_SIZE:
            raise InvalidInput(f"{where}: PAX header of {size} bytes")
        pax = _parse_pax(src.read_exact(_padded(size))[:size], where)
        kind, size, name = _header(src.read_exact(_BLOCK), where)
    if kind not in (b"0", b"\0"):
        raise InvalidInput(f"{where}: the tar must hold one regular file, found type {kind!r}")
    name = pax.get("path", name)
    if "size" in pax:
        try:
            size = int(pax["size"])
        except ValueError:
            raise InvalidInput(f"{where}: bad PAX size {pax['size']!r}") from None
    if name != ann.BOOTSTRAP_MEMBER:
        raise InvalidInput(f"{where}: the tar member is {name!r}, expected {ann.BOOTSTRAP_MEMBER!r}")
    if size < 0:
        raise InvalidInput(f"{where}: negative member size")
    left = size
    with open(out, "wb") as w:
        while left:
            block = src.read(min(left, _IO))
            if not block:
                raise InvalidInput(f"{where}: truncated tar member")
            w.write(block)
            left -= len(block)
    src.read_exact(_padded(size) - size)
    # Only zero blocks may follow (end-of-archive marker and record padding).
    while block := src.read(_IO):
        if block.count(0) != len(block):
            raise InvalidInput(f"{where}: the tar holds more than the bootstrap")


def _padded(n: int) -> int:
    return (n + _BLOCK - 1) // _BLOCK * _BLOCK


def _header(block: bytes, where: str) -> tuple[bytes, int, str]:
    if block.count(0) == _BLOCK:
        raise InvalidInput(f"{where}: the tar is empty")
    stored = block[148:156]
    try:
        chksum = int(stored.rstrip(b"\0 ").decode("ascii") or "x", 8)
    except ValueError:
        raise InvalidInput(f"{where}: bad tar header checksum field") from None
    if chksum != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise InvalidInput(f"{where}: tar header checksum mismatch")
    raw_size = block[124:136]
    if raw_size[0] & 0x80:                 # base-256: only ever for sizes past 8 GiB
        raise InvalidInput(f"{where}: tar member size out of range")
    try:
        size = int(raw_size.rstrip(b"\0 ").decode("ascii") or "0", 8)
    except ValueError:
        raise InvalidInput(f"{where}: bad tar size field") from None
    name = block[0:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    full = (prefix + b"/" + name) if prefix else name
    return block[156:157], size, full.decode("utf-8", "replace")


def _parse_pax(data: bytes, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp]) if sp > pos else -1
        except ValueError:
            length = -1
        if length <= 0 or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
            raise InvalidInput(f"{where}: malformed PAX header")
        key, eq, value = data[sp + 1:pos + length - 1].partition(b"=")
        if not eq:
            raise InvalidInput(f"{where}: malformed PAX record")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_IO):
            h.update(block)
    return "sha256:" + h.hexdigest()


__all__ = ["encode_bootstrap_layer", "decode_bootstrap_layer", "fetch_bootstrap_layer", "fetch_bootstrap",
           "spool_layer",
           "MAX_BOOTSTRAP_CSIZE", "MAX_BOOTSTRAP_USIZE", "MAX_WINDOW_SIZE", "ZSTD_LEVEL"]


def fetch_bootstrap(store: BlobSource, desc: Descriptor, workdir: Path,
                    on_downloaded: Callable[[], None] | None = None) -> Path:
    """Download (verified), decompress and untar the bootstrap layer, then validate the database;
    returns its path.

    ``store`` is anything with ``open_blob(desc)`` (a registry client, an OCI layout, the snapshotter's
    mirror-aware source) and ``desc`` an :class:`remora.oci.Descriptor`: this module does no I/O of its
    own beyond the work directory. Streamed and bounded: the layer is spooled to disk and never held
    whole in memory, its decompressed size is bounded by what its zstd frame declares and a hard cap.
    Validation (remora.format.validate) refuses anything remora's writer would not have produced,
    before anyone reads the database. ``on_downloaded`` is called once the
    bytes are in (the connection is free for other requests)."""
    from remora.format.validate import validate_bootstrap  # validate reads this module

    name = f"bootstrap-{desc.digest[7:19]}.db"
    path = fetch_bootstrap_layer(lambda: store.open_blob(desc), desc.size, Path(workdir), name, on_downloaded,
                                 where=f"bootstrap layer {desc.digest}")
    try:
        validate_bootstrap(path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
