"""Merge OCI layer tars, bottom to top, into one :class:`~remora.format.tree.Tree`.

This is what containerd's ``archive.Apply`` (applyNaive) does to a directory, done on an in-memory
tree instead, with the OCI image-spec (layer.md) rules where containerd is looser:

* ``DIR/.wh.NAME`` deletes ``DIR/NAME`` of the *lower* layers only; what the same layer adds stays
  (layer.md: "Files that are present in the same layer as a whiteout file can only be hidden by
  whiteout files in subsequent layers"). ``DIR/.wh..wh..opq`` hides every lower-layer child of DIR
  and keeps the same layer's children whatever the member order. We get the order independence by
  remembering which paths the current layer wrote (``_own``) and which directories hold such paths
  (``_holds_own``); a whiteout removes only what is in neither set. Whiteout files never appear in
  the result. Other ``.wh..wh.*`` names at the root are AUFS metadata and are skipped, except
  ``.wh..wh.plnk/*`` regular files, which (as in containerd) serve as hard-link targets only.
* A member replaces whatever is at its path, except a directory over a directory, which keeps its
  children and takes the member's metadata. Missing parent directories are created (0755, root,
  mtime 0; containerd uses 0700, moby 0755), for whiteout markers too, as containerd does. A
  parent that exists but is not a directory is an error. tests/converter/test_merge.py checks the
  result against containerd 1.6 applying the same layers on overlayfs, entry by entry.
* Hard links (LNKTYPE) make two entries share one :class:`Inode`, within a layer or to a lower
  layer's file. As in containerd, the link header's uid/gid, permission bits (not on a symlink),
  mtime and xattrs (added, not replacing) are applied to the shared inode; writers put the inode's
  own metadata there, so this only matters for hand-made tars. A link to a missing path or a
  directory is InvalidInput. A link to a symlink links the symlink itself (link(2) semantics;
  containerd's RootPath would follow it). containerd 1.6's overlayfs applier cannot link to a
  lower layer's file at all (it extracts into the layer's own upper dir); Docker and an apply onto
  the mounted view can, and so can this merge.
* Names are bytes (utf-8 + surrogateescape, the inverse of how tarfile decodes them), so non-UTF-8
  names round-trip; ``SCHILY.xattr.*`` PAX values are recovered as their exact bytes the same way.
  mtime keeps the nanoseconds of a PAX decimal mtime.

Security: a leading ``/`` is dropped (as containerd does), but a ``..`` component anywhere in a
member name or hard-link target is rejected, and so is a member whose parent directories lead
outside the root through a symlink already in the tree (a ``..`` climbing above ``/``); symlinks
inside the root are followed for parent directories, as containerd's RootPath does, with absolute
targets taken relative to the root. Symlink *targets* are stored as given and never followed
otherwise. Entries that resolve to the root itself are ignored (containerd: "resolved to root").
Names no Linux file system can hold (a NUL byte, a component over 255 bytes, a symlink target of
4096 bytes or more) are InvalidInput rather than a tree that fails at mount time.

Integrity: a member whose data or padding is cut short, a corrupt header, or a header split by the
end of the stream raises InvalidInput naming the layer and member. tarfile alone would treat a
corrupt header in mid-archive as a normal end of archive; :class:`_TarInfo` records why header
parsing stopped so we can tell. A stream that ends cleanly at a member boundary without the two
zero blocks is accepted, as Go's archive/tar (and so containerd) accepts it.

Speed: most members of a layer are plain regular files, directories and symlinks in the directory
of the member before. :meth:`LayerMerger._fast_regulars` applies runs of those in one loop, straight
from the read buffer (the header parsed in place, file content handed to the caller's ``whole`` as a
view, no TarInfo or file object), including members behind a PAX header that holds only time records.
Anything it does not take for certain -- another type, an unusual header or name, content not in
the buffer -- it leaves untouched for the general path, so errors and odd cases keep one
implementation; tests/converter/test_merge_fast_paths.py compares both paths on generated and
damaged layers.

The reader is strictly streaming (tarfile reads through :class:`~remora.converter.tarstream.ForwardReader`,
which only ever moves forward): file content goes straight to the caller's ``sink`` and is never
held whole, so multi-GB and sparse files need bounded memory.
The stream is read to its end, padding after the end-of-archive blocks included, so a digest
verifier wrapped around it sees the whole blob.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import BinaryIO
from zlib import adler32 as _adler32

from remora.converter.tarstream import _OCTAL, FastTarInfo, ForwardReader
from remora.errors import InvalidInput
from remora.format.tree import ChunkRef, Inode, Tree

Sink = Callable[[BinaryIO, int], "list[ChunkRef]"]
#: ``whole(data)``: the chunks of one regular file's whole content, handed over as one bytes-like
#: object (a view of the stream's buffer, valid only during the call)
Whole = Callable[[memoryview], "list[ChunkRef]"]

_ENC, _ERR = "utf-8", "surrogateescape"
_WH = b".wh."
_WH_META = b".wh..wh."
_OPAQUE = b".wh..wh..opq"
_PLNK = b".wh..wh.plnk"
_XATTR = "SCHILY.xattr."
_MAX_SYMLINK_HOPS = 40          # Linux's MAXSYMLINKS
_NAME_MAX = 255                 # longest name component Linux file systems accept
_PATH_MAX = 4096                # symlink(2) refuses targets this long or longer
#: largest logical size of a sparse member (its holes are read as zeros, so they cost time)
MAX_SPARSE_SIZE = 16 << 30
_S_IFREG = stat.S_IFREG
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)
#: header types tarfile processes with ``_proc_builtin`` alone (no PAX, GNU long name or sparse
#: data): :func:`_next_member` reads those without going through ``TarFile.next``
_PLAIN_TYPES = frozenset((tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE,
                          tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE))
_DATA_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)   # tarfile skips their data blocks
#: type bytes (as ints) of the members :meth:`LayerMerger._fast_regulars` takes: REGTYPE, AREGTYPE, CONTTYPE
_FAST_TYPES = frozenset(t[0] for t in _DATA_TYPES)
#: the ustar header fields :meth:`LayerMerger._fast_regulars` reads: name mode uid gid size mtime chksum
#: (type skipped) linkname (magic version uname gname skipped) devmajor devminor prefix
_USTAR_FAST = struct.Struct("100s8s8s8s12s12s8s1x100s6x2x32x32x8s8s155s")
_DIR, _SYMLINK = tarfile.DIRTYPE[0], tarfile.SYMTYPE[0]
_S_IFDIR, _S_IFLNK = stat.S_IFDIR, stat.S_IFLNK


@dataclass
class LayerStats:
    entries: int = 0        # tar members read (PAX/GNU long-name pseudo members not counted)
    files: int = 0          # regular files whose content went through the sink
    bytes: int = 0          # their logical size (holes of sparse files included)
    whiteouts: int = 0      # .wh.NAME and opaque markers applied


class HashingSink:
    """A sink for tests and dry runs: cuts content into fixed ``chunk_size`` pieces and records
    their sha256. With ``keep=True`` it also stores each piece by digest in ``blobs`` so a test can
    rebuild files; leave it off for big files."""

    def __init__(self, chunk_size: int = 1 << 20, keep: bool = False):
        self.chunk_size = chunk_size
        self.blobs: dict[bytes, bytes] | None = {} if keep else None

    def __call__(self, fileobj: BinaryIO, size: int) -> list[ChunkRef]:
        chunks: list[ChunkRef] = []
        left = size
        while left > 0:
            piece = fileobj.read(min(self.chunk_size, left))
            if not piece:
                raise InvalidInput(f"file content ended {left} bytes early")
            # fileobj.read may return less than asked; keep reading to fill a whole chunk
            while len(piece) < min(self.chunk_size, left):
                more = fileobj.read(min(self.chunk_size, left) - len(piece))
                if not more:
                    raise InvalidInput(f"file content ended {left - len(piece)} bytes early")
                piece += more
            digest = hashlib.sha256(piece).digest()
            if self.blobs is not None:
                self.blobs[digest] = piece
            chunks.append(ChunkRef(digest, len(piece)))
            left -= len(piece)
        return chunks

    def whole(self, data: memoryview) -> list[ChunkRef]:
        """The same chunks as ``self(reader, len(data))``, from content handed over whole."""
        return self(io.BytesIO(data), len(data))

    def content(self, node: Inode) -> bytes:
        """The bytes of a regular file merged with a ``keep=True`` sink."""
        assert self.blobs is not None, "HashingSink(keep=True) needed"
        return b"".join(self.blobs[c.digest] for c in node.chunks or ())


hashing_sink = HashingSink()


class _TarInfo(FastTarInfo):
    """Remembers why tarfile stopped reading headers: TarFile.next() swallows a corrupt or
    truncated header after the first member and reports a plain end of archive."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._remora_stop = e
            raise


class _Counting:
    """Counts bytes read from the caller's stream (an empty stream is an empty layer) and keeps
    its first bytes to recognise a stream that is still compressed."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.count = 0
        self.head = b""

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if self.count < 4:
            self.head = (self.head + data)[:4]
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}


class _Truncated:
    """The error for a member whose data is cut short, built only when it is raised."""

    __slots__ = ("where", "name", "size")

    def __init__(self, where: str, name: str, size: int):
        self.where, self.name, self.size = where, name, size

    def __call__(self) -> InvalidInput:
        return InvalidInput(f"{self.where}: truncated tar at member {self.name!r}: its {self.size} bytes of data "
                            "are cut short")


class _MemberReader(io.RawIOBase):
    """What the sink reads: exactly ``size`` bytes of one member; a short tar becomes InvalidInput."""

    def __init__(self, f: BinaryIO, size: int, truncated: Callable[[], InvalidInput]):
        self._f = f
        self._left = size
        self._truncated = truncated

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        # overridden (RawIOBase.read would go through readinto) to hand out tarfile's bytes
        # without two extra copies: content is the bulk of what a conversion moves
        n = self._left if size is None or size < 0 else min(size, self._left)
        if n == 0:
            return b""
        try:
            data = self._f.read(n)
        except (tarfile.ReadError, EOFError) as e:
            raise self._truncated() from e
        if len(data) != n:
            raise self._truncated()
        self._left -= n
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _parts(name: str) -> list[bytes]:
    return [p for p in name.encode(_ENC, _ERR).split(b"/") if p and p != b"."]


class LayerMerger:
    """Apply layers bottom-first with :meth:`apply_layer`, then take the tree with :meth:`finish`.

    ``tree`` may be an already merged lower part (it is modified in place).
    """

    @property
    def current_path(self) -> bytes:
        """Absolute path (bytes, symlinked parents resolved) of the member being applied; a sink can
        read it to treat some files differently (e.g. a prefetch list). Built when asked: most
        sinks never ask, and the join is a cost per file."""
        return b"/" + b"/".join([*self._cur_dir, self._cur_base]) if self._cur_base is not None else b"/"

    def __init__(self, tree: Tree | None = None):
        self.tree = tree or Tree()
        self.layers = 0
        self._paths = _PathIds()
        self._own: set[int] = set()          # path ids (see _PathIds) the current layer wrote
        self._holds_own: set[int] = set()    # path ids of directories holding such paths
        self._plnk: dict[bytes, Inode] = {}
        self._fresh: set[int] = set()   # id() of directories this layer created (not merged)
        self._where = ""
        self._dir_cache: tuple[list[bytes], tuple] | None = None   # see _parent_dir
        self._track = True              # remember own paths (see apply_layer)
        self._member_reader: _MemberReader | None = None
        self._plain = False             # the last _resolve_dir met no symlink
        self._cur_dir: list[bytes] = []         # current_path = _cur_dir + [_cur_base]
        self._cur_base: bytes | None = None
        self._fast_dir: bytes | None = None     # see _fast_regulars
        self._fast_found: tuple | None = None
        self._fast_cache: tuple | None = None

    # -- public ---------------------------------------------------------------------------------
    def apply_layer(self, stream: BinaryIO, sink: Sink, label: str | None = None,
                    whole: Whole | None = None) -> LayerStats:
        """Apply one uncompressed layer tar read from ``stream`` (never seeked); regular file
        content is handed to ``sink(fileobj, size)`` which returns the file's chunks (empty files
        get ``chunks=[]`` without a sink call). ``label`` (e.g. the layer digest) goes into errors.

        ``whole(data)``, if given (else ``sink.whole`` if the sink has one), must return what
        ``sink`` would for the same content: the merge calls it instead of ``sink`` for a file
        whose bytes are already in its read buffer (most small files), without a file object."""
        self.layers += 1
        self._where = f"layer {self.layers}" + (f" ({label})" if label else "")
        self._own, self._holds_own, self._plnk, self._fresh = set(), set(), {}, set()
        self._paths = _PathIds()
        self._dir_cache = None
        # Whiteouts hide lower-layer entries only. Over an empty tree (the first layer) there are
        # none, so the paths this layer writes need not be remembered (a cost per member).
        self._track = self._has_lower()
        self._member_reader = None
        self._fast_dir = self._fast_found = self._fast_cache = None
        if whole is None:
            whole = getattr(sink, "whole", None)
        if whole is None:
            def whole(data: memoryview) -> list[ChunkRef]:
                return list(sink(io.BytesIO(data), len(data)))
        stats = LayerStats()
        counting = _Counting(stream)
        reader = ForwardReader(counting)
        try:
            tf = tarfile.open(fileobj=reader, mode="r:", tarinfo=_TarInfo, encoding=_ENC, errors=_ERR)
        except (tarfile.TarError, EOFError, ValueError) as e:
            if counting.count == 0:
                return stats            # a zero-byte layer is an empty layer, as for Go's archive/tar
            hint = next((f" (it looks {kind}-compressed: pass the decompressed stream)"
                         for magic, kind in _MAGIC.items() if counting.head.startswith(magic)), "")
            raise InvalidInput(f"{self._where}: not a tar archive or truncated tar at its first member: "
                               f"{e}{hint}") from None
        last = None
        with tf:
            while True:
                fast_last = self._fast_regulars(tf, reader, whole, stats)
                if fast_last is not None:
                    last = fast_last.decode(_ENC, _ERR)
                tf._remora_stop = None
                try:
                    ti = _next_member(tf, reader)
                except (tarfile.ReadError, EOFError) as e:
                    raise InvalidInput(f"{self._where}: truncated tar at member {last!r}: {e}") from None
                except (tarfile.TarError, ValueError) as e:     # e.g. a garbled PAX hdrcharset
                    raise InvalidInput(f"{self._where}: corrupt tar header after member {last!r}: {e!r}") from None
                if ti is None:
                    self._check_end(tf, last)
                    break
                tf.members.clear()      # TarFile keeps every TarInfo otherwise; layers can be huge
                last = ti.name
                stats.entries += 1
                self._apply_member(tf, ti, sink, stats)
        # read the zero padding after the end-of-archive blocks too, so that a digest check the
        # caller wrapped around the stream sees every byte of the blob
        counting.drain()
        return stats

    def _fast_regulars(self, tf: tarfile.TarFile, reader: ForwardReader, whole: Whole,
                       stats: LayerStats) -> bytes | None:
        """Apply the run of plain regular-file, directory and symlink members that starts at
        ``tf.offset``, as :func:`_next_member` + :meth:`_apply_member` would, in one loop with no
        call per member but ``whole`` (they were most of the per-file cost on images of many small
        files).

        A member is taken only when nothing about it needs a decision: a well-formed ustar header
        of one of those types (before it no GNU header, and no PAX header but one of times only,
        see :func:`_pax_times`; no global one in force), header and content already in the reader's
        buffer, a name with no ``.``/``..``/empty component or whiteout prefix, whose parent
        directory resolves as the general path resolves it (remembered from the member before
        while it stays valid, see :meth:`_parent_dir`). At the
        first member that is anything else the loop stops *before* it, with the reader and the
        TarFile untouched, and the general path reads it -- so every error and every unusual
        case keeps that path's handling. Returns the raw name of the last member applied, or None.
        """
        if tf.firstmember is not None or tf.pax_headers or not tf.offset:
            return None
        unpack, octal, track = _USTAR_FAST.unpack_from, _OCTAL, self._track
        # The loop never refills the buffer, so positions are indexes into ``buf``; the reader, the
        # TarFile and the counters are brought up to date once, on the way out.
        buf, pos0, offset = reader._buf, reader._pos, tf.offset
        fast_dir, fast_found, fast_cache = self._fast_dir, self._fast_found, self._fast_cache
        consumed = entries = files = nbytes = 0
        last = None
        try:
            while True:
                skip = offset - pos0
                head = skip + 512
                if skip < 0 or len(buf) < head:
                    break
                pax_mtime: bytes | None = None
                if buf[skip + 156] == 0x78:     # a PAX header: taken if it only holds times
                    times = _pax_times(buf, skip)
                    if times is None:
                        break
                    pax_mtime, skip = times
                    head = skip + 512
                    if len(buf) < head:
                        break
                typ = buf[skip + 156]
                if typ not in _FAST_TYPES and typ != _DIR and typ != _SYMLINK:
                    break
                name, mode, uid, gid, size, mtime, chksum, link, devmajor, devminor, prefix = unpack(buf, skip)
                try:        # as FastTarInfo._frombuf_fast: anything else is left to it and tarfile
                    mode, uid, gid, devmajor, devminor = (octal[mode], octal[uid], octal[gid], octal[devmajor],
                                                          octal[devminor])
                    size = int(size.rstrip(b"\0 ") or b"0", 8)
                    mtime = int(mtime.rstrip(b"\0 ") or b"0", 8)
                    chksum = int(chksum.rstrip(b"\0 ") or b"0", 8)
                except ValueError:
                    break
                if chksum != 253 + (_adler32(buf[skip:skip + 148]) & 0xFFFF) + (
                        _adler32(buf[skip + 156:skip + 412]) & 0xFFFF) + (_adler32(buf[skip + 412:head]) & 0xFFFF):
                    break
                regular = typ in _FAST_TYPES
                if regular:
                    end = head + size
                    if len(buf) < end:
                        break       # content not all in the buffer: the general path reads it
                    raw = name.split(b"\0", 1)[0]
                else:
                    if size:
                        break       # tarfile reads no data for these; leave the odd case to it
                    end = head
                    raw = name.split(b"\0", 1)[0]
                    if typ == _DIR:
                        raw = raw.rstrip(b"/")     # as TarInfo.frombuf, before the prefix
                if prefix[0]:
                    pre = prefix.split(b"\0", 1)[0]
                    if pre:
                        raw = pre + b"/" + raw
                dir_raw, _, base = raw.rpartition(b"/")
                if not base or base == b"." or base == b".." or base.startswith(_WH):
                    break           # (an AREGTYPE name ending in "/", a directory, has no base either)
                if dir_raw == fast_dir and self._dir_cache is fast_cache:
                    dir_node, dir_path, dir_id = fast_found
                else:
                    parts = [p for p in dir_raw.split(b"/") if p and p != b"."]
                    if b".." in parts or (parts and parts[0].startswith(_WH_META)) or len(raw) > _NAME_MAX:
                        break
                    # may raise, exactly as the general path's call for this member would
                    found = self._parent_dir(parts, raw.decode(_ENC, _ERR))
                    dir_node, dir_path, dir_id = found
                    fast_cache = self._dir_cache
                    fast_dir, fast_found = (dir_raw, found) if fast_cache is not None else (None, None)
                # header and content are consumed; the padding is skipped with the next header
                consumed = end
                offset = pos0 + head + ((size + 511) & ~511)
                last = raw
                entries += 1
                self._cur_dir, self._cur_base = dir_path, base
                # what _regular / _make_node give: _mtime_ns of the PAX mtime, else the header's
                mtime_ns = (int(Decimal(pax_mtime.decode()) * 1_000_000_000) if pax_mtime is not None
                            else mtime * 1_000_000_000)
                if not regular:
                    if typ == _DIR:
                        node = dir_node.children.get(base)
                        if node is not None and node.is_dir:
                            # directory over directory: merge (keep children), take the layer's metadata
                            node.mode = _S_IFDIR | (mode & 0o7777)
                            node.uid, node.gid, node.mtime_ns, node.xattrs = uid, gid, mtime_ns, {}
                        else:
                            node = Inode(_S_IFDIR | (mode & 0o7777), uid, gid, mtime_ns, children={})
                            self._fresh.add(id(node))
                    else:
                        target = link.split(b"\0", 1)[0]
                        node = Inode(_S_IFLNK | 0o777, uid, gid, mtime_ns, len(target), target=target)
                    dir_node.children[base] = node
                    if track:
                        self._mark_own(self._paths.intern(dir_id, base))
                    continue
                if size:
                    chunks = whole(buf[head:end])
                    got = chunks[0].size if len(chunks) == 1 else sum(c.size for c in chunks)
                    if got != size:
                        raise RuntimeError(f"{self._where}: sink returned chunks for {got} bytes of "
                                           f"{raw.decode(_ENC, _ERR)!r}, which has {size}")
                else:
                    chunks = []
                files += 1
                nbytes += size
                dir_node.children[base] = Inode(_S_IFREG | (mode & 0o7777), uid, gid, mtime_ns, size, chunks=chunks)
                if track:
                    self._mark_own(self._paths.intern(dir_id, base))
        finally:
            if consumed:
                reader._buf = buf[consumed:]
                reader._pos = pos0 + consumed
                tf.offset = offset
                stats.entries += entries
                stats.files += files
                stats.bytes += nbytes
            self._fast_dir, self._fast_found, self._fast_cache = fast_dir, fast_found, fast_cache
        return last

    def _has_lower(self) -> bool:
        return bool(self.tree.root.children)

    def finish(self) -> Tree:
        """Number the inodes (Tree.number) and return the merged tree."""
        self.tree.number()
        return self.tree

    # -- members --------------------------------------------------------------------------------
    def _check_end(self, tf: tarfile.TarFile, last: str | None) -> None:
        stop = getattr(tf, "_remora_stop", None)
        if stop is None or isinstance(stop, (tarfile.EOFHeaderError, tarfile.EmptyHeaderError)):
            return
        if isinstance(stop, tarfile.TruncatedHeaderError):
            raise InvalidInput(f"{self._where}: truncated tar at member {last!r}: header cut short")
        raise InvalidInput(f"{self._where}: corrupt tar header after member {last!r} at offset {tf.offset}: {stop}")

    def _err(self, name: str, msg: str) -> InvalidInput:
        return InvalidInput(f"{self._where}: member {name!r}: {msg}")

    def _member_parts(self, name: str) -> list[bytes]:
        raw = name.encode(_ENC, _ERR)
        parts = raw.split(b"/")
        if b"" in parts or b"." in parts:
            parts = [p for p in parts if p and p != b"."]
        if b".." in parts:
            raise self._err(name, "'..' in the name would write outside the root; refusing")
        if b"\0" in raw or len(raw) > _NAME_MAX:     # else no component can break a rule
            self._check_components(name, parts, "name")
        return parts

    def _check_components(self, name: str, parts: list[bytes], what: str) -> None:
        # a PAX path can carry what no Linux file system can hold; refuse it here rather than
        # produce a tree that fails at mount or unpack time
        for p in parts:
            if b"\0" in p:
                raise self._err(name, f"NUL byte in the {what}")
            if len(p) > _NAME_MAX:
                raise self._err(name, f"a component of the {what} is {len(p)} bytes long (at most {_NAME_MAX})")

    def _apply_member(self, tf: tarfile.TarFile, ti: tarfile.TarInfo, sink: Sink, stats: LayerStats) -> None:
        parts = self._member_parts(ti.name)
        if not parts:
            return                                  # "./": resolves to the root, ignored
        if parts[0].startswith(_WH_META) and parts != [_OPAQUE]:
            if parts[0] == _PLNK and len(parts) == 2 and ti.type in _REGULAR:
                self._cur_dir, self._cur_base = parts[:-1], parts[-1]
                self._plnk[parts[1]] = self._regular(tf, ti, sink, stats)
            return                                  # AUFS metadata
        dir_node, dir_path, dir_id = self._parent_dir(parts[:-1], ti.name)
        base = parts[-1]
        if base.startswith(_WH):
            stats.whiteouts += 1
            if base == _OPAQUE:
                if self._track:
                    for child in list(dir_node.children):
                        self._hide_lower(dir_node, child, dir_id)
            else:
                target = base[len(_WH):]
                if target in (b"", b".", b".."):
                    raise self._err(ti.name, "invalid whiteout name")
                if self._track:
                    self._hide_lower(dir_node, target, dir_id)
            return
        existing = dir_node.children.get(base)
        self._cur_dir, self._cur_base = dir_path, base
        node = self._make_node(tf, ti, sink, stats, existing)
        dir_node.children[base] = node
        if self._track:
            self._mark_own(self._paths.intern(dir_id, base))

    def _make_node(self, tf, ti: tarfile.TarInfo, sink: Sink, stats: LayerStats, existing: Inode | None) -> Inode:
        t = ti.type
        if t == tarfile.DIRTYPE:
            if existing is not None and existing.is_dir:
                # directory over directory: merge (keep children), take the layer's metadata
                meta = self._meta(ti)
                existing.mode = stat.S_IFDIR | (ti.mode & 0o7777)
                existing.uid, existing.gid = meta["uid"], meta["gid"]
                existing.mtime_ns, existing.xattrs = meta["mtime_ns"], meta["xattrs"]
                return existing
            node = Inode.directory(ti.mode, **self._meta(ti))
            self._fresh.add(id(node))
            return node
        if t in _REGULAR:
            return self._regular(tf, ti, sink, stats)
        if t == tarfile.SYMTYPE:
            target = ti.linkname.encode(_ENC, _ERR)
            if b"\0" in target or len(target) >= _PATH_MAX:
                raise self._err(ti.name, f"symlink target of {len(target)} bytes is not a valid Linux path")
            return Inode(mode=stat.S_IFLNK | 0o777, size=len(target), target=target, **self._meta(ti))
        if t == tarfile.LNKTYPE:
            node = self._link_target(ti)
            # containerd lchowns, setxattrs, chmods (unless it is a symlink) and chtimes the new
            # name after link(2), i.e. the shared inode
            meta = self._meta(ti)
            node.uid, node.gid, node.mtime_ns = meta["uid"], meta["gid"], meta["mtime_ns"]
            node.xattrs.update(meta["xattrs"])
            if not node.is_symlink:
                node.mode = stat.S_IFMT(node.mode) | (ti.mode & 0o7777)
            return node
        if t in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            kind = stat.S_IFCHR if t == tarfile.CHRTYPE else stat.S_IFBLK
            return Inode(mode=kind | (ti.mode & 0o7777), rdev=os.makedev(ti.devmajor, ti.devminor), **self._meta(ti))
        if t == tarfile.FIFOTYPE:
            return Inode(mode=stat.S_IFIFO | (ti.mode & 0o7777), **self._meta(ti))
        raise self._err(ti.name, f"unsupported tar member type {t!r}")

    def _meta(self, ti: tarfile.TarInfo) -> dict:
        if not ti.pax_headers:      # most members: no xattrs, whole-second mtime
            if not (0 <= ti.uid < 1 << 32 and 0 <= ti.gid < 1 << 32):
                raise self._err(ti.name, f"uid/gid {ti.uid}/{ti.gid} out of range")
            return {"uid": ti.uid, "gid": ti.gid, "mtime_ns": int(ti.mtime) * 1_000_000_000, "xattrs": {}}
        try:
            xattrs = _xattrs(ti)
            mtime_ns = _mtime_ns(ti)
        except InvalidInput as e:
            raise InvalidInput(f"{self._where}: {e}") from None
        if not (0 <= ti.uid < 1 << 32 and 0 <= ti.gid < 1 << 32):
            raise self._err(ti.name, f"uid/gid {ti.uid}/{ti.gid} out of range")
        return {"uid": ti.uid, "gid": ti.gid, "mtime_ns": mtime_ns, "xattrs": xattrs}

    def _regular(self, tf: tarfile.TarFile, ti: tarfile.TarInfo, sink: Sink, stats: LayerStats) -> Inode:
        size = ti.size
        where, name = self._where, ti.name
        truncated = _Truncated(where, name, size)
        if size < 0:
            raise self._err(name, f"negative size {size}")
        if ti.sparse is None:
            # a plain member's bytes follow its header: read them straight from the stream
            # (tarfile's per-member file objects only add calls and copies)
            if not size:
                chunks = []
            else:
                tf.fileobj.seek(ti.offset_data)
                # one reader per layer, re-aimed at each member (an io object costs ~2 us to make
                # and finalize, per file); a sink that closed it gets a new one
                reader = self._member_reader
                if reader is None or reader.closed:
                    reader = self._member_reader = _MemberReader(tf.fileobj, size, truncated)
                else:
                    reader._f, reader._left, reader._truncated = tf.fileobj, size, truncated
                chunks = list(sink(reader, size))
        else:
            # the holes of a sparse member cost no input bytes but every byte of them goes
            # through the sink: a 1 KB layer declaring an exabyte file would convert forever
            if size > MAX_SPARSE_SIZE:
                raise self._err(name, f"sparse file of {size} bytes (holes included) is over the "
                                      f"{MAX_SPARSE_SIZE >> 30} GiB limit for sparse files")
            try:
                src = tf.extractfile(ti)
            except (tarfile.ReadError, EOFError) as e:  # GNU sparse 1.0 maps live in the data area
                raise truncated() from e
            reader = _MemberReader(getattr(src, "raw", src), size, truncated)
            chunks = list(sink(reader, size)) if size else []
        got = chunks[0].size if len(chunks) == 1 else sum(c.size for c in chunks)
        if got != size:
            raise RuntimeError(f"{where}: sink returned chunks for {got} bytes of {name!r}, which has {size}")
        stats.files += 1
        stats.bytes += size
        if not ti.pax_headers:      # _meta's common case, without building its dict
            uid, gid = ti.uid, ti.gid
            if not (0 <= uid < 1 << 32 and 0 <= gid < 1 << 32):
                raise self._err(name, f"uid/gid {uid}/{gid} out of range")
            return Inode(_S_IFREG | (ti.mode & 0o7777), uid, gid, int(ti.mtime) * 1_000_000_000, size, chunks=chunks)
        return Inode(mode=stat.S_IFREG | (ti.mode & 0o7777), size=size, chunks=chunks, **self._meta(ti))

    def _link_target(self, ti: tarfile.TarInfo) -> Inode:
        parts = _parts(ti.linkname)
        if b".." in parts:
            raise self._err(ti.name, f"hard link target {ti.linkname!r} has a '..' component; refusing")
        self._check_components(ti.name, parts, "hard link target")
        if not parts:
            raise self._err(ti.name, "hard link to the root directory")
        if parts[0] == _PLNK and len(parts) == 2:
            node = self._plnk.get(parts[1])
        else:
            found = self._resolve_dir(parts[:-1], ti.name, create=False)
            node = found[0].children.get(parts[-1]) if found else None
        if node is None:
            raise self._err(ti.name, f"hard link target {ti.linkname!r} does not exist")
        if node.is_dir:
            raise self._err(ti.name, f"hard link target {ti.linkname!r} is a directory")
        return node

    # -- paths ----------------------------------------------------------------------------------
    def _parent_dir(self, parts: list[bytes], member: str):
        """``_resolve_dir(parts, member, create=True)``, remembering the last answer: members come
        grouped by directory, and a member can only change its parent's children, never the
        directories leading to it. So the answer for the previous member's parent holds as long as
        the parent is the same and its resolution followed no symlink (a symlink target with ``..``
        passes through directories that are not ancestors of the result). Any other member's
        parent is resolved afresh and replaces the remembered one."""
        cached = self._dir_cache
        if cached is not None and cached[0] == parts:
            return cached[1]
        found = self._resolve_dir(parts, member, create=True)
        self._dir_cache = (parts, found) if self._plain else None
        return found

    def _resolve_dir(self, parts: list[bytes], member: str, create: bool):
        """Walk ``parts`` from the root following symlinks (absolute targets from the root) and
        return ``(dir_inode, resolved_path, path_id)`` (``path_id`` only with ``create``; see
        :class:`_PathIds`). Missing directories are created (``create``) or make the result None.
        A ``..`` above the root, a symlink loop or a non-directory in the way is InvalidInput."""
        nodes = [self.tree.root]
        path: list[bytes] = []
        ids = [_PathIds.ROOT]
        todo = list(reversed(parts))        # a stack: symlink targets are pushed in front
        hops = 0
        while todo:
            c = todo.pop()
            if c == b"..":                  # only from symlink targets: member names have none
                if not path:
                    raise self._err(member, "its parent directories resolve outside the root through a symlink")
                path.pop()
                nodes.pop()
                ids.pop()
                continue
            cur = nodes[-1]
            child = cur.children.get(c)
            if child is None:
                if not create:
                    return None
                child = Inode.directory(0o755)
                self._fresh.add(id(child))
                cur.children[c] = child
                if self._track:
                    self._mark_own(self._paths.intern(ids[-1], c))
            elif child.is_symlink:
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise self._err(member, "too many levels of symbolic links in its parent directories")
                target = child.target or b""
                if target.startswith(b"/"):
                    path, nodes, ids = [], [self.tree.root], [_PathIds.ROOT]
                todo.extend(reversed([p for p in target.split(b"/") if p and p != b"."]))
                continue
            elif not child.is_dir:
                raise self._err(member, f"parent {b'/'.join(path + [c]).decode(_ENC, _ERR)!r} is not a directory")
            path.append(c)
            nodes.append(child)
            # ids stays as long as nodes (a ".." pops both); only interned when it is used
            ids.append(self._paths.intern(ids[-1], c) if create and self._track else _PathIds.ROOT)
        self._plain = hops == 0
        return nodes[-1], path, ids[-1]

    def _mark_own(self, pid: int) -> None:
        self._own.add(pid)
        # ancestors are added together, so the first one already present has all above it too
        parent = self._paths.parent
        p = parent[pid]
        while p >= 0 and p not in self._holds_own:
            self._holds_own.add(p)
            p = parent[p]

    def _hide_lower(self, parent: Inode, name: bytes, parent_id: int) -> None:
        """Remove ``parent/name`` and everything below it that lower layers put there; keep what
        the current layer wrote (and the directories leading to it). ``parent_id`` is the path id
        of ``parent``."""
        todo = [(parent, name, parent_id)]
        while todo:
            parent, name, pid = todo.pop()
            node = parent.children.get(name)
            if node is None:
                continue
            cid = self._paths.get(pid, name)
            if cid is None or (cid not in self._own and cid not in self._holds_own):
                del parent.children[name]
            elif node.children and id(node) not in self._fresh:
                # a directory this layer created holds nothing from below: no need to look inside
                todo.extend((node, c, cid) for c in node.children)


class _PathIds:
    """The resolved paths one layer touches, each as a small integer: ``(parent id, name) -> id``.

    The merge must remember which paths the current layer wrote and which directories hold them.
    Sets of path tuples cost the square of the depth (one member with 20,000 components made
    20,000 tuples of up to 20,000 names: 3 GB); ids cost one dict entry per distinct component.
    """

    ROOT = 0

    def __init__(self):
        self._ids: dict[tuple[int, bytes], int] = {}
        self.parent: list[int] = [-1]       # id -> parent id (the root has none)

    def intern(self, parent: int, name: bytes) -> int:
        key = (parent, name)
        pid = self._ids.get(key)
        if pid is None:
            pid = self._ids[key] = len(self.parent)
            self.parent.append(parent)
        return pid

    def get(self, parent: int, name: bytes) -> int | None:
        return self._ids.get((parent, name))


def _next_member(tf: tarfile.TarFile, reader: ForwardReader) -> tarfile.TarInfo | None:
    """``tf.next()``, with the common member read here: a well-formed ustar header (see
    :meth:`FastTarInfo._frombuf_fast`) of a plain type, with no PAX or GNU header before it and no
    global PAX header in force. That is what ``TarFile.next`` and ``TarInfo._proc_builtin`` do for
    it, without their calls per member (they were a third of the per-file cost on images of small
    files). Anything else -- extended headers, zero blocks, bad checksums, a short header -- is left
    unread and goes through ``tf.next()``, so its handling and errors are tarfile's."""
    offset = tf.offset
    if tf.firstmember is None and not tf.pax_headers and offset:
        # as TarFile.next (a seek to offset - 1 and a read of one byte): the skipped content and
        # padding must exist; ForwardReader.seek stops at the end of the stream
        if reader.seek(offset) != offset:
            raise tarfile.ReadError("unexpected end of data")
        buf = reader.peek_block(tarfile.BLOCKSIZE)
        if len(buf) == tarfile.BLOCKSIZE and buf[156:157] in _PLAIN_TYPES:
            ti = _TarInfo._frombuf_fast(buf, _ENC, _ERR)
            if ti is not None and ti.type in _PLAIN_TYPES:
                reader.skip_peeked(tarfile.BLOCKSIZE)
                ti.offset = offset
                ti.offset_data = offset + tarfile.BLOCKSIZE
                tf.offset = ti.offset_data + (ti._block(ti.size) if ti.type in _DATA_TYPES else 0)
                ti.pax_headers = {}
                return ti
    return tf.next()


_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")      # tarfile's own record pattern (TarInfo._proc_pax)
_PAX_TIME_KEYS = frozenset((b"mtime", b"atime", b"ctime"))
_ZEROS = bytes(512)
_PAX_DECIMAL = re.compile(rb"[0-9]{1,30}(?:\.[0-9]{1,30})?")


def _pax_times(buf: memoryview, skip: int) -> tuple[bytes | None, int] | None:
    """For a PAX extended header at ``buf[skip:]`` that holds nothing but well-formed ``mtime``,
    ``atime`` or ``ctime`` records (what Python's tarfile and GNU tar --posix put before most
    members): ``(its mtime value or None, index of the member header after it)``; None for any
    other header, which tarfile then reads. On what is accepted here tarfile's ``_proc_pax``
    yields exactly these records and no other effect: no path, size, charset, sparse or xattr
    key, and the padding after the records is zeros (tarfile's loop would read records there)."""
    head = skip + 512
    _name, mode, uid, gid, size, mtime, chksum, _link, devmajor, devminor, _prefix = _USTAR_FAST.unpack_from(buf, skip)
    try:        # the header itself as FastTarInfo._frombuf_fast would take it
        _ = (_OCTAL[mode], _OCTAL[uid], _OCTAL[gid], _OCTAL[devmajor], _OCTAL[devminor])
        size = int(size.rstrip(b"\0 ") or b"0", 8)
        int(mtime.rstrip(b"\0 ") or b"0", 8)
        chksum = int(chksum.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        return None
    if chksum != 253 + (_adler32(buf[skip:skip + 148]) & 0xFFFF) + (
            _adler32(buf[skip + 156:skip + 412]) & 0xFFFF) + (_adler32(buf[skip + 412:head]) & 0xFFFF):
        return None
    nxt = head + ((size + 511) & ~511)
    if not 0 < size <= 4096 or len(buf) < nxt or buf[head + size:nxt].tobytes() != _ZEROS[:nxt - head - size]:
        return None
    data = buf[head:head + size].tobytes()
    pos, value = 0, None
    while pos < size:
        m = _PAX_RECORD.match(data, pos)
        if m is None:
            return None
        end = pos + int(m.group(1))
        key = m.group(2)
        if key not in _PAX_TIME_KEYS or end <= pos or end > size or data[end - 1] != 0x0A:
            return None
        v = data[m.end(2) + 1:end - 1]          # tarfile's slice for the value
        if _PAX_DECIMAL.fullmatch(v) is None:
            return None
        if key == b"mtime":
            value = v
        pos = end
    return value, nxt


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    pax = ti.pax_headers.get("mtime")
    if pax is not None:
        try:
            return int(Decimal(pax) * 1_000_000_000)
        except (ArithmeticError, ValueError):   # not a number (tarfile made it 0), NaN, Infinity
            pass
    try:
        return int(ti.mtime) * 1_000_000_000
    except (OverflowError, ValueError):     # a PAX "nan" or "inf" (tarfile's float): no time at all
        raise InvalidInput(f"member {ti.name!r}: PAX mtime {pax!r} is not a finite number") from None


def _xattrs(ti: tarfile.TarInfo) -> dict[str, bytes]:
    # SCHILY.xattr.* only, as Go's archive/tar and containerd (bsdtar's LIBARCHIVE.xattr.* ignored)
    out = {}
    for k, v in ti.pax_headers.items():
        if k.startswith(_XATTR):
            if len(k) == len(_XATTR):
                raise InvalidInput(f"member {ti.name!r}: empty xattr name in its PAX header")
            out[k[len(_XATTR):]] = v.encode(_ENC, _ERR)
    return out
