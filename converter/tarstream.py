"""Fast paths under :mod:`tarfile` for reading a layer tar once, front to back.

Why this exists: with ``tarfile``'s stream mode (``r|``) the header parsing and its record buffer were
the converter's main cost on real images (thousands of small files, a PAX header on every member).
Stream mode reads its source in 10 KB records and re-slices (copies) its whole buffer on every read,
so a 1 MiB content read costs a hundred small reads and four copies, and every 512-byte header costs
a copy of the buffer's rest. Regular mode (``r:``) only needs ``tell()`` and ``seek()``, and when
members are read in order it only ever seeks forward (over padding and unread content), so
:class:`ForwardReader` provides exactly that over any non-seekable stream, with one copy per byte.

:class:`FastTarInfo` parses the common header (octal numbers, unsigned checksum, not old-GNU sparse)
with fewer Python calls than ``TarInfo.frombuf`` and hands every other header to ``frombuf``
unchanged, so unusual headers (base-256 numbers, signed checksums, zero blocks, garbage) keep
tarfile's exact behaviour and exceptions.
"""
from __future__ import annotations

import io
import struct
import tarfile
from typing import BinaryIO

_BLOCK = 1 << 20
_EMPTY = memoryview(b"")
# name mode uid gid size mtime chksum type linkname magic version uname gname devmajor devminor prefix
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")


class ForwardReader:
    """``read``/``tell``/forward ``seek`` over a stream that is read only once, in large blocks.

    A backward seek raises :class:`io.UnsupportedOperation`: tarfile never needs one when members
    are read in archive order, and reading the source again is impossible by design.
    """

    def __init__(self, f: BinaryIO, block: int = _BLOCK):
        self._f = f
        self._block = block
        self._buf = _EMPTY      # unread part of the last block from the source
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or pos < self._pos:
            raise io.UnsupportedOperation(f"a layer tar is read once, front to back (seek to {pos} from {self._pos})")
        while pos > self._pos:
            if not self._buf:
                data = self._f.read(self._block)
                if not data:
                    break           # like tarfile's stream: the next read reports the early end
                self._buf = memoryview(data)
            n = min(pos - self._pos, len(self._buf))
            self._buf = self._buf[n:]
            self._pos += n
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 62
        buf = self._buf
        if len(buf) >= n:
            self._buf = buf[n:]
            self._pos += n
            return bytes(buf[:n])
        parts = [buf] if buf else []
        got = len(buf)
        self._buf = _EMPTY
        while got < n:
            data = self._f.read(max(self._block, n - got))
            if not data:
                break
            take = min(n - got, len(data))
            if take == len(data):
                parts.append(data)
            else:
                mv = memoryview(data)
                parts.append(mv[:take])
                self._buf = mv[take:]
            got += take
        self._pos += got
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]     # a whole block of the source: no copy
        return b"".join(parts)


class FastTarInfo(tarfile.TarInfo):
    """``TarInfo`` with a quicker ``frombuf`` for well-formed headers (see the module docstring)."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        obj = cls._frombuf_fast(buf, encoding, errors)
        return obj if obj is not None else super().frombuf(buf, encoding, errors)

    @classmethod
    def _frombuf_fast(cls, buf, encoding, errors):
        if len(buf) != tarfile.BLOCKSIZE or buf[156:157] == tarfile.GNUTYPE_SPARSE:
            return None
        (name, mode, uid, gid, size, mtime, chksum, typ, linkname, _magic, _version, uname, gname,
         devmajor, devminor, prefix) = _USTAR.unpack_from(buf)
        try:
            # tarfile.nti for octal fields; base-256 numbers or text after the NUL raise: fall back
            mode, uid, gid, size, mtime, chksum, devmajor, devminor = (
                [int(f.rstrip(b"\0 ") or b"0", 8) for f in (mode, uid, gid, size, mtime, chksum, devmajor, devminor)])
        except ValueError:
            return None
        if chksum != 256 + sum(buf) - sum(buf[148:156]):
            return None         # zero block, signed checksum or a bad one: tarfile decides
        obj = cls()
        obj.name = _nts(name, encoding, errors)
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime, obj.chksum = mode, uid, gid, size, mtime, chksum
        obj.type = typ
        obj.linkname = _nts(linkname, encoding, errors)
        obj.uname = _nts(uname, encoding, errors)
        obj.gname = _nts(gname, encoding, errors)
        obj.devmajor, obj.devminor = devmajor, devminor
        prefix = _nts(prefix, encoding, errors)
        # the rest mirrors TarInfo.frombuf
        if typ == tarfile.AREGTYPE and obj.name.endswith("/"):
            obj.type = tarfile.DIRTYPE
        if obj.type == tarfile.DIRTYPE:
            obj.name = obj.name.rstrip("/")
        if prefix and obj.type not in tarfile.GNU_TYPES:
            obj.name = prefix + "/" + obj.name
        return obj


def _nts(field: bytes, encoding: str, errors: str) -> str:
    return field.split(b"\0", 1)[0].decode(encoding, errors)
