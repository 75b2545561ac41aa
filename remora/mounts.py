"""Mount points: reading /proc/self/mountinfo and unmounting, for every component in one place.

The snapshotter (snapshot directories, FUSE mounts of remora layers) and the lab tooling (debootstrap
leaves proc/sys mounted when it fails) both need to find what is mounted under a directory and take
it down, including a FUSE mount whose process died ("transport endpoint is not connected"), which
``stat`` on the mount point itself cannot survive. So nothing here touches a mount point: paths are
compared as strings from mountinfo (no ``realpath`` of the mount itself), and unmounting ends with
``umount2(MNT_DETACH)``, which the kernel honours for dead and busy mounts alike.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from remora.errors import StorageError

MNT_DETACH = 2
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes space, tab, newline, backslash as \ooo
_libc = None


class MountInfo(NamedTuple):
    mountpoint: str
    fstype: str
    device: str          # "major:minor" (the backing-dev-info name in /sys/class/bdi)


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mountinfo() -> Iterator[MountInfo]:
    """The mounts of this process's mount namespace, in mount order (later ones are on top)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        yield MountInfo(_unescape(fields[4]), right.split()[0], fields[2])


def mount_at(path: Path | str) -> MountInfo | None:
    """The topmost mount exactly at ``path`` (never touches the mount itself)."""
    target = os.path.abspath(path)  # no realpath: it would stat (and maybe block on) the mount itself
    found = None
    for info in mountinfo():
        if info.mountpoint == target:
            found = info  # the last (topmost) mount wins
    return found


def mounted_fstype(path: Path | str) -> str | None:
    """The fs type mounted exactly at ``path``, or None."""
    info = mount_at(path)
    return info.fstype if info else None


def mountpoints_under(path: Path | str) -> list[str]:
    """Mount points at or below ``path`` (a directory that is not itself a dead mount), deepest first."""
    prefix = os.path.realpath(path)
    found = [m.mountpoint for m in mountinfo()
             if m.mountpoint == prefix or m.mountpoint.startswith(prefix + "/")]
    return sorted(found, key=len, reverse=True)


def detach_mount(mountpoint: str) -> None:
    """umount2(MNT_DETACH): works for busy and dead FUSE mounts too; :class:`StorageError` if refused."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise StorageError(f"cannot unmount {mountpoint}: {os.strerror(err)}")


def detach(path: Path | str, lazy: bool = True) -> bool:
    """Unmount ``path`` (a live, busy or dead FUSE mount) politely first: ``fusermount3 -u`` (lets the
    fs process see the unmount), ``umount``, then, when ``lazy``, a detach. Returns whether nothing
    is mounted there any more."""
    path = str(path)
    for argv in (["fusermount3", "-u", path], ["umount", path]):
        if mounted_fstype(path) is None:
            return True
        try:
            subprocess.run(argv, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
    if lazy and mounted_fstype(path) is not None:
        try:
            detach_mount(path)
        except StorageError:
            pass
    return mounted_fstype(path) is None


def unmount_below(path: Path | str) -> list[str]:
    """Detach everything mounted at or below ``path``, deepest first; returns what could not be."""
    left = []
    for mp in mountpoints_under(path):
        try:
            detach_mount(mp)
        except StorageError:
            left.append(mp)
    return left
