"""Mounts for a snapshot, built exactly like containerd's overlayfs snapshotter (snapshots/overlay).

* no parents: a bind mount of the snapshot's own ``fs`` (``rw`` for active, ``ro`` for a view),
  because overlayfs needs at least one lower layer;
* a view with exactly one parent: a read-only bind mount of the parent's ``fs``;
* otherwise overlay: ``lowerdir`` lists the parents' ``fs`` child-most first; an active snapshot
  adds ``workdir`` and ``upperdir`` (its own ``work`` and ``fs``); a view has lowerdirs only, which
  overlayfs mounts read-only.

Long parent chains: 128 lowerdirs of ``<root>/snapshots/<id>/fs`` exceed the one-page (4096 byte)
limit of mount(2) data. containerd's mount code (``mount.All`` in the daemon, the shims and the
snapshot test suite) handles that itself: when the options exceed a page it chdirs into the common
parent directory and passes relative lowerdirs. So we return absolute paths, like the built-in
snapshotter, and :func:`mount_all` below does the same compaction for our own callers.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from remora.errors import StorageError

from .storage import Kind, Snapshot

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Mount:
    type: str
    source: str
    options: list[str] = field(default_factory=list)


def mounts_for(snap: Snapshot, fs_path: Callable[[str], os.PathLike[str]],
               work_path: Callable[[str], os.PathLike[str]]) -> list[Mount]:
    """The mounts containerd should use for an active or view snapshot."""
    if not snap.parent_ids:
        return [Mount("bind", str(fs_path(snap.id)), ["ro" if snap.kind == Kind.VIEW else "rw", "rbind"])]
    options: list[str] = []
    if snap.kind == Kind.ACTIVE:
        options += [f"workdir={work_path(snap.id)}", f"upperdir={fs_path(snap.id)}"]
    elif len(snap.parent_ids) == 1:
        return [Mount("bind", str(fs_path(snap.parent_ids[0])), ["ro", "rbind"])]
    options.append("lowerdir=" + ":".join(str(fs_path(p)) for p in snap.parent_ids))
    return [Mount("overlay", "overlay", options)]


def _compact_lowerdirs(options: list[str]) -> tuple[str | None, list[str]]:
    """If the options do not fit in a page, return (common dir, options with relative lowerdirs)."""
    if len(",".join(options)) < PAGE_SIZE:
        return None, options
    out, chdir = [], None
    for opt in options:
        if not opt.startswith("lowerdir="):
            out.append(opt)
            continue
        dirs = opt[len("lowerdir="):].split(":")
        common = os.path.commonpath(dirs)
        # containerd uses the parent of the common prefix so every entry keeps a distinct name
        chdir = os.path.dirname(common) if len(dirs) == 1 else common
        out.append("lowerdir=" + ":".join(os.path.relpath(d, chdir) for d in dirs))
    return chdir, out


def mount_all(mounts: list[Mount], target: os.PathLike[str]) -> None:
    """Mount ``mounts`` on ``target`` with mount(8) (used by tests, benchmarks and the demo).

    Long lowerdir lists are shortened to relative paths and mounted from their common directory,
    as containerd does; ``mount -o`` data beyond a page would otherwise fail with EINVAL.
    """
    for m in mounts:
        flags = [o for o in m.options if o in ("ro", "rw", "rbind", "bind")]
        data = [o for o in m.options if o not in flags]
        cwd, data = _compact_lowerdirs(data) if m.type == "overlay" else (None, data)
        if m.type == "bind":
            argv = ["mount", "-o", ",".join(["bind", *flags, *data]), m.source, os.fspath(target)]
        else:
            argv = ["mount", "-t", m.type, "-o", ",".join(flags + data), m.source, os.fspath(target)]
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise StorageError(f"mount {m.type} on {target} failed: {proc.stderr.strip() or proc.returncode}")
