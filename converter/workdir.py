"""Work directories of convert / check / unpack / trace that a kill -9 cannot leak.

A conversion spools hundreds of MB (blobs, the bootstrap) in a temp directory; ``finally: rmtree``
does not run when the process is SIGKILLed or the node's OOM killer picks it. So each work dir
holds a lock file its process keeps ``flock``ed for as long as it lives; the kernel drops the lock
when the process dies, however it dies. Every new work dir first sweeps the temp root: a
``remora-*`` dir of ours whose lock can be taken belongs to a dead process and is removed.

Safe in a shared ``/tmp``: only directories (never symlinks) owned by our uid, named like ours and
holding our lock file are swept (other ``remora-*`` temp dirs, e.g. a local registry's storage, have
no lock file and are never touched; nor is a dir created a moment ago whose owner has not locked it
yet); removal is ``shutil.rmtree``'s fd-based walk that never follows symlinks.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".remora-owner.lock"
PREFIX = "remora-"
KINDS = ("convert", "check", "unpack", "trace")


def temp_root() -> Path:
    return Path(os.environ.get("REMORA_TMPDIR") or tempfile.gettempdir())


def sweep(root: Path | None = None) -> list[Path]:
    """Remove the work dirs of dead remora processes under ``root``; returns what was removed."""
    root = Path(root or temp_root())
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(tuple(f"{PREFIX}{k}-" for k in KINDS)):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        if _owner_alive(Path(e.path)):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(Path(e.path))
    return removed


def _owner_alive(path: Path) -> bool:
    """False only when the dir has our lock file and nobody holds its lock."""
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:             # no lock file (not ours, or its owner is just starting): leave it
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)            # closing drops a lock we took
    return False


@contextmanager
def work_dir(kind: str, keep: bool = False) -> Iterator[Path]:
    """A fresh ``remora-KIND-*`` dir under the temp root, locked while we live, removed at the end
    (unless ``keep``); stale dirs of dead processes are swept first."""
    if kind not in KINDS:
        raise ValueError(f"unknown work dir kind {kind!r}")
    root = temp_root()
    sweep(root)
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-", dir=root))
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
