"""Fill the kernel's dentry and attribute caches with the prefetch files' paths, right after the mount.

A container's first run walks the same paths the prefetch list names (the interpreter, its libraries,
every module it imports), and each path component the kernel has not seen yet is a LOOKUP round trip
to this process while the container waits. Looking the paths up once from here, before the container
starts (the pull is still finishing), leaves their entries in the kernel for the mount's entry/attr
timeout: the container's lookups of them never leave the kernel, also through the overlay mounted on
top. Metadata only, from the bootstrap: no data is read and nothing waits for the network.

The walk never leaves the mount. This process runs as root in the host's mount namespace, and the
image is untrusted: a path string handed to the kernel (``lstat(mnt + "/usr/lib/x")``) would follow an
image symlink in any intermediate component (``usr -> /etc``) onto the host. So every path is resolved
in the bootstrap first, by inode ((parent, name) entries, each name a single component, each parent a
directory), and then walked one component at a time relative to a directory fd, with
``O_PATH | O_NOFOLLOW | O_DIRECTORY`` for the directories and a no-follow ``fstatat`` for the last
component: even if the kernel's view disagreed with the bootstrap, a symlink is never followed and a
directory on another device is never entered.

Measured on the cold-start benchmark (benchmarks/README.md): ~120 fewer round trips on the
container's path; a chunk of the ~0.18 s a cold FUSE tree costs a python start over a warm one.
"""
from __future__ import annotations

import logging
import os
import stat
import time

from remora.format.bootstrap import ROOT_INO, Bootstrap

log = logging.getLogger(__name__)

MAX_DEPTH = 128  # components; deeper prefetch paths are skipped (this walk holds one fd per level)
_DIR_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


def _single_component(name: bytes) -> bool:
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name


def prefetch_chains(bootstrap: Bootstrap) -> list[tuple[bytes, ...]]:
    """The prefetch files' paths as tuples of names, resolved in the bootstrap, sorted.

    A path is kept only if every name is a single path component, every ancestor is a directory of
    the image (never a symlink or a file), the chain reaches the root within MAX_DEPTH, and the
    bootstrap's own lookup of each (parent, name) gives that very entry (what the fs serves). One
    pass over the directory entries (they are keyed by parent, not by inode); only directories'
    and the prefetch inodes' entries are kept in memory."""
    want = set(bootstrap.prefetch_inodes())
    if not want:
        return []
    entry: dict[int, tuple[int, bytes]] = {}  # ino -> (parent, name), directories and prefetch files
    with bootstrap.pooled() as db:  # two linear scans (no join: bounded work on any bootstrap)
        dirs = {ino for ino, mode in db.execute("SELECT ino, mode FROM inodes") if stat.S_ISDIR(mode)}
        dirs.add(ROOT_INO)
        for parent, name, ino in db.execute("SELECT parent, name, ino FROM dirents"):
            if (ino in dirs or ino in want) and isinstance(name, bytes):
                entry.setdefault(ino, (parent, name))
        checked: dict[tuple[int, bytes], bool] = {}

        def served(parent: int, name: bytes, ino: int) -> bool:
            key = (parent, name)
            if key not in checked:
                rec = bootstrap.lookup(parent, name, db)
                checked[key] = rec is not None and rec.ino == ino
            return checked[key]

        chains = []
        for ino in want:
            names: list[bytes] = []
            cur = ino
            ok = True
            while cur != ROOT_INO:
                if cur not in entry or len(names) >= MAX_DEPTH:
                    ok = False
                    break
                parent, name = entry[cur]
                if parent not in dirs or not _single_component(name) or not served(parent, name, cur):
                    ok = False
                    break
                names.append(name)
                cur = parent
            if ok and names:
                chains.append(tuple(reversed(names)))
    return sorted(chains)


def walk_chains(mountpoint: str, chains: list[tuple[bytes, ...]]) -> int:
    """Look every chain up under ``mountpoint``, component by component, never following a symlink
    and never leaving the mount's device. Returns how many leaves were looked up. Chains are sorted,
    so a directory shared by consecutive paths is opened once; at most one fd per level is open."""
    root = os.open(mountpoint, _DIR_FLAGS)
    stack: list[tuple[bytes, int]] = []  # (name, fd) of the directories below the root, in path order
    n = 0
    try:
        dev = os.fstat(root).st_dev
        for chain in chains:
            dirs, leaf = chain[:-1], chain[-1]
            keep = 0
            while keep < min(len(stack), len(dirs)) and stack[keep][0] == dirs[keep]:
                keep += 1
            while len(stack) > keep:
                os.close(stack.pop()[1])
            try:
                for name in dirs[keep:]:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=stack[-1][1] if stack else root)
                    stack.append((name, fd))
                    if os.fstat(fd).st_dev != dev:  # a mount inside ours: not the image's tree
                        raise OSError("another file system")
                os.stat(leaf, dir_fd=stack[-1][1] if stack else root, follow_symlinks=False)
                n += 1
            except OSError:
                continue  # a path that fails here fails the same way for its reader
    finally:
        for _, fd in stack:
            os.close(fd)
        os.close(root)
    return n


def warm_lookups(bootstrap: Bootstrap, mountpoint: str, mounted, stats=None, timeout: float = 30.0) -> int:
    """Look every prefetch file up through ``mountpoint`` once ``mounted()`` says the mount is up.

    Returns how many paths were looked up (0 if the mount did not come up within ``timeout``). Never
    raises: this is an optimisation, and a path that fails here fails the same way for its reader."""
    try:
        chains = prefetch_chains(bootstrap)
        if not chains:
            return 0
        deadline = time.monotonic() + timeout
        while not mounted():
            if time.monotonic() > deadline:
                return 0
            time.sleep(0.002)
        t0 = time.monotonic()
        n = walk_chains(mountpoint, chains)
        if stats is not None:
            stats.set("prefetch_lookups", n)
        log.info("looked up %d prefetch paths in %.3fs (the kernel keeps them for the mount's entry timeout)",
                 n, time.monotonic() - t0)
        return n
    except Exception:
        log.exception("lookup warm-up failed")
        return 0
