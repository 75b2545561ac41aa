"""Craft OCI layer tars byte by byte, for tests everywhere in remora.

Tests of the converter, the snapshotter and the registry mirror all need layers with exactly the
awkward properties real images have (whiteouts, hard links across layers, file capabilities,
non-UTF-8 names, sparse and multi-GB files) and the hostile ones attackers use (``../`` names,
absolute names, headers that lie about sizes). :class:`LayerBuilder` makes those layers
deterministically — the same calls always give the same bytes, hence the same digest — so tests can
compare digests and reproduce failures.

Content is never held whole in memory unless the caller passes it as ``bytes``: files given as
``size`` + ``pattern``, as a generator or as a path on disk are streamed when the layer is written,
so :meth:`LayerBuilder.write` can produce multi-GB layers in bounded memory. GNU sparse members
are produced by GNU ``tar --sparse`` from a real sparse file (Python's tarfile cannot write them)
and spliced in verbatim.

Names are ``str`` or ``bytes``; bytes that are not UTF-8 are carried through PAX
(``hdrcharset=BINARY``) exactly.
"""
from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

_ENC = "utf-8"
_ERR = "surrogateescape"
_PIECE = 1 << 20

Content = Callable[[], Iterable[bytes]]


def _name(path: str | bytes) -> str:
    """Bytes are mapped to str the way tarfile maps them back (utf-8 + surrogateescape)."""
    return path.decode(_ENC, _ERR) if isinstance(path, bytes) else path


def _pattern(pattern: bytes, size: int) -> Content:
    if not pattern:
        raise ValueError("pattern must not be empty")

    def gen() -> Iterator[bytes]:
        piece = pattern * max(1, _PIECE // len(pattern))
        left = size
        while left > 0:
            out = piece[: min(left, len(piece))]
            left -= len(out)
            yield out

    return gen


def _from_path(path: str | os.PathLike) -> Content:
    def gen() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while piece := f.read(_PIECE):
                yield piece

    return gen


@dataclass
class _Member:
    info: tarfile.TarInfo | None     # None: ``raw`` holds complete pre-encoded member bytes
    content: Content | None = None
    raw: bytes = b""
    strict: bool = True              # content must match info.size (raw_member() may lie)


class LayerBuilder:
    """Collects members in call order and writes them as one tar (PAX format by default).

    ``mtime`` is the default modification time (seconds, int or a decimal string such as
    ``"1700000000.123456789"`` for exact nanoseconds) of every member that does not give its own.
    Nanoseconds, xattrs and non-ASCII names need PAX; ``format=tarfile.GNU_FORMAT`` (GNU long
    names) or ``USTAR_FORMAT`` drop nanoseconds and xattrs, as those formats do.
    """

    def __init__(self, *, format: int = tarfile.PAX_FORMAT, mtime: int | str = 0):
        self.format = format
        self.mtime = mtime
        self._members: list[_Member] = []

    # -- members --------------------------------------------------------------------------------
    def _info(self, path, type_, mode, uid, gid, mtime, xattrs, size=0, linkname="") -> tarfile.TarInfo:
        ti = tarfile.TarInfo(_name(path))
        ti.type = type_
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.size = size
        ti.linkname = _name(linkname)
        mtime = self.mtime if mtime is None else mtime
        if isinstance(mtime, str):
            # exact nanoseconds only survive as a PAX decimal string; the ustar field gets the seconds
            ti.mtime = int(mtime.split(".")[0])
            ti.pax_headers["mtime"] = mtime
        else:
            ti.mtime = mtime
        for key, value in (xattrs or {}).items():
            ti.pax_headers["SCHILY.xattr." + key] = value.decode(_ENC, _ERR)
        return ti

    def add_dir(self, path, *, mode=0o755, uid=0, gid=0, mtime=None, xattrs=None) -> LayerBuilder:
        self._members.append(_Member(self._info(path, tarfile.DIRTYPE, mode, uid, gid, mtime, xattrs)))
        return self

    def add_file(
        self,
        path,
        data: bytes | None = None,
        *,
        size: int | None = None,
        pattern: bytes = b"remora\n",
        source: str | os.PathLike | None = None,
        chunks: Content | None = None,
        mode=0o644,
        uid=0,
        gid=0,
        mtime=None,
        xattrs=None,
    ) -> LayerBuilder:
        """A regular file. Content is ``data``; or ``size`` bytes of ``pattern`` repeated; or the file
        at ``source``; or ``chunks()`` (a generator factory, called once per write) whose pieces
        must add up to ``size``. Only ``data`` is held in memory."""
        if data is not None:
            content, size = (lambda: (data,)), len(data)
        elif source is not None:
            content = _from_path(source)
            size = os.stat(source).st_size if size is None else size
        elif chunks is not None:
            if size is None:
                raise ValueError("chunks= needs size=")
            content = chunks
        else:
            size = size or 0
            content = _pattern(pattern, size)
        ti = self._info(path, tarfile.REGTYPE, mode, uid, gid, mtime, xattrs, size=size)
        self._members.append(_Member(ti, content))
        return self

    def add_symlink(self, path, target, *, uid=0, gid=0, mtime=None, xattrs=None) -> LayerBuilder:
        ti = self._info(path, tarfile.SYMTYPE, 0o777, uid, gid, mtime, xattrs, linkname=target)
        self._members.append(_Member(ti))
        return self

    def add_hardlink(self, path, target, *, mode=None, uid=None, gid=None, mtime=None) -> LayerBuilder:
        """A hard link to ``target``. Appliers (containerd, Docker) give the shared inode the link
        header's owner, mode and mtime, so by default the header repeats those of ``target`` as
        added earlier to this builder (what tar writers do); for a target in a lower layer pass
        them, else 0644 root and the builder's mtime are written."""
        src = next((m.info for m in reversed(self._members)
                    if m.info is not None and m.info.name.strip("/") == _name(target).strip("/")), None)
        if src is not None:
            mode = src.mode if mode is None else mode
            uid = src.uid if uid is None else uid
            gid = src.gid if gid is None else gid
            if mtime is None:
                mtime = src.pax_headers.get("mtime", src.mtime)
        ti = self._info(path, tarfile.LNKTYPE, 0o644 if mode is None else mode, uid or 0, gid or 0, mtime, None,
                        linkname=target)
        self._members.append(_Member(ti))
        return self

    def _device(self, path, type_, major, minor, mode, uid, gid, mtime):
        ti = self._info(path, type_, mode, uid, gid, mtime, None)
        ti.devmajor, ti.devminor = major, minor
        self._members.append(_Member(ti))
        return self

    def add_char(self, path, major, minor, *, mode=0o666, uid=0, gid=0, mtime=None) -> LayerBuilder:
        return self._device(path, tarfile.CHRTYPE, major, minor, mode, uid, gid, mtime)

    def add_block(self, path, major, minor, *, mode=0o660, uid=0, gid=0, mtime=None) -> LayerBuilder:
        return self._device(path, tarfile.BLKTYPE, major, minor, mode, uid, gid, mtime)

    def add_fifo(self, path, *, mode=0o644, uid=0, gid=0, mtime=None) -> LayerBuilder:
        return self._device(path, tarfile.FIFOTYPE, 0, 0, mode, uid, gid, mtime)

    def whiteout(self, path) -> LayerBuilder:
        """``dir/.wh.NAME``: deletes ``dir/NAME`` of the lower layers."""
        head, _, base = _name(path).rstrip("/").rpartition("/")
        return self.add_file(f"{head}/.wh.{base}" if head else f".wh.{base}", b"")

    def opaque(self, dir) -> LayerBuilder:
        """``dir/.wh..wh..opq``: hides every lower-layer child of ``dir``."""
        d = _name(dir).strip("/")
        return self.add_file(f"{d}/.wh..wh..opq" if d else ".wh..wh..opq", b"")

    def raw_member(self, info: tarfile.TarInfo, data: bytes = b"") -> LayerBuilder:
        """Any TarInfo as given (hostile names, odd types); ``data`` is written as its content,
        whatever ``info.size`` says — so a header can lie about its size."""
        self._members.append(_Member(info, (lambda: (data,)) if data else None, strict=False))
        return self

    def raw_bytes(self, data: bytes) -> LayerBuilder:
        """Bytes spliced in verbatim at this point (corrupt headers, garbage)."""
        self._members.append(_Member(None, raw=data))
        return self

    def add_sparse(
        self,
        path,
        size: int,
        regions: dict[int, bytes],
        *,
        mode=0o644,
        uid=0,
        gid=0,
        mtime: int = 0,
    ) -> LayerBuilder:
        """A GNU sparse member (old GNU format, type ``S``) of logical ``size`` bytes: zeros except
        ``regions`` (offset -> data). Made by GNU tar from a real sparse file, so the member holds
        only the data regions and the layer stays small even for a multi-GB file."""
        rel = os.fsencode(path).strip(b"/")
        with tempfile.TemporaryDirectory(prefix="remora-sparse-") as tmp:
            real = os.path.join(os.fsencode(tmp), rel)
            os.makedirs(os.path.dirname(real), exist_ok=True)
            with open(real, "wb") as f:
                f.truncate(size)
                for offset, data in sorted(regions.items()):
                    f.seek(offset)
                    f.write(data)
            os.chmod(real, mode)
            archive = subprocess.run(
                ["tar", "--create", "--format=gnu", "--sparse", "--no-recursion", "--numeric-owner",
                 f"--owner={uid}", f"--group={gid}", f"--mtime=@{mtime}", "-C", tmp, "-f", "-", rel],
                check=True, capture_output=True,
            ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tf:
            member = tf.next()
            end = tf.offset
        if member is None or not member.issparse():
            raise RuntimeError(f"GNU tar did not produce a sparse member for {path!r}")
        self._members.append(_Member(None, raw=archive[member.offset:end]))
        return self

    def add_tree(self, src: str | os.PathLike, prefix: str = "") -> LayerBuilder:
        """Every file below ``src`` (sorted, not following symlinks) with its real metadata; files
        sharing an inode become hard links to the first one seen, as ``tar`` would write them."""
        src = os.fspath(src)
        seen: dict[tuple[int, int], str] = {}
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            # os.walk lists symlinks to directories among dirnames (and never descends into them)
            names = sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))])
            for full in [dirpath] + [os.path.join(dirpath, n) for n in names]:
                rel = os.path.relpath(full, src)
                if rel == ".":
                    continue
                arc = os.path.join(prefix, rel) if prefix else rel
                st = os.lstat(full)
                perm = stat.S_IMODE(st.st_mode)
                sec, ns = divmod(st.st_mtime_ns, 10**9)
                kw = {"uid": st.st_uid, "gid": st.st_gid, "mtime": f"{sec}.{ns:09d}"}
                if stat.S_ISDIR(st.st_mode):
                    self.add_dir(arc, mode=perm, **kw)
                elif stat.S_ISLNK(st.st_mode):
                    self.add_symlink(arc, os.readlink(full), **kw)
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in seen:
                        self.add_hardlink(arc, seen[key], mode=perm, **kw)
                    else:
                        seen[key] = arc
                        self.add_file(arc, source=full, size=st.st_size, mode=perm, **kw)
                elif stat.S_ISCHR(st.st_mode):
                    self.add_char(arc, os.major(st.st_rdev), os.minor(st.st_rdev), mode=perm, **kw)
                elif stat.S_ISBLK(st.st_mode):
                    self.add_block(arc, os.major(st.st_rdev), os.minor(st.st_rdev), mode=perm, **kw)
                elif stat.S_ISFIFO(st.st_mode):
                    self.add_fifo(arc, mode=perm, **kw)
        return self

    # -- output ---------------------------------------------------------------------------------
    def _emit(self, out: BinaryIO) -> None:
        for m in self._members:
            if m.info is None:
                out.write(m.raw)
                continue
            out.write(m.info.tobuf(self.format, _ENC, _ERR))
            written = 0
            if m.content is not None:
                for piece in m.content():
                    out.write(piece)
                    written += len(piece)
            if m.strict and written != m.info.size:
                raise ValueError(f"{m.info.name}: content is {written} bytes, header says {m.info.size}")
            pad = -written % tarfile.BLOCKSIZE
            if pad:
                out.write(tarfile.NUL * pad)
        out.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))

    def _emit_compressed(self, out: BinaryIO, compression: str) -> None:
        if compression == "none":
            self._emit(out)
        elif compression == "gzip":
            # mtime=0 and no file name keep the gzip header, hence the digest, reproducible; level 6 as
            # Go's and pigz's default (9 is several times slower for little gain)
            with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0, filename="") as gz:
                self._emit(gz)
        elif compression == "zstd":
            import zstandard

            with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as zw:
                self._emit(zw)
        else:
            raise ValueError(f"compression must be gzip, zstd or none, not {compression!r}")

    def build(self, compression: str = "none") -> bytes:
        """The whole layer in memory (small layers)."""
        buf = io.BytesIO()
        self._emit_compressed(buf, compression)
        return buf.getvalue()

    def write(self, path: str | os.PathLike, compression: str = "none") -> int:
        """Stream the layer to ``path`` (big layers); returns its size in bytes."""
        with open(path, "wb") as f:
            self._emit_compressed(f, compression)
            return f.tell()
