"""Fill the kernel's dentry and attribute caches with the prefetch files' paths, right after the mount.

A container's first run walks the same paths the prefetch list names (the interpreter, its libraries,
every module it imports), and each path component the kernel has not seen yet is a LOOKUP round trip
to this process while the container waits. Looking the paths up once from here, before the container
starts (the pull is still finishing), leaves their entries in the kernel for the mount's entry/attr
timeout: the container's lookups of them never leave the kernel, also through the overlay mounted on
top. Metadata only, from the bootstrap: no data is read and nothing waits for the network.

Measured on the cold-start benchmark (benchmarks/README.md): ~120 fewer round trips on the
container's path; a chunk of the ~0.18 s a cold FUSE tree costs a python start over a warm one.
"""
from __future__ import annotations

import logging
import os
import time

from remora.format.bootstrap import Bootstrap

log = logging.getLogger("remora.snapshotter.fs")


def warm_lookups(bootstrap: Bootstrap, mountpoint: str, mounted, stats=None, timeout: float = 30.0) -> int:
    """``lstat`` every prefetch file through ``mountpoint`` once ``mounted()`` says the mount is up.

    Returns how many paths were looked up (0 if the mount did not come up within ``timeout``). Never
    raises: this is an optimisation, and a path that fails here fails the same way for its reader."""
    try:
        paths = bootstrap.paths_of(bootstrap.prefetch_inodes())
        if not paths:
            return 0
        deadline = time.monotonic() + timeout
        while not mounted():
            if time.monotonic() > deadline:
                return 0
            time.sleep(0.002)
        t0 = time.monotonic()
        root = os.fsencode(mountpoint)
        n = 0
        for path in paths.values():
            try:
                os.lstat(root + path)  # lstat: a symlink's target is resolved by its reader, in its root
                n += 1
            except OSError:
                pass
        if stats is not None:
            stats.set("prefetch_lookups", n)
        log.info("looked up %d prefetch paths in %.3fs (the kernel keeps them for the mount's entry timeout)",
                 n, time.monotonic() - t0)
        return n
    except Exception:  # noqa: BLE001 - never take the mount down for a head start
        log.exception("lookup warm-up failed")
        return 0
