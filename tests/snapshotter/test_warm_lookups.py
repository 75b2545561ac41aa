"""The prefetch lookup warm-up never resolves a path outside its mount.

The fs process runs as root in the host's mount namespace. An image may hold an absolute symlink
(``/usr -> /somewhere/on/the/host``, perfectly legal inside a container's root), and a hostile
bootstrap may name a prefetch file *through* it (an entry whose parent is the symlink, a name with a
``/`` in it, or a bootstrap that calls the symlink a directory). Handing ``mnt + "/usr/x"`` to the
kernel would follow the symlink on the host. To *see* host access, the symlink points into a second
lazy mount (the "host" here): every lookup that reaches it is counted by its fs process.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import time

import pytest
from lazy_support import build_image

from remora.errors import StorageError
from remora.format.bootstrap import Bootstrap
from remora.procutil import wait_until
from remora.snapshotter.fs.warm import warm_lookups
from remora.snapshotter.mount import MountManager, detach, mounted_fstype
from remora.snapshotter.sources import SourceSpec


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    return build_image(tmp_path_factory.mktemp("warm-image"), registry.host, n_small=8,
                       prefetch_paths=(b"/etc/hot.conf",))


@pytest.fixture
def manager(tmp_path):
    mm = MountManager(tmp_path / "state", tmp_path / "cache", mount_timeout=30)
    yield mm
    mm.unmount_all()
    for mnt in tmp_path.glob("mnt*"):
        detach(mnt)
        assert mounted_fstype(mnt) is None


def _mount(manager, image, bootstrap, tmp_path, registry, name, prefetch=False):
    return manager.mount(name, bootstrap, tmp_path / f"mnt-{name}",
                         [SourceSpec.registry(registry.host, image.repo, retries=0)], prefetch=prefetch,
                         stats_interval=0.1).mountpoint


def _lookups(manager, mount_id) -> int:
    """FUSE getattr/lookup requests the mount's process served, from a stats write made after now."""
    since = time.time()
    wait_until(lambda: manager.stats(mount_id).get("time", 0) > since, 5, what="fresh stats")
    return sum(manager.stats(mount_id)["ops"]["getattr"]["counts"])


def _edit(src, dst, *statements) -> str:
    shutil.copyfile(src, dst)
    db = sqlite3.connect(dst)
    with db:
        for sql, args in statements:
            db.execute(sql, args)
    db.close()
    return str(dst)


def _ino(bootstrap, path: bytes) -> int:
    b = Bootstrap(bootstrap)
    try:
        return b.lookup_path(path).ino
    finally:
        b.close()


def _with_host_symlink(image, tmp_path, target: bytes):
    """The image plus a legal absolute symlink ``/usr -> target``; returns (bootstrap, usr ino, free ino)."""
    b = Bootstrap(image.bootstrap)
    top = b._db.execute("SELECT max(ino) FROM inodes").fetchone()[0]
    b.close()
    usr = top + 1
    path = _edit(image.bootstrap, tmp_path / "with-usr.db",
                 ("INSERT INTO inodes (ino, mode, uid, gid, size, mtime_ns, rdev, nlink, target) "
                  "VALUES (?, ?, 0, 0, ?, 0, 0, 1, ?)", (usr, stat.S_IFLNK | 0o777, len(target), target)),
                 ("INSERT INTO dirents (parent, name, ino) VALUES (1, ?, ?)", (b"usr", usr)))
    return path, usr, top + 2


def _hostile_file(ino: int, like: int):
    """An extra inode ``ino``: a copy of inode ``like`` (a regular file of the image)."""
    return ("INSERT INTO inodes SELECT ?, mode, uid, gid, size, mtime_ns, rdev, nlink, target, extents "
            "FROM inodes WHERE ino=?", (ino, like))


def test_warm_up_never_follows_an_image_symlink_onto_the_host(manager, image, registry, tmp_path):
    host = _mount(manager, image, image.bootstrap, tmp_path, registry, "host")
    assert os.path.exists(os.path.join(host, "etc", "small007.txt"))  # the host-side target is real
    boot, usr, extra = _with_host_symlink(image, tmp_path, os.fsencode(host) + b"/etc")
    mnt = _mount(manager, image, boot, tmp_path, registry, "img")
    assert os.readlink(os.path.join(mnt, "usr")) == os.path.join(host, "etc")
    hot = _ino(boot, b"/etc/hot.conf")
    prefetch = ("INSERT INTO prefetch (seq, ino) VALUES (?, ?)", (1000, extra))

    # three ways to name a file through the symlink: each targets a file that exists on the "host"
    variants = {
        "entry under the symlink": _edit(boot, tmp_path / "v1.db", _hostile_file(extra, hot), prefetch,
                                         ("INSERT INTO dirents VALUES (?, ?, ?)", (usr, b"small001.txt", extra))),
        "name with a slash": _edit(boot, tmp_path / "v2.db", _hostile_file(extra, hot), prefetch,
                                   ("INSERT INTO dirents VALUES (1, ?, ?)", (b"usr/small002.txt", extra))),
        "symlink called a directory": _edit(boot, tmp_path / "v3.db", _hostile_file(extra, hot), prefetch,
                                            ("UPDATE inodes SET mode=? WHERE ino=?", (stat.S_IFDIR | 0o755, usr)),
                                            ("INSERT INTO dirents VALUES (?, ?, ?)", (usr, b"small003.txt", extra))),
    }
    for what, path in variants.items():
        before = _lookups(manager, "host")
        bootstrap = Bootstrap(path)
        try:
            n = warm_lookups(bootstrap, mnt, lambda: True)
        finally:
            bootstrap.close()
        assert _lookups(manager, "host") == before, f"{what}: the warm-up looked a path up on the host"
        assert n == 1, f"{what}: only /etc/hot.conf is a path inside the image ({n} looked up)"

    # and the same through the fs process's own warm-up, serving the hostile bootstrap itself
    before = _lookups(manager, "host")
    try:
        _mount(manager, image, variants["entry under the symlink"], tmp_path, registry, "hostile", prefetch=True)
    except StorageError as exc:  # a bootstrap validator may refuse the image outright: also safe
        assert "hostile" not in manager.ids(), exc
    else:
        wait_until(lambda: (manager.stats("hostile").get("fetch") or {}).get("prefetch_lookups") is not None, 10,
                   what="the fs process's warm-up")
        assert manager.stats("hostile")["fetch"]["prefetch_lookups"] == 1
    assert _lookups(manager, "host") == before, "the fs process's warm-up looked a path up on the host"


def test_warm_up_walks_normal_paths_and_leaves_them_cached(manager, image, registry, tmp_path):
    """The no-follow walk still does its job: every prefetch path (deep ones too, sharing
    directories) is looked up, and a later lookup of it is answered by the kernel."""
    deep = ("INSERT INTO prefetch (seq, ino) VALUES (?, ?)", (1001, _ino(image.bootstrap, b"/data/deep/er/file")))
    small = ("INSERT INTO prefetch (seq, ino) VALUES (?, ?)", (1002, _ino(image.bootstrap, b"/etc/small004.txt")))
    boot = _edit(image.bootstrap, tmp_path / "deep.db", deep, small)
    mnt = _mount(manager, image, boot, tmp_path, registry, "m1")
    bootstrap = Bootstrap(boot)
    try:
        assert warm_lookups(bootstrap, mnt, lambda: True) == 3
    finally:
        bootstrap.close()
    before = _lookups(manager, "m1")
    for path in (b"/etc/hot.conf", b"/data/deep/er/file", b"/etc/small004.txt"):
        assert os.lstat(os.fsencode(mnt) + path).st_size == len(image.contents[path])
    assert _lookups(manager, "m1") == before, "the kernel answered from the entries the warm-up left"
