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
from zlib import adler32 as _adler32

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

    def peek_block(self, n: int) -> bytes:
        """The next ``n`` bytes without consuming them (fewer only at the end of the stream): lets a
        caller try a fast parse of a header and leave the bytes to tarfile when it declines."""
        buf = self._buf
        if len(buf) >= n:
            return bytes(buf[:n])
        parts = [bytes(buf)]
        got = len(buf)
        while got < n:
            data = self._f.read(self._block)
            if not data:
                break
            parts.append(data)
            got += len(data)
        self._buf = memoryview(b"".join(parts))
        return bytes(self._buf[:n])

    def skip_peeked(self, n: int) -> None:
        """Consume ``n`` bytes a :meth:`peek_block` returned."""
        self._buf = self._buf[n:]
        self._pos += n

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
            # tarfile.nti for octal fields; base-256 numbers or text after the NUL raise: fall back.
            # Fields that repeat from member to member (mode, owner, device numbers) come from a cache.
            octal = _OCTAL
            mode, uid, gid, devmajor, devminor = octal[mode], octal[uid], octal[gid], octal[devmajor], octal[devminor]
            size = int(size.rstrip(b"\0 ") or b"0", 8)
            mtime = int(mtime.rstrip(b"\0 ") or b"0", 8)
            chksum = int(chksum.rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
        # tarfile's calc_chksums (unsigned): the bytes' sum with the checksum field read as spaces.
        # adler32's low half is 1 + the sum of its input while that stays under 65521, which holds
        # for pieces of at most 256 bytes: three C calls instead of iterating 512 ints.
        if chksum != 253 + (_adler32(buf[:148]) & 0xFFFF) + (_adler32(buf[156:412]) & 0xFFFF) + (
                _adler32(buf[412:512]) & 0xFFFF):
            return None         # zero block, signed checksum or a bad one: tarfile decides
        obj = cls()
        obj.name = name.split(b"\0", 1)[0].decode(encoding, errors)
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime, obj.chksum = mode, uid, gid, size, mtime, chksum
        obj.type = typ
        # tarfile.nts; empty fields (most link names, prefixes, often owner names) without a call
        obj.linkname = linkname.split(b"\0", 1)[0].decode(encoding, errors) if linkname[0] else ""
        obj.uname = uname.split(b"\0", 1)[0].decode(encoding, errors) if uname[0] else ""
        obj.gname = gname.split(b"\0", 1)[0].decode(encoding, errors) if gname[0] else ""
        obj.devmajor, obj.devminor = devmajor, devminor
        # the rest mirrors TarInfo.frombuf
        if typ == tarfile.AREGTYPE and obj.name.endswith("/"):
            obj.type = tarfile.DIRTYPE
        if obj.type == tarfile.DIRTYPE:
            obj.name = obj.name.rstrip("/")
        if prefix[0] and obj.type not in tarfile.GNU_TYPES:
            prefix = prefix.split(b"\0", 1)[0].decode(encoding, errors)
            if prefix:
                obj.name = prefix + "/" + obj.name
        return obj


class _OctalCache(dict):
    """Raw octal header field -> value, for the fields that repeat across a layer's members. Bounded:
    a layer of ever-new values only stops filling it (a miss costs one ``int``)."""

    def __missing__(self, field: bytes) -> int:
        value = int(field.rstrip(b"\0 ") or b"0", 8)      # ValueError: the header is not for us
        if len(self) < 4096:
            self[field] = value
        return value


_OCTAL = _OctalCache()


def _nts(field: bytes, encoding: str, errors: str) -> str:
    return field.split(b"\0", 1)[0].decode(encoding, errors)
