"""An independent reference for "the flattened root file system of an image", and a tree comparator.

``flatten_with_gnu_tar`` applies layers with GNU tar (whiteouts handled before each layer is
extracted, exactly as the OCI spec says: they hide lower entries only), so tests can check remora's
own merge, unpack and lazy mounts against a second implementation instead of against themselves.
``compare_trees`` compares every piece of metadata the issue lists: type, permission and special
bits, owners, size and content, symlink targets, device numbers, xattrs, mtimes and hard-link groups.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

WH = ".wh."
OPQ = ".wh..wh..opq"


def flatten_with_gnu_tar(layers: list[Path], dest: Path) -> set[str]:
    """Apply uncompressed layer tars in order into ``dest``; returns directories declared in a layer
    (only their mtimes are meaningful: implicit parents get extraction-time mtimes)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    declared: set[str] = set()
    for layer in layers:
        with tarfile.open(layer, "r:") as tf:
            names = [(m.name, m.isdir()) for m in tf]
        # A directory the layer does not declare keeps its lower metadata (containerd's mkparent copies
        # it), but extracting children into it changes its mtime: remember and restore.
        layer_dirs = {"/" + n.strip("/").removeprefix("./").rstrip("/") for n, d in names if d}
        before = {}
        for dirpath, _, _ in os.walk(dest):
            rel = "/" + os.path.relpath(dirpath, dest) if dirpath != str(dest) else "/"
            if rel not in layer_dirs:
                before[dirpath] = os.lstat(dirpath).st_mtime_ns
        for name, is_dir in names:
            rel = name.strip("/")
            while rel.startswith("./"):
                rel = rel[2:]
            base = os.path.basename(rel)
            parent = dest / os.path.dirname(rel)
            if base == OPQ:
                if parent.is_dir():
                    for child in list(parent.iterdir()):
                        _remove(child)
            elif base.startswith(WH):
                _remove(parent / base[len(WH):])
            elif is_dir:
                declared.add("/" + rel.rstrip("/"))
        subprocess.run(["tar", "-x", "-f", str(layer), "-C", str(dest), "--numeric-owner", "--same-owner",
                        "--same-permissions", "--xattrs", "--xattrs-include=*", "--overwrite",
                        "--recursive-unlink", "--exclude=.wh.*", "--delay-directory-restore"],
                       check=True, capture_output=True)
        for dirpath, mtime in before.items():
            if os.path.isdir(dirpath) and not os.path.islink(dirpath):
                os.utime(dirpath, ns=(mtime, mtime), follow_symlinks=False)
    return declared


def _remove(p: Path) -> None:
    if p.is_symlink() or p.exists():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        return {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}
    except OSError:
        return {}


def _digest(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def snapshot_tree(root: Path, content: bool = True) -> dict[bytes, dict]:
    """``{relative path: metadata}`` for every entry below ``root`` (root itself is ``b"/"``)."""
    root_b = os.fsencode(root)
    out: dict[bytes, dict] = {}
    groups: dict[tuple[int, int], list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root_b):
        entries = [dirpath] if dirpath == root_b else []
        entries += [os.path.join(dirpath, n) for n in dirnames + filenames]
        for full in entries:
            rel = b"/" + os.path.relpath(full, root_b) if full != root_b else b"/"
            st = os.lstat(full)
            meta = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                    "gid": st.st_gid, "mtime_ns": st.st_mtime_ns, "xattrs": _xattrs(full)}
            if stat.S_ISREG(st.st_mode):
                meta["size"] = st.st_size
                if content:
                    meta["sha256"] = _digest(full)
                groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                meta["target"] = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                meta["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = meta
    for paths in groups.values():
        group = tuple(sorted(paths))
        for p in paths:
            out[p]["links"] = group
    return out


def compare_trees(expected: Path, actual: Path, *, declared_dirs: set[str] | None = None,
                  ignore: tuple[bytes, ...] = ()) -> list[str]:
    """Differences between two trees, as readable lines (empty list = identical)."""
    a, b = snapshot_tree(expected), snapshot_tree(actual)
    problems = []
    for path in sorted(set(a) | set(b)):
        if any(path == i or path.startswith(i + b"/") for i in ignore):
            continue
        if path not in b:
            problems.append(f"missing in actual: {path!r}")
            continue
        if path not in a:
            problems.append(f"unexpected in actual: {path!r}")
            continue
        ma, mb = dict(a[path]), dict(b[path])
        if ma["type"] == stat.S_IFDIR:
            declared = declared_dirs is None or os.fsdecode(path) in declared_dirs
            if not declared or path == b"/":
                ma.pop("mtime_ns")
                mb.pop("mtime_ns")
                if path == b"/" or not declared:
                    for k in ("mode", "uid", "gid"):
                        ma.pop(k, None)
                        mb.pop(k, None)
        if ma != mb:
            diff = {k: (ma.get(k), mb.get(k)) for k in set(ma) | set(mb) if ma.get(k) != mb.get(k)}
            problems.append(f"{path!r}: {diff}")
    return problems
