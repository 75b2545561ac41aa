"""``remora unpack IMAGE DIR``: materialise a remora image's merged root file system.

The inverse of conversion, used to prove ``unpack(convert(X)) == flatten(X)`` byte for byte and in
every piece of metadata: content, modes incl. setuid/setgid/sticky, uid/gid, mtimes (ns), symlinks,
hard links, devices, fifos and xattrs. Every chunk is verified against its digest before it is
written. Zero chunks become holes, so sparse files stay sparse.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from remora.errors import InvalidInput, StorageError
from remora.converter.image import LocalBlobs, RemoraImage
from remora.format.bootstrap import Bootstrap

_ZERO = bytes(1 << 20)


@dataclass
class UnpackStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    hardlinks: int = 0
    warnings: list[str] = field(default_factory=list)


def _safe_name(name: bytes, where: bytes) -> bytes:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise InvalidInput(f"bootstrap has an unsafe entry name {name!r} under {where!r}")
    return name


def unpack(image: RemoraImage, dest: Path, blobs: LocalBlobs) -> UnpackStats:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.fsencode(dest)
    bs: Bootstrap = image.bootstrap
    stats = UnpackStats()
    first_path: dict[int, bytes] = {}
    dirs: list[tuple[bytes, object]] = []
    for path, node in bs.walk():
        parts = [p for p in path.split(b"/") if p]
        for p in parts:
            _safe_name(p, path)
        target = root + path if path != b"/" else root
        stats.entries += 1
        kind = stat.S_IFMT(node.mode)
        if kind == stat.S_IFDIR:
            if path != b"/":
                os.mkdir(target, 0o700)
            dirs.append((target, node))
            continue
        if node.ino in first_path:
            os.link(first_path[node.ino], target)
            stats.hardlinks += 1
            continue
        first_path[node.ino] = target
        if kind == stat.S_IFREG:
            _write_file(bs, node, target, blobs)
            stats.files += 1
            stats.bytes += node.size
        elif kind == stat.S_IFLNK:
            os.symlink(node.target or b"", target)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            os.mknod(target, kind | 0o600, node.rdev)
        else:
            raise InvalidInput(f"{path!r}: unknown file type {oct(kind)}")
        _apply_meta(bs, node, target, stats)
    for target, node in reversed(dirs):  # deepest first, so setting a mtime is not undone by a child
        _apply_meta(bs, node, target, stats)
    return stats


def _write_file(bs: Bootstrap, node, target: bytes, blobs: LocalBlobs) -> None:
    try:
        with open(target, "wb") as f:
            for ext in bs.read_plan(node.ino, 0, node.size):
                data = blobs.chunk(ext)
                if data == _ZERO[: len(data)]:
                    f.seek(len(data), os.SEEK_CUR)
                else:
                    f.write(data)
            f.truncate(node.size)
    except OSError as exc:
        raise StorageError(f"writing {target!r}: {exc}") from None


def _apply_meta(bs: Bootstrap, node, target: bytes, stats: UnpackStats) -> None:
    # Order matters: chown clears setuid/setgid and security.capability, so it comes first.
    os.chown(target, node.uid, node.gid, follow_symlinks=False)
    if not stat.S_ISLNK(node.mode):
        os.chmod(target, stat.S_IMODE(node.mode))
    for name, value in bs.xattrs(node.ino).items():
        try:
            os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as exc:
            stats.warnings.append(f"{target!r}: xattr {name}: {exc.strerror}")
    os.utime(target, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)
