"""The metadata store: semantics containerd relies on, crash leftovers, usage accounting, filters."""
from __future__ import annotations

import os
import sqlite3
import subprocess

import pytest

from remora.errors import NotFound
from remora.snapshotter import filters
from remora.snapshotter.storage import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Kind,
    SnapshotStore,
    disk_usage,
    mountpoints_under,
    remove_tree,
)


@pytest.fixture
def store(tmp_path):
    s = SnapshotStore(tmp_path / "root")
    yield s
    s.close()


def test_lifecycle_and_parents(store):
    base = store.create(Kind.ACTIVE, "k0")
    assert base.parent_ids == [] and (store.work_path(base.id)).is_dir()
    (store.fs_path(base.id) / "f").write_text("x")
    info = store.commit("c0", "k0", {"a": "1", "empty": ""})
    assert (info.name, info.parent, info.kind, info.labels) == ("c0", "", Kind.COMMITTED, {"a": "1"})
    assert info.created_ns == info.updated_ns  # a commit creates the committed snapshot
    store.commit("c1", store.create(Kind.ACTIVE, "k1", "c0") and "k1")
    leaf = store.create(Kind.ACTIVE, "k2", "c1")
    assert leaf.parent_ids == [store.snapshot_id("c1"), store.snapshot_id("c0")]  # child-most first
    view = store.create(Kind.VIEW, "v", "c1")
    assert view.kind == Kind.VIEW and not store.work_path(view.id).exists()
    assert store.stat("k2").parent == "c1"
    with pytest.raises(AlreadyExists):
        store.create(Kind.ACTIVE, "c0")  # keys and names share one namespace
    with pytest.raises(NotFound):
        store.create(Kind.ACTIVE, "x", "nope")
    with pytest.raises(InvalidArgument):
        store.create(Kind.ACTIVE, "x", "k2")  # parent not committed
    with pytest.raises(FailedPrecondition):
        store.commit("c9", "v")  # a view cannot be committed
    with pytest.raises(FailedPrecondition):
        store.remove("c1")  # has children
    removed = store.remove("k2")
    assert removed.path == store.dir(leaf.id) and store.dir(leaf.id).exists()  # directory: the caller's job
    remove_tree(removed.path)
    store.remove("v")
    remove_tree(store.dir(view.id))
    store.remove("c1")
    assert [i.name for i in store.walk()] == ["c0"]


def test_ids_are_never_reused(store):
    a = store.create(Kind.ACTIVE, "a")
    store.remove("a")
    b = store.create(Kind.ACTIVE, "b")
    assert int(b.id) > int(a.id)  # a stale directory of a removed snapshot can never be taken for b's


def test_failed_create_leaves_nothing(store):
    store.create(Kind.ACTIVE, "a")
    before = sorted(os.listdir(store.snapshots_dir))
    with pytest.raises(AlreadyExists):
        store.create(Kind.ACTIVE, "a")
    with pytest.raises(InvalidArgument):
        store.create(Kind.ACTIVE, "big", labels={"k": "v" * 5000})
    assert sorted(os.listdir(store.snapshots_dir)) == before


def test_crash_leftovers_are_cleaned(tmp_path):
    """What kill -9 can leave: a half-built new-* dir, a renamed dir whose row was rolled back, a
    removed snapshot's directory; plus a mount inside one (must be detached, not deleted through)."""
    store = SnapshotStore(tmp_path / "root")
    keep = store.create(Kind.ACTIVE, "keep")
    (store.snapshots_dir / "new-abc" / "fs").mkdir(parents=True)
    (store.snapshots_dir / "999" / "fs").mkdir(parents=True)
    gone = store.create(Kind.ACTIVE, "gone")
    store.remove("gone")
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "file").write_text("must survive")
    subprocess.run(["mount", "--bind", str(outside), str(store.fs_path(gone.id))], check=True)
    try:
        assert sorted(p.name for p in store.orphans()) == sorted(["new-abc", "999", gone.id])
        store.cleanup()
    finally:
        if mountpoints_under(store.snapshots_dir):
            subprocess.run(["umount", "-l", str(store.fs_path(gone.id))])
    assert (outside / "file").read_text() == "must survive"
    assert os.listdir(store.snapshots_dir) == [keep.id]
    store.close()
    # a second store on the same root sees the same rows (WAL committed)
    again = SnapshotStore(tmp_path / "root")
    assert [i.name for i in again.walk()] == ["keep"]
    again.close()
    mode = sqlite3.connect(tmp_path / "root" / "metadata.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_update_fieldpaths(store):
    store.create(Kind.ACTIVE, "k", labels={"a": "1", "b": "2"})
    assert store.update("k", {"a": "9", "z": "0"}, ["labels.a"]).labels == {"a": "9", "b": "2"}
    assert store.update("k", {}, ["labels.b"]).labels == {"a": "9"}
    assert store.update("k", {"n": "1"}, ["labels"]).labels == {"n": "1"}
    assert store.update("k", {"m": "2"}, []).labels == {"m": "2"}
    with pytest.raises(InvalidArgument):
        store.update("k", {}, ["kind"])
    with pytest.raises(NotFound):
        store.update("nope", {}, [])


def test_usage_counts_blocks_and_inodes_once(store, tmp_path):
    snap = store.create(Kind.ACTIVE, "k")
    fs = store.fs_path(snap.id)
    (fs / "d").mkdir()
    (fs / "d" / "big").write_bytes(os.urandom(64 * 1024))
    os.link(fs / "d" / "big", fs / "hard")  # same inode: counted once
    os.symlink("d/big", fs / "sym")
    u = store.usage("k")
    assert u.inodes == 4  # fs/, d/, big (=hard), sym
    assert 64 * 1024 <= u.size < 64 * 1024 + 5 * 8192
    store.commit("c", "k")
    (fs / "later").write_bytes(b"x" * 10000)  # committed usage is the one recorded at commit
    assert store.usage("c") == u
    assert disk_usage(tmp_path / "missing").inodes == 0


@pytest.mark.parametrize("flt,expect", [
    ('labels."containerd.io/snapshot.ref"==sha256:abc,parent=="p1"', {"one"}),
    ('labels."containerd.io/snapshot.ref"==sha256:abc', {"one", "two"}),
    ("kind==committed", {"one", "two"}),
    ("kind!=committed", {"three"}),
    ("name==three", {"three"}),
    ("name~=^t", {"two", "three"}),
    ('name~=/e$/', {"one", "three"}),
    ("labels.x.y==dotted", {"three"}),
    ("labels.x.y", {"three"}),
    ('labels."x.y"==dotted', {"three"}),
    ('parent==""', {"three"}),
    ("  name == one ", {"one"}),
])
def test_filters(flt, expect):
    items = [("one", "committed", "p1", {"containerd.io/snapshot.ref": "sha256:abc"}),
             ("two", "committed", "p2", {"containerd.io/snapshot.ref": "sha256:abc"}),
             ("three", "active", "", {"x.y": "dotted"})]
    f = filters.parse_all([flt])
    assert {n for n, k, p, item in items if f.match(filters.snapshot_adaptor(k, n, p, item))} == expect


@pytest.mark.parametrize("bad", ["name==", 'name=="open', "name===x", ",", "name==a b", "labels.==x", 'name==/re/'])
def test_filter_syntax_errors(bad):
    with pytest.raises(filters.FilterSyntaxError):
        filters.parse_all([bad])
