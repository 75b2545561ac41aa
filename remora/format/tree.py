"""The in-memory file tree the converter builds and the bootstrap stores.

One :class:`Inode` per file object; directories hold ``children`` (name -> Inode), hard links are
several directory entries pointing at the *same* Inode object. Names and symlink targets are bytes
(``os.fsencode`` of what the tar said), so non-UTF-8 names survive. Regular files carry their content
as an ordered list of :class:`ChunkRef` (uncompressed sha256 + size); where the chunk bytes live is the
chunk table's business (:mod:`remora.format.bootstrap`), not the tree's.
"""
from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class ChunkRef(NamedTuple):
    """A piece of a regular file: ``size`` bytes whose sha256 is ``digest`` (32 raw bytes).

    A named tuple (immutable, hashable) rather than a frozen dataclass: the converter makes one per
    file, and a frozen dataclass's ``__init__`` (``object.__setattr__`` per field) costs twice as
    much."""

    digest: bytes
    size: int


@dataclass(eq=False, slots=True)
class Inode:
    mode: int                      # full st_mode: type bits | setuid/setgid/sticky | permissions
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0                  # regular files: content length; symlinks: len(target)
    rdev: int = 0                  # char/block devices: os.makedev(major, minor)
    target: bytes | None = None    # symlinks
    xattrs: dict[str, bytes] = field(default_factory=dict)
    chunks: list[ChunkRef] | None = None           # regular files
    children: dict[bytes, Inode] | None = None   # directories
    ino: int = 0                   # assigned by Tree.number()
    nlink: int = 0                 # assigned by Tree.number()

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @classmethod
    def directory(cls, mode: int = 0o755, **kw: Any) -> Inode:
        return cls(mode=stat.S_IFDIR | (mode & 0o7777), children={}, **kw)


class Tree:
    """A merged root file system: ``root`` is the directory ``/``."""

    def __init__(self, root: Inode | None = None):
        self.root = root or Inode.directory(0o755)

    def lookup(self, path: bytes | str) -> Inode | None:
        node = self.root
        for part in split_path(path):
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Depth-first, children sorted by name bytes: ``(b"/", root)``, ``(b"/bin", ...)``, ..."""
        stack: list[tuple[bytes, Inode]] = [(b"/", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                prefix = path if path.endswith(b"/") else path + b"/"
                for name in sorted(node.children, reverse=True):
                    stack.append((prefix + name, node.children[name]))

    def number(self) -> int:
        """Give every inode a number (root = 1, then walk order) and count links; returns the count.

        Deterministic for a given tree, which keeps conversion reproducible.
        """
        seen: dict[int, Inode] = {}
        next_ino = 1
        # walk()'s order without building every path (one bytes object per entry, unused here)
        stack = [self.root]
        while stack:
            node = stack.pop()
            children = node.children
            if children:
                stack.extend([children[name] for name in sorted(children, reverse=True)])
            if id(node) in seen:
                node.nlink += 1
                continue
            seen[id(node)] = node
            node.ino = next_ino
            next_ino += 1
            node.nlink = 1
        for node in seen.values():
            if node.children is not None:
                # a directory's link count: its entry, its "." and every subdirectory's ".."
                node.nlink = 2 + sum(1 for c in node.children.values() if c.is_dir)
        return next_ino - 1


def split_path(path: bytes | str) -> list[bytes]:
    """``"/a/./b/"`` -> ``[b"a", b"b"]``. ``..`` is kept (callers that accept input must reject it)."""
    if isinstance(path, str):
        import os

        path = os.fsencode(path)
    return [p for p in path.split(b"/") if p and p != b"."]
