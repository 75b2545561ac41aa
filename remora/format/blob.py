"""Data blobs: zstd frames of chunks, wrapped in a one-member tar.

Layout of a data blob (all offsets are absolute byte offsets in the blob)::

    [512-byte ustar header "remora.blob", size = payload length]
    [frame 0][frame 1]...[frame n-1]          <- payload: independent zstd frames
    [zero padding to 512][1024 zero bytes]    <- tar end

A *frame* is one zstd frame whose uncompressed bytes are one or more whole chunks laid end to end
(several small chunks share a frame: small-file batching). Frames are independent, so any frame can be
fetched with one HTTP range request and decompressed alone. The tar wrapping keeps the blob a valid
OCI ``tar`` layer: a runtime that does not know remora can still "apply" it without failing.
"""
from __future__ import annotations

import hashlib
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import zstandard

from remora.errors import DigestMismatch, InvalidInput

TAR_HEADER_SIZE = 512
BLOB_MEMBER = "remora.blob"
DEFAULT_LEVEL = 3


@dataclass(frozen=True, slots=True)
class FrameLocation:
    """Where a frame lives: ``blob`` digest, absolute ``offset`` and compressed size ``csize``."""

    blob: str
    offset: int
    csize: int
    usize: int


def tar_header(payload_size: int) -> bytes:
    info = tarfile.TarInfo(BLOB_MEMBER)
    info.size = payload_size
    info.mode = 0o444
    info.mtime = 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    assert len(header) == TAR_HEADER_SIZE
    return header


def tar_trailer(payload_size: int) -> bytes:
    return b"\0" * ((-payload_size) % 512 + 1024)


class BlobWriter:
    """Append compressed frames to a new data blob file, then seal it (header, trailer, digest).

    The header's size field is patched in at :meth:`close`, so frames are written once, in order,
    straight to disk. Offsets returned by :meth:`add_frame` are final blob offsets.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._f.write(b"\0" * TAR_HEADER_SIZE)
        self.payload = 0
        self.frames = 0

    def add_frame(self, compressed: bytes) -> tuple[int, int]:
        offset = TAR_HEADER_SIZE + self.payload
        self._f.write(compressed)
        self.payload += len(compressed)
        self.frames += 1
        return offset, len(compressed)

    def close(self) -> tuple[str, int]:
        """Finish the blob; returns ``(digest, size)``."""
        f = self._f
        f.write(tar_trailer(self.payload))
        f.seek(0)
        f.write(tar_header(self.payload))
        # No fsync: the file is a work file that is hashed and pushed from the page cache; a crash
        # loses the whole work dir anyway, and flushing tens of MB to disk here cost wall time.
        f.close()
        h = hashlib.sha256()
        with open(self.path, "rb") as r:
            while block := r.read(1 << 20):
                h.update(block)
        return "sha256:" + h.hexdigest(), self.path.stat().st_size

    def abort(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level``: a ZstdCompressor must not be shared between threads,
    and creating one per frame (a new zstd context and its match tables every time) cost ~15 % of
    the converter's compression CPU. ``compress`` starts a fresh frame every call, so reuse changes
    no output byte."""
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return cctx


def compress_frame(data: bytes | bytearray | memoryview, level: int = DEFAULT_LEVEL) -> bytes:
    """One independent zstd frame (content size in the header, no zstd checksum: chunks carry sha256).
    ``data`` is any bytes-like object (a memoryview of a batch buffer is not copied first)."""
    return _compressor(level).compress(data)


def decompress_frame(data: bytes, usize: int, where: str = "frame") -> bytes:
    """Decompress one frame and check its size; corrupt input raises :class:`InvalidInput`."""
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=usize)
    except zstandard.ZstdError as exc:
        raise InvalidInput(f"{where}: corrupt zstd frame: {exc}") from None
    if len(out) != usize:
        raise InvalidInput(f"{where}: frame decompressed to {len(out)} bytes, expected {usize}")
    return out


def verify_chunk(data: bytes, digest: bytes, where: str = "chunk") -> bytes:
    """Return ``data`` if its sha256 is ``digest`` (raw 32 bytes), else raise DigestMismatch."""
    actual = hashlib.sha256(data).digest()
    if actual != digest:
        raise DigestMismatch(where, "sha256:" + digest.hex(), "sha256:" + actual.hex())
    return data


def read_payload_header(blob_head: bytes) -> int:
    """Parse and check the tar header of a data blob; returns the payload size."""
    if len(blob_head) < TAR_HEADER_SIZE:
        raise InvalidInput("data blob shorter than its tar header")
    try:
        info = tarfile.TarInfo.frombuf(blob_head[:TAR_HEADER_SIZE], "utf-8", "strict")
    except tarfile.TarError as exc:
        raise InvalidInput(f"data blob: bad tar header: {exc}") from None
    if info.name != BLOB_MEMBER:
        raise InvalidInput(f"data blob: unexpected member {info.name!r}")
    return info.size
