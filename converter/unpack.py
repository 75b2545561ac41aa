"""``remora unpack IMAGE DIR``: materialise a remora image's merged root file system.

The inverse of conversion, used to prove ``unpack(convert(X)) == flatten(X)`` byte for byte and in
every piece of metadata: content, modes incl. setuid/setgid/sticky, uid/gid, mtimes (ns), symlinks,
hard links, devices, fifos and xattrs. Every chunk is verified against its digest before it is
written. Zero chunks become holes, so sparse files stay sparse.

Unpack runs as root on a tree described by an untrusted bootstrap, so it cannot be allowed to write
anywhere but under DIR, whatever the bootstrap says and whatever DIR already holds:

* every object is created relative to an open directory fd (``openat``/``mkdirat``/``symlinkat``/
  ``linkat``/``mknodat``), never through a path, and nothing is ever followed: directories are
  entered with ``O_DIRECTORY|O_NOFOLLOW``, files created with ``O_CREAT|O_EXCL|O_NOFOLLOW``;
* a name must be one path component (no ``/``, NUL, ``.`` or ``..``) and unique in its directory,
  even if the bootstrap validator missed it (defence in depth);
* metadata is set on the open fd (``fchown``/``fchmod``/``futimens``/``fsetxattr``); symlinks,
  devices and fifos, which cannot be opened for writing, get it via ``*at`` calls with
  ``AT_SYMLINK_NOFOLLOW`` or through ``/proc/self/fd`` of a dir fd;
* the walk is iterative, each directory inode is entered once (a dirent pointing back at an
  ancestor is InvalidInput, not an endless recursion), hard links go only to regular files already
  written under DIR;
* a non-empty DIR is refused unless ``force``; with ``force`` what is in the way is replaced, never
  followed (an existing ``etc -> /host/etc`` symlink is removed, not written through).
"""
from __future__ import annotations

import os
import resource
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from remora.converter.image import LocalBlobs, RemoraImage
from remora.errors import InvalidInput, StorageError, UsageError
from remora.format.bootstrap import ROOT_INO, Bootstrap, InodeRecord

_ZERO = bytes(1 << 20)
_PAGE = 1024                    # directory entries read from the bootstrap at a time
#: deepest directory nesting unpacked: one open fd per level of the current path
MAX_DEPTH = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class UnpackStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    hardlinks: int = 0
    warnings: list[str] = field(default_factory=list)


def _safe_name(name: bytes, where: str) -> bytes:
    if not isinstance(name, bytes) or not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise InvalidInput(f"bootstrap has an unsafe entry name {name!r} in {where}")
    return name


def check_target(dest: Path, force: bool) -> None:
    """Refuse a DIR that is not a directory, or not empty without ``force`` (before any download)."""
    dest = Path(dest)
    if dest.is_symlink():
        raise UsageError(f"{dest} is a symbolic link; give the real directory")
    if dest.exists():
        if not dest.is_dir():
            raise UsageError(f"{dest} exists and is not a directory")
        if not force and any(os.scandir(dest)):
            raise UsageError(f"{dest} is not empty; unpack into an empty directory, or pass --force to "
                             f"replace what is there (existing symlinks are replaced, never followed)")


@dataclass
class _Dir:
    ino: int
    fd: int
    node: InodeRecord
    where: str
    after: bytes = b""
    page: list = field(default_factory=list)
    done: bool = False
    created: set = field(default_factory=set)


def unpack(image: RemoraImage, dest: Path, blobs: LocalBlobs, force: bool = False, progress=None) -> UnpackStats:
    """Write the image's tree into ``dest`` (created if missing). ``progress`` (optional) gets
    ``phase(description, total_bytes)`` once and ``advance(n)`` per written chunk."""
    dest = Path(dest)
    check_target(dest, force)
    dest.mkdir(parents=True, exist_ok=True)
    bs: Bootstrap = image.bootstrap
    if progress is not None:
        progress.phase("unpack", bs.stats()["bytes"] or None)
    _raise_nofile()
    stats = UnpackStats()
    root = bs.getattr(ROOT_INO)
    if not stat.S_ISDIR(root.mode):
        raise InvalidInput("bootstrap: the root inode is not a directory")
    parents: dict[int, tuple[int, bytes]] = {}     # directory ino -> (parent ino, name): hard links
    first: dict[int, tuple[int, bytes]] = {}       # regular file ino -> where it was first written
    others: set[int] = set()                       # symlinks, devices...: never hard-linked
    visited = {ROOT_INO}
    stack = [_Dir(ROOT_INO, os.open(dest, _DIR_FLAGS), root, "/")]
    stats.entries += 1
    try:
        while stack:
            d = stack[-1]
            entry = _next_entry(bs, d)
            if entry is None:
                _dir_meta(bs, d, stats)
                os.close(d.fd)
                stack.pop()
                continue
            name, node = entry
            _safe_name(name, d.where)
            if name in d.created:
                raise InvalidInput(f"bootstrap: two entries named {name!r} in {d.where}")
            d.created.add(name)
            stats.entries += 1
            kind = stat.S_IFMT(node.mode)
            where = d.where.rstrip("/") + "/" + os.fsdecode(name)
            if kind == stat.S_IFDIR:
                if node.ino in visited:
                    raise InvalidInput(f"bootstrap: directory {where!r} (inode {node.ino}) appears twice in the "
                                       f"tree: a loop or a hard-linked directory")
                if len(stack) >= MAX_DEPTH:
                    raise InvalidInput(f"bootstrap: directories nested deeper than {MAX_DEPTH} levels at {where!r}")
                visited.add(node.ino)
                parents[node.ino] = (d.ino, name)
                fd = _make_dir(d.fd, name, force)
                stack.append(_Dir(node.ino, fd, node, where))
                continue
            if node.ino in others:
                raise InvalidInput(f"bootstrap: {where!r} is a hard link to a {_kind(kind)}; only regular "
                                   f"files may be hard-linked")
            if node.ino in first:
                if kind != stat.S_IFREG:
                    raise InvalidInput(f"bootstrap: {where!r} is a hard link to a {_kind(kind)}; only regular "
                                       f"files may be hard-linked")
                src_parent, src_name = first[node.ino]
                src_fd = d.fd if src_parent == d.ino else _open_dir_of(stack[0].fd, parents, src_parent)
                try:
                    _clear(d.fd, name, force)
                    os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=d.fd, follow_symlinks=False)
                finally:
                    if src_fd != d.fd:
                        os.close(src_fd)
                stats.hardlinks += 1
                continue
            _clear(d.fd, name, force)
            if kind == stat.S_IFREG:
                first[node.ino] = (d.ino, name)
            else:
                others.add(node.ino)
            if kind == stat.S_IFREG:
                _write_file(bs, node, d.fd, name, where, blobs, stats, progress)
            elif kind == stat.S_IFLNK:
                os.symlink(node.target or b"", name, dir_fd=d.fd)
                _link_meta(bs, node, d.fd, name, where, stats)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
                os.mknod(name, kind | 0o600, node.rdev, dir_fd=d.fd)
                _special_meta(bs, node, d.fd, name, where, stats)
            else:
                raise InvalidInput(f"bootstrap: {where!r} has an unknown file type {oct(kind)}")
    except FileExistsError as exc:
        raise StorageError(f"unpack: {exc.filename or ''} appeared in {dest} while unpacking: {exc.strerror}") from None
    finally:
        for d in stack:
            os.close(d.fd)
    return stats


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_DEPTH + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (ValueError, OSError):
            pass


def _kind(kind: int) -> str:
    return {stat.S_IFLNK: "symlink", stat.S_IFDIR: "directory", stat.S_IFCHR: "character device",
            stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}.get(kind, oct(kind))


def _next_entry(bs: Bootstrap, d: _Dir):
    """The directory's next entry, read a page at a time (a directory may be huge)."""
    if not d.page:
        if d.done:
            return None
        d.page = bs.readdir(d.ino, d.after, limit=_PAGE)
        d.page.reverse()
        if len(d.page) < _PAGE:
            d.done = True
        if not d.page:
            return None
        d.after = d.page[0][0]
    return d.page.pop()


def _exists(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _clear(dir_fd: int, name: bytes, force: bool) -> None:
    """With ``force``, remove whatever is at ``name`` (a symlink is removed, never followed)."""
    if not force:
        return
    st = _exists(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)      # fd-based, does not follow symlinks (3.11+)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _make_dir(parent_fd: int, name: bytes, force: bool) -> int:
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        if not force:
            raise
        st = _exists(parent_fd, name)
        if st is None or not stat.S_ISDIR(st.st_mode):
            _clear(parent_fd, name, force)
            os.mkdir(name, 0o700, dir_fd=parent_fd)
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise StorageError(f"unpack: cannot enter the directory {name!r} it just made: {exc.strerror}") from None


def _open_dir_of(root_fd: int, parents: dict[int, tuple[int, bytes]], ino: int) -> int:
    """Open directory ``ino`` by walking down from the root, one no-follow component at a time."""
    names = []
    while ino != ROOT_INO:
        ino, name = parents[ino]
        names.append(name)
    fd = os.dup(root_fd)
    try:
        for name in reversed(names):
            nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_file(bs: Bootstrap, node: InodeRecord, dir_fd: int, name: bytes, where: str, blobs: LocalBlobs,
                stats: UnpackStats, progress) -> None:
    fd = os.open(name, _NEW_FILE, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            for ext in bs.read_plan(node.ino, 0, node.size):
                data = blobs.chunk(ext)
                f.seek(ext.file_offset)
                if data != _ZERO[: len(data)]:
                    f.write(data)
                if progress is not None:
                    progress.advance(len(data))
            f.flush()
            os.ftruncate(fd, node.size)
        _fd_meta(bs, node, fd, where, stats)
    except OSError as exc:
        raise StorageError(f"writing {where!r}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    stats.files += 1
    stats.bytes += node.size


def _fd_meta(bs: Bootstrap, node: InodeRecord, fd: int, where: str, stats: UnpackStats) -> None:
    # Order matters: chown clears setuid/setgid and security.capability, so it comes first.
    os.fchown(fd, node.uid, node.gid)
    os.fchmod(fd, stat.S_IMODE(node.mode))
    for key, value in bs.xattrs(node.ino).items():
        try:
            os.setxattr(fd, key, value)
        except OSError as exc:
            stats.warnings.append(f"{where!r}: xattr {key}: {exc.strerror}")
    os.utime(fd, ns=(node.mtime_ns, node.mtime_ns))


def _dir_meta(bs: Bootstrap, d: _Dir, stats: UnpackStats) -> None:
    """A directory's metadata, once every entry is in it (so its mtime is not undone by a child)."""
    _fd_meta(bs, d.node, d.fd, d.where, stats)


def _xattrs_at(bs: Bootstrap, node: InodeRecord, dir_fd: int, name: bytes, where: str, stats: UnpackStats) -> None:
    # no fsetxattr on an object that cannot be opened: name it through the dir fd, not following it
    items = bs.xattrs(node.ino).items()
    for key, value in items:
        try:
            os.setxattr(b"/proc/self/fd/%d/%s" % (dir_fd, name), key, value, follow_symlinks=False)
        except OSError as exc:
            stats.warnings.append(f"{where!r}: xattr {key}: {exc.strerror}")


def _link_meta(bs: Bootstrap, node: InodeRecord, dir_fd: int, name: bytes, where: str, stats: UnpackStats) -> None:
    os.chown(name, node.uid, node.gid, dir_fd=dir_fd, follow_symlinks=False)
    _xattrs_at(bs, node, dir_fd, name, where, stats)
    os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def _special_meta(bs: Bootstrap, node: InodeRecord, dir_fd: int, name: bytes, where: str, stats: UnpackStats) -> None:
    """Devices, fifos, sockets: an O_PATH fd pins the object we just made; chmod goes through it
    (Linux has no lchmod), everything else through the dir fd without following."""
    os.chown(name, node.uid, node.gid, dir_fd=dir_fd, follow_symlinks=False)
    pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if stat.S_ISLNK(os.fstat(pfd).st_mode):
            raise StorageError(f"unpack: {where!r} was replaced by a symlink while unpacking")
        os.chmod(f"/proc/self/fd/{pfd}", stat.S_IMODE(node.mode))
    finally:
        os.close(pfd)
    _xattrs_at(bs, node, dir_fd, name, where, stats)
    os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
