"""The transport-free snapshotter core (:mod:`remora.snapshotter.snapshotter`), without gRPC.

containerd's semantics (prepare/view/commit/remove/mounts, walk filters, update, usage, cleanup) and
the remote-snapshot handshake through the RemoteLayerHandler seam: mounted and committed under the
target (AlreadyExists), fallback when the handler declines or fails, no fallback when it refuses,
the commit race, the liveness check before mounts, recovery and restore at start. The handler here
is in-process but its mounts are real tmpfs mounts; the real remora handler is covered end to end by
test_remote_e2e.py and test_remote_health.py.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from remora.errors import InvalidInput, NotFound
from remora.snapshotter.overlay import Mount
from remora.snapshotter.remote import LayerUnavailable, RemoteLayer, RemoteLayerHandler, RemoteLayerRefused
from remora.snapshotter.snapshotter import Snapshotter, Unimplemented
from remora.snapshotter.storage import (
    AlreadyExists,
    FailedPrecondition,
    Kind,
    SnapshotStore,
    detach_mount,
    mountpoints_under,
)

REF = "containerd.io/snapshot.ref"
REMOTE = {REF: "sha256:chain1", "containerd.io/snapshot/remora.role": "bootstrap"}


class TmpfsHandler(RemoteLayerHandler):
    """Mounts a tmpfs holding a marker file; ``mode`` says what mount() does instead when not "mount".

    ensure_healthy is a real liveness check: the layer is alive while its mountpoint is a mount;
    a dead one is re-mounted when ``can_restore``, else LayerUnavailable."""

    def __init__(self, mode: str = "mount"):
        self.mode = mode
        self.can_restore = True
        self.mounted: list[RemoteLayer] = []
        self.unmounted: list[str] = []
        self.restored: list[str] = []
        self.checked: list[str] = []
        self.on_mount = None  # called with the layer after mounting (to race a commit)
        self.closed = False

    @staticmethod
    def _tmpfs(mountpoint: Path, text: str) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "remora-core-test", str(mountpoint)], check=True)
        (Path(mountpoint) / "marker").write_text(text)

    async def mount(self, layer: RemoteLayer) -> bool:
        if self.mode == "decline":
            return False
        if self.mode == "fail":
            raise RuntimeError("registry unreachable")
        self._tmpfs(layer.mountpoint, layer.target)
        self.mounted.append(layer)
        if self.mode == "refuse":
            raise RemoteLayerRefused("no credentials the registry accepts")
        if self.on_mount:
            self.on_mount(layer)
        return True

    async def unmount(self, snapshot_id: str, mountpoint: Path) -> None:
        if os.path.ismount(mountpoint):
            detach_mount(str(mountpoint))
        self.unmounted.append(snapshot_id)

    async def restore(self, snapshot_id: str, mountpoint: Path, labels) -> None:
        if not os.path.ismount(mountpoint):
            self._tmpfs(mountpoint, labels[REF])
        self.restored.append(snapshot_id)

    async def ensure_healthy(self, snapshot_id: str, mountpoint: Path) -> None:
        self.checked.append(snapshot_id)
        if os.path.ismount(mountpoint):
            return
        if not self.can_restore:
            raise LayerUnavailable(f"lazily mounted layer of snapshot {snapshot_id} is dead")
        self._tmpfs(mountpoint, "restored")

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def root(tmp_path):
    yield tmp_path / "root"
    for mp in mountpoints_under(tmp_path):
        detach_mount(mp)


@pytest.fixture
def make(root):
    """Factory: a Snapshotter on ``root`` with the given handler; closed at the end."""
    made: list[Snapshotter] = []

    def make(handler: RemoteLayerHandler | None = None) -> Snapshotter:
        made.append(Snapshotter(SnapshotStore(root), handler))
        return made[-1]

    yield make
    for s in made:
        try:
            s.store.close()
        except Exception:  # noqa: BLE001 - a test collects whatever failed
            pass


def upper(mounts: list[Mount]) -> Path:
    m = mounts[0]
    if m.type == "bind":
        return Path(m.source)
    return Path(next(o for o in m.options if o.startswith("upperdir="))[len("upperdir="):])


async def commit_layer(s: Snapshotter, name: str, parent: str = "", files=None, labels=None) -> None:
    mounts = await s.prepare(f"extract-{name}", parent)
    for rel, text in (files or {}).items():
        (upper(mounts) / rel).write_text(text)
    await s.commit(name, f"extract-{name}", labels or {})


async def test_prepare_view_commit_mounts_remove(make):
    s = make()
    base_mounts = await s.prepare("extract-base")
    assert [(m.type, m.options) for m in base_mounts] == [("bind", ["rw", "rbind"])]
    (upper(base_mounts) / "a").write_text("1")
    assert (await s.stat("extract-base")).kind == Kind.ACTIVE
    assert (await s.usage("extract-base")).inodes == 2  # fs/ and a, walked now
    await s.commit("base", "extract-base", {"tier": "base", "empty": ""})
    info = await s.stat("base")
    assert (info.kind, info.parent, info.labels) == (Kind.COMMITTED, "", {"tier": "base"})
    with pytest.raises(NotFound):
        await s.stat("extract-base")
    # a child is an overlay on the parent; Mounts gives the same mounts again
    child = await s.prepare("ctr", "base")
    assert child[0].type == "overlay" and f"lowerdir={s.store.fs_path(s.store.snapshot_id('base'))}" in child[0].options
    assert await s.mounts("ctr") == child
    # a view of one parent is a read-only bind of it
    view = await s.view("v", "base")
    assert [(m.type, m.source, m.options) for m in view] == [("bind", base_mounts[0].source, ["ro", "rbind"])]
    # containerd's error kinds
    with pytest.raises(AlreadyExists):
        await s.prepare("ctr", "base")
    with pytest.raises(NotFound):
        await s.prepare("k", "missing")
    with pytest.raises(InvalidInput):
        await s.prepare("k", "ctr")  # a parent must be committed
    with pytest.raises(InvalidInput):
        await s.prepare("")
    with pytest.raises(FailedPrecondition):
        await s.mounts("base")  # committed: no mounts
    with pytest.raises(FailedPrecondition):
        await s.commit("x", "v")  # a view cannot be committed
    with pytest.raises(FailedPrecondition):
        await s.remove("base")  # it has children
    with pytest.raises(Unimplemented):
        await s.commit("x", "ctr", parent="other")  # no rebase
    await s.commit("top", "ctr", parent="base")  # its own parent is not a rebase
    assert (await s.stat("top")).parent == "base"
    # remove deletes the row and the directory
    top_dir = s.store.dir(s.store.snapshot_id("top"))
    await s.remove("top")
    assert not top_dir.exists()
    with pytest.raises(NotFound):
        await s.remove("top")
    await s.remove("v")
    await s.remove("base")
    assert await s.walk() == [] and s.store.orphans() == []


async def test_walk_filters_and_update(make):
    s = make()
    await commit_layer(s, "base", labels={REF: "sha256:aa", "tier": "base"})
    for i in range(6):
        await s.prepare(f"ns/{i}/c", "base", {"n": str(i % 3)})

    async def names(*filters: str) -> list[str]:
        return sorted(i.name for i in await s.walk(filters))

    assert await names(f'labels."{REF}"==sha256:aa,parent==""') == ["base"]
    assert await names("labels.n==1", "labels.n==2") == ["ns/1/c", "ns/2/c", "ns/4/c", "ns/5/c"]  # OR
    assert await names("labels.n==1,labels.n==2") == []  # AND
    assert len(await names("kind==active")) == 6
    with pytest.raises(InvalidInput):
        await s.walk(["labels.=="])
    got = await s.update("base", {"tier": "x", "new": "1"}, ["labels.tier", "labels.gone"])
    assert got.labels == {REF: "sha256:aa", "tier": "x"}
    got = await s.update("base", {"only": "1"})
    assert got.labels == {"only": "1"}
    with pytest.raises(InvalidInput):
        await s.update("base", {}, ["parent"])


async def test_remote_handshake_commits_under_the_target(make, tmp_path):
    h = TmpfsHandler()
    s = make(h)
    # no remora annotation: an ordinary local layer, never offered to the handler
    await s.prepare("plain", "", {REF: "sha256:other"})
    assert h.mounted == []
    await commit_layer(s, "base", files={"b": "base"})
    with pytest.raises(AlreadyExists, match="sha256:chain1"):
        await s.prepare("default/1/extract", "base", REMOTE, namespace="k8s.io")
    [layer] = h.mounted
    assert (layer.key, layer.target, layer.parent, layer.namespace) == ("default/1/extract", "sha256:chain1", "base",
                                                                      "k8s.io")
    assert layer.mountpoint == s.store.fs_path(layer.snapshot_id) and os.path.ismount(layer.mountpoint)
    info = await s.stat("sha256:chain1")
    assert (info.kind, info.parent, info.labels) == (Kind.COMMITTED, "base", REMOTE)
    assert (await s.usage("sha256:chain1")).size == 0  # nothing was downloaded
    with pytest.raises(NotFound):
        await s.stat("default/1/extract")
    # the target exists: ALREADY_EXISTS at once, nothing mounted or created again
    with pytest.raises(AlreadyExists):
        await s.prepare("default/2/extract", "base", REMOTE)
    assert len(h.mounted) == 1
    with pytest.raises(NotFound):
        await s.stat("default/2/extract")
    # a container on top: its mounts stack on the lazy mount, checked alive first
    mounts = await s.prepare("ctr", "sha256:chain1")
    assert h.checked == [layer.snapshot_id]
    target = tmp_path / "mnt"
    target.mkdir()
    subprocess.run(["mount", "-t", mounts[0].type, mounts[0].source, "-o", ",".join(mounts[0].options), str(target)],
                   check=True)
    try:
        assert (target / "marker").read_text() == "sha256:chain1" and (target / "b").read_text() == "base"
    finally:
        detach_mount(str(target))
    # remove releases the lazy mount through the handler before the directory goes
    await s.remove("ctr")
    await s.remove("sha256:chain1")
    assert h.unmounted == [layer.snapshot_id]
    assert not layer.mountpoint.exists() and mountpoints_under(s.store.root) == []


@pytest.mark.parametrize("mode", ["decline", "fail"])
async def test_falls_back_to_a_local_layer(make, mode):
    """A handler that declines or raises costs speed, never correctness: ordinary mounts, an active
    snapshot containerd applies the layer into, nothing committed under the target."""
    s = make(TmpfsHandler(mode))
    mounts = await s.prepare("k", "", REMOTE)
    assert [(m.type, m.options) for m in mounts] == [("bind", ["rw", "rbind"])]
    assert (await s.stat("k")).kind == Kind.ACTIVE
    with pytest.raises(NotFound):
        await s.stat("sha256:chain1")
    (upper(mounts) / "f").write_text("applied")
    await s.commit("sha256:chain1", "k", REMOTE)  # containerd's own unpack then commits it
    assert (await s.stat("sha256:chain1")).kind == Kind.COMMITTED


async def test_refused_remote_layer_fails_and_leaves_nothing(make):
    h = TmpfsHandler("refuse")
    s = make(h)
    with pytest.raises(FailedPrecondition, match="no credentials"):
        await s.prepare("k", "", REMOTE)
    [layer] = h.mounted
    assert h.unmounted == [layer.snapshot_id]  # released
    assert await s.walk() == [] and s.store.orphans() == []
    assert mountpoints_under(s.store.root) == []


async def test_commit_race_the_first_target_wins(make):
    """The target is committed by someone else while our handler mounts: ours is released and
    removed, and the answer is still ALREADY_EXISTS (containerd then uses theirs)."""
    h = TmpfsHandler()
    s = make(h)

    def race(layer: RemoteLayer) -> None:  # the other Prepare, done in the store meanwhile
        s.store.create(Kind.ACTIVE, "other-key")
        s.store.commit(layer.target, "other-key", {"by": "other"})

    h.on_mount = race
    with pytest.raises(AlreadyExists):
        await s.prepare("k", "", REMOTE)
    assert (await s.stat("sha256:chain1")).labels == {"by": "other"}
    assert h.unmounted == [h.mounted[0].snapshot_id]
    with pytest.raises(NotFound):
        await s.stat("k")
    assert s.store.orphans() == [] and mountpoints_under(s.store.root) == []


async def test_mounts_refused_on_a_dead_lazy_layer(make):
    h = TmpfsHandler()
    s = make(h)
    with pytest.raises(AlreadyExists):
        await s.prepare("x", "", REMOTE)
    [layer] = h.mounted
    await s.prepare("ctr", "sha256:chain1")
    detach_mount(str(layer.mountpoint))  # the layer's filesystem dies
    h.can_restore = False
    with pytest.raises(LayerUnavailable):
        await s.mounts("ctr")
    with pytest.raises(LayerUnavailable):
        await s.view("v", "sha256:chain1")
    with pytest.raises(LayerUnavailable):
        await s.prepare("ctr2", "sha256:chain1")
    # a snapshot that does not stack on it is not affected
    assert (await s.prepare("alone"))[0].type == "bind"
    h.can_restore = True  # the handler can bring it back: mounts are handed out again
    assert (await s.mounts("ctr"))[0].type == "overlay"
    assert (layer.mountpoint / "marker").read_text() == "restored"


async def test_cleanup_recover_and_restore(make, root):
    h = TmpfsHandler()
    s = make(h)
    with pytest.raises(AlreadyExists):
        await s.prepare("x", "", REMOTE)
    [layer] = h.mounted
    await s.prepare("ctr", "sha256:chain1")
    orphan = s.store.snapshots_dir / "999"
    (orphan / "fs").mkdir(parents=True)
    [removed] = await s.cleanup()
    assert removed.parent == s.store.snapshots_dir and not removed.exists() and not orphan.exists()
    assert await s.cleanup() == []
    # a crash leaves a stray mount and an orphan; the lazy mount must survive the restart
    stray = s.store.dir(s.store.snapshot_id("ctr")) / "work"
    subprocess.run(["mount", "-t", "tmpfs", "stray", str(stray)], check=True)
    (orphan / "fs").mkdir(parents=True)
    s.store.close()
    s2 = make(h)
    await s2.recover()
    assert mountpoints_under(root) == [str(layer.mountpoint)] and not orphan.exists()
    seen: list[tuple[int, int]] = []
    await s2.restore(lambda done, total: seen.append((done, total)))
    assert h.restored == [layer.snapshot_id] and seen == [(0, 1), (1, 1)]
    assert (layer.mountpoint / "marker").read_text() == "sha256:chain1"  # adopted, not re-mounted
    # without a handler nothing can restore a lazy layer: logged, not attempted
    s2.store.close()
    s3 = make()
    seen.clear()
    await s3.restore(lambda done, total: seen.append((done, total)))
    assert seen == []
    await s3.close()
    s4 = make(h)
    await s4.close()
    assert h.closed

