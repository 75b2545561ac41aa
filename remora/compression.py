"""Layer (de)compression: gzip through ISA-L, zstd through python-zstandard, or plain tar.

Why not :mod:`gzip`: ``isal.igzip`` decompresses ~3.5x faster on this class of machine (measured
334 vs 95 MB/s), and layer decompression is the converter's hot loop.

The format is detected from magic bytes, not trusted from the media type: registries and tools mix
``tar.gzip`` labels with zstd or plain bodies often enough. Every failure mode of a compressed stream
(truncation, corruption, trailing garbage) raises :class:`InvalidInput` from ``read``; a reader never
returns a silently short stream. python-zstandard's ``stream_reader`` does exactly that on truncated
input, so zstd goes through ``decompressobj`` with explicit end-of-frame tracking instead.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass
from typing import IO, BinaryIO, cast

import zstandard
from isal import igzip, isal_zlib

from remora.errors import InvalidInput, UsageError
from remora.oci import layer_compression

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20
#: zstd input is fed in small pieces so one call's output stays bounded (decompressobj has no limit).
_ZSTD_IN_CHUNK = 64 * 1024
COMPRESSIONS = ("gzip", "zstd", "none")
DEFAULT_LEVEL = {"gzip": 2, "zstd": 3, "none": 0}  # isal levels are 0..3; zstd 1..22


def detect_compression(head: bytes) -> str:
    """``"gzip"``, ``"zstd"`` or ``"none"`` from the first bytes of a stream."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC) or _is_zstd_skippable(head):
        return "zstd"
    return "none"


def _is_zstd_skippable(head: bytes) -> bool:
    # Skippable frames (magic 0x184D2A50..5F, little endian) may lead a zstd stream (zstd:chunked metadata).
    return len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


def _looks_like_tar(head: bytes) -> bool:
    # An empty stream is an empty layer; otherwise accept ustar/gnu magic or a zero block (end of archive).
    return not head or head[257:262] == b"ustar" or (len(head) >= 512 and head[:512] == b"\0" * 512)


class _Prefixed(io.RawIOBase):
    """Re-attach bytes we already consumed for sniffing in front of the rest of a stream."""

    def __init__(self, prefix: bytes, rest: BinaryIO):
        super().__init__()
        self._prefix = prefix
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._prefix:
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._rest.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._rest.close()
            finally:
                super().close()


class _DecompressingReader(io.BufferedIOBase):
    """Common read()/readinto() over a ``_next_chunk()`` producer of decompressed bytes.

    Chunks are handed out without re-buffering (a whole chunk when the caller asks for at least
    that much), which keeps the pure-Python layer off the hot path.
    """

    def __init__(self, src: BinaryIO, what: str):
        super().__init__()
        self._src = src
        self._what = what
        self._buf = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bytes:
        raise NotImplementedError

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._buf[self._pos:]]
            self._buf, self._pos = b"", 0
            while chunk := self._next_chunk():
                parts.append(chunk)
            return b"".join(parts)
        while self._pos >= len(self._buf):
            chunk = self._next_chunk()
            if not chunk:
                return b""
            self._buf, self._pos = chunk, 0
        if self._pos == 0 and size >= len(self._buf):
            out, self._buf = self._buf, b""
            return out
        out = self._buf[self._pos:self._pos + size]
        self._pos += len(out)
        return out

    read1 = read

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    readinto1 = readinto

    def close(self) -> None:
        if not self.closed:
            try:
                self._src.close()
            finally:
                super().close()


class _GzipReader(_DecompressingReader):
    """isal gzip (multi-member) decompression with errors turned into InvalidInput."""

    def __init__(self, src: BinaryIO, what: str):
        super().__init__(src, what)
        self._gz = igzip.IGzipFile(fileobj=src, mode="rb")

    def _next_chunk(self) -> bytes:
        try:
            return self._gz.read(CHUNK)
        except EOFError as e:
            raise InvalidInput(f"truncated gzip stream in {self._what}: {e}") from None
        # isal's stub declares isal_zlib.error as an instance of Exception; it is the class.
        except (gzip.BadGzipFile, isal_zlib.error, zlib.error, OSError, ValueError) as e:  # type: ignore[misc]
            raise InvalidInput(f"corrupt gzip stream in {self._what}: {e}") from None

    def close(self) -> None:
        if not self.closed:
            self._gz.close()
        super().close()


class _ZstdReader(_DecompressingReader):
    """Multi-frame zstd decompression that notices a frame cut short."""

    def __init__(self, src: BinaryIO, what: str):
        super().__init__(src, what)
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False  # consumed input belonging to an unfinished frame
        self._eof = False

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            try:
                out.append(self._obj.decompress(data))
            except zstandard.ZstdError as e:
                raise InvalidInput(f"corrupt zstd stream in {self._what}: {e}") from None
            self._in_frame = True
            if not self._obj.eof:
                break
            data = self._obj.unused_data
            self._obj = self._dctx.decompressobj()
            self._in_frame = False
        return b"".join(out)

    def _next_chunk(self) -> bytes:
        while not self._eof:
            data = self._src.read(_ZSTD_IN_CHUNK)
            if not data:
                self._eof = True
                if self._in_frame:
                    raise InvalidInput(f"corrupt zstd stream in {self._what}: truncated (input ended inside a frame)")
                return b""
            out = self._feed(data)
            if out:
                return out
        return b""


def open_layer_stream(fileobj: BinaryIO, media_type: str | None = None, what: str = "layer") -> BinaryIO:
    """Return a buffered stream of the decompressed (tar) bytes of a layer.

    ``media_type`` is only a hint: gzip and zstd are recognised by magic. A body that claims to be
    compressed but carries neither magic nor a tar header is rejected (rather than handed to a tar
    parser that would report something confusing). Closing the result closes ``fileobj``.
    """
    hinted = layer_compression(media_type) if media_type else None
    head = fileobj.read(512)
    while len(head) < 512:  # short reads from sockets: fill the sniff window or hit EOF
        more = fileobj.read(512 - len(head))
        if not more:
            break
        head += more
    kind = detect_compression(head)
    if kind == "none" and hinted in ("gzip", "zstd") and not _looks_like_tar(head):
        raise InvalidInput(f"{what}: media type says {hinted} but the data is neither gzip, zstd nor tar")
    src = io.BufferedReader(_Prefixed(head, fileobj), CHUNK)
    if kind == "gzip":
        return cast(BinaryIO, _GzipReader(src, what))  # io.BufferedIOBase: a file-like reader
    if kind == "zstd":
        return cast(BinaryIO, _ZstdReader(src, what))
    return cast(BinaryIO, src)


@dataclass(frozen=True)
class CompressResult:
    """Digests and sizes of both sides of a compression: the blob and its diff_id."""

    digest: str
    size: int
    diff_id: str
    uncompressed_size: int


class _HashingWriter(io.RawIOBase):
    def __init__(self, dst: BinaryIO):
        super().__init__()
        self._dst = dst
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        b = bytes(b)
        self._dst.write(b)
        self.hash.update(b)
        self.size += len(b)
        return len(b)


def compress_stream(src: BinaryIO, dst: BinaryIO, compression: str = "gzip",
                    level: int | None = None) -> CompressResult:
    """Compress ``src`` to ``dst`` (not closed), returning digests of both sides.

    Output is deterministic: gzip headers carry mtime 0 and no file name, zstd frames carry a content
    checksum (so corruption is caught even without the digest). Levels: gzip 0-3 (ISA-L), zstd 1-22.
    """
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}")
    level = DEFAULT_LEVEL[compression] if level is None else level
    out = _HashingWriter(dst)
    raw_hash = hashlib.sha256()
    raw_size = 0
    comp: igzip.IGzipFile | zstandard.ZstdCompressionWriter | _HashingWriter
    if compression == "gzip":
        if not 0 <= level <= 3:
            raise UsageError(f"gzip level must be 0-3 (ISA-L), got {level}")
        comp = igzip.IGzipFile(filename="", fileobj=out, mode="wb", compresslevel=level, mtime=0)
    elif compression == "zstd":
        if not 1 <= level <= 22:
            raise UsageError(f"zstd level must be 1-22, got {level}")
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        comp = cctx.stream_writer(cast(IO[bytes], out), closefd=False)
    else:
        comp = out
    while chunk := src.read(CHUNK):
        raw_hash.update(chunk)
        raw_size += len(chunk)
        comp.write(chunk)
    if comp is not out:
        comp.close()
    return CompressResult(digest="sha256:" + out.hash.hexdigest(), size=out.size,
                          diff_id="sha256:" + raw_hash.hexdigest(), uncompressed_size=raw_size)
