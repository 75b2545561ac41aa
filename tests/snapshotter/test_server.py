"""The snapshots gRPC service: status codes containerd understands, namespaces, List streaming and
filters, overlay mounts that really mount, the remote-layer seam, and kill -9 crash safety."""
from __future__ import annotations

import os
import random
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from remora.snapshotter.overlay import Mount, mount_all
from remora.snapshotter.remote import RemoteLayer, RemoteLayerHandler
from remora.snapshotter.storage import SnapshotStore, mountpoints_under
from remora_testing.containerd import RemoraSnapshotter

REF = "containerd.io/snapshot.ref"


def code_of(fn, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args)
    return ei.value.code()


def upper(mounts) -> Path:
    """The directory an active snapshot writes to (bind source or overlay upperdir)."""
    m = mounts[0]
    if m.type == "bind":
        return Path(m.source)
    return Path(next(o for o in m.options if o.startswith("upperdir="))[len("upperdir="):])


def commit_layer(srv, name: str, parent: str = "", files: dict[str, str] | None = None, labels=None) -> None:
    key = f"extract-{name}"
    mounts = srv.call("Prepare", pb.PrepareSnapshotRequest(key=key, parent=parent)).mounts
    for rel, text in (files or {}).items():
        p = upper(mounts) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    srv.call("Commit", pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {}))


def test_status_codes(server):
    S = server
    commit_layer(S, "base")
    assert code_of(S.call, "Stat", pb.StatSnapshotRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(S.call, "Prepare", pb.PrepareSnapshotRequest(key="base")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(S.call, "Prepare", pb.PrepareSnapshotRequest(key="k", parent="missing")) == grpc.StatusCode.NOT_FOUND
    assert code_of(S.call, "Prepare", pb.PrepareSnapshotRequest(key="")) == grpc.StatusCode.INVALID_ARGUMENT
    S.call("Prepare", pb.PrepareSnapshotRequest(key="active", parent="base"))
    # a parent must be committed
    assert code_of(S.call, "Prepare", pb.PrepareSnapshotRequest(key="k2", parent="active")) == \
        grpc.StatusCode.INVALID_ARGUMENT
    # removing a snapshot with children, committing a committed one, mounting a committed one
    assert code_of(S.call, "Remove", pb.RemoveSnapshotRequest(key="base")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(S.call, "Commit", pb.CommitSnapshotRequest(name="x", key="base")) == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(S.call, "Mounts", pb.MountsRequest(key="base")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(S.call, "Commit", pb.CommitSnapshotRequest(name="base", key="active")) == \
        grpc.StatusCode.ALREADY_EXISTS
    # containerd 2.0 rebase-on-commit is not supported
    assert code_of(S.call, "Commit", pb.CommitSnapshotRequest(name="y", key="active", parent="other")) == \
        grpc.StatusCode.UNIMPLEMENTED
    # same parent is not a rebase
    S.call("Commit", pb.CommitSnapshotRequest(name="y", key="active", parent="base"))
    bad = pb.UpdateSnapshotRequest(info=pb.Info(name="y"), update_mask=field_mask_pb2.FieldMask(paths=["parent"]))
    assert code_of(S.call, "Update", bad) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(S.call, "List", pb.ListSnapshotsRequest(filters=["labels.=="])) == grpc.StatusCode.INVALID_ARGUMENT
    big = {"k": "v" * 4096}
    assert code_of(S.call, "Prepare", pb.PrepareSnapshotRequest(key="big", labels=big)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    # failed requests left nothing behind
    assert sorted(i.name for i in S.call("List", pb.ListSnapshotsRequest())) == ["base", "y"]


def test_unavailable_while_draining(server):
    server.server.service.draining = True
    assert code_of(server.call, "Stat", pb.StatSnapshotRequest(key="x")) == grpc.StatusCode.UNAVAILABLE
    server.server.service.draining = False


def test_list_streams_batches_and_filters(server):
    S = server
    commit_layer(S, "base", labels={"containerd.io/snapshot.ref": "sha256:aa", "tier": "base"})
    for i in range(250):
        S.call("Prepare", pb.PrepareSnapshotRequest(key=f"ns/{i}/c", parent="base", labels={"n": str(i % 3)}))
    responses = list(S.stub.List(pb.ListSnapshotsRequest(), timeout=30))
    assert [len(r.info) for r in responses] == [100, 100, 51]  # containerd's batch size

    def names(*filters):
        return sorted(i.name for i in S.call("List", pb.ListSnapshotsRequest(filters=list(filters))))

    assert names('labels."containerd.io/snapshot.ref"==sha256:aa,parent==""') == ["base"]
    assert names('labels."containerd.io/snapshot.ref"==sha256:aa,parent=="x"') == []
    assert len(names("kind==active")) == 250
    assert names("kind==committed") == ["base"]
    assert len(names("labels.n==1")) == 83
    assert len(names("labels.n==1", "labels.n==2")) == 166  # several filters: OR
    assert names("labels.n==1,labels.n==2") == []  # one filter: AND
    assert names('name~=/^ns\\/1\\d\\//') == sorted(f"ns/{i}/c" for i in range(10, 20))
    assert names("labels.tier") == ["base"]  # presence
    assert len(names("labels.tier!=base")) == 250


def test_update_masks_and_namespaces(server):
    S = server
    commit_layer(S, "l", labels={"a": "1", "b": "2"})
    info = S.call("Stat", pb.StatSnapshotRequest(key="l"), namespace="other").info
    assert dict(info.labels) == {"a": "1", "b": "2"} and info.kind == pb.COMMITTED
    req = pb.UpdateSnapshotRequest(info=pb.Info(name="l", labels={"a": "x", "c": "3"}),
                                   update_mask=field_mask_pb2.FieldMask(paths=["labels.a", "labels.b"]))
    got = S.call("Update", req).info
    assert dict(got.labels) == {"a": "x"}  # b absent in the request: deleted; c not in the mask
    assert got.updated_at.ToNanoseconds() > got.created_at.ToNanoseconds()
    got = S.call("Update", pb.UpdateSnapshotRequest(info=pb.Info(name="l", labels={"z": "9"}))).info
    assert dict(got.labels) == {"z": "9"}  # no mask: replace all


def test_mounts_really_mount(server, tmp_path):
    """Bind for a base layer, overlay with child-most-first lowerdirs, read-only views, whiteouts."""
    S = server
    commit_layer(S, "l1", files={"a": "1", "d/x": "x"})
    commit_layer(S, "l2", parent="l1", files={"a": "2", "b": "2"})
    mounts = S.call("Prepare", pb.PrepareSnapshotRequest(key="c", parent="l2")).mounts
    assert mounts[0].type == "overlay"
    lower = next(o for o in mounts[0].options if o.startswith("lowerdir="))
    l1 = S.call("View", pb.ViewSnapshotRequest(key="v1", parent="l1")).mounts
    assert l1[0].type == "bind" and list(l1[0].options) == ["ro", "rbind"]
    assert lower.split("=")[1].split(":")[1] == l1[0].source  # child-most first: l2 then l1
    target = tmp_path / "mnt"
    target.mkdir()
    mount_all([Mount(m.type, m.source, list(m.options)) for m in mounts], target)
    try:
        assert (target / "a").read_text() == "2" and (target / "d" / "x").read_text() == "x"
        (target / "d" / "x").unlink()  # overlay records a whiteout in the upper dir
        (target / "new").write_text("n")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    S.call("Commit", pb.CommitSnapshotRequest(name="l3", key="c"))
    view = S.call("View", pb.ViewSnapshotRequest(key="v3", parent="l3")).mounts
    assert view[0].type == "overlay" and not any(o.startswith("upperdir") for o in view[0].options)
    mount_all([Mount(m.type, m.source, list(m.options)) for m in view], target)
    try:
        assert sorted(os.listdir(target / "d")) == [] and (target / "new").read_text() == "n"
        with pytest.raises(OSError):
            (target / "w").write_text("no")  # a view is read-only
    finally:
        subprocess.run(["umount", str(target)], check=True)
    usage = S.call("Usage", pb.UsageRequest(key="l1"))
    assert usage.inodes == 4 and usage.size > 0  # fs/, a, d/, d/x


class RecordingHandler(RemoteLayerHandler):
    """Mounts a tmpfs holding one marker file (a real mount); can be told to fail."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.mounted: list[RemoteLayer] = []
        self.unmounted: list[str] = []
        self.restored: list[str] = []

    async def _mount(self, mountpoint: Path, text: str) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "remora-test", str(mountpoint)], check=True)
        (mountpoint / "marker").write_text(text)

    async def mount(self, layer: RemoteLayer) -> bool:
        if self.fail:
            raise RuntimeError("registry unreachable")
        await self._mount(layer.mountpoint, layer.target)
        self.mounted.append(layer)
        return True

    async def unmount(self, snapshot_id, mountpoint) -> None:
        subprocess.run(["umount", str(mountpoint)], check=True)
        self.unmounted.append(snapshot_id)

    async def restore(self, snapshot_id, mountpoint, labels) -> None:
        if not os.path.ismount(mountpoint):  # a live mount survives a restart: adopt it as is
            await self._mount(mountpoint, labels[REF])
        self.restored.append(snapshot_id)


REMOTE_LABELS = {REF: "sha256:chain1", "containerd.io/snapshot/remora.toc": "sha256:toc"}


def test_remote_handshake(start_server, tmp_path):
    handler = RecordingHandler()
    S = start_server(handler)
    # no remora annotation: not offered to the handler, an ordinary local layer
    S.call("Prepare", pb.PrepareSnapshotRequest(key="plain", labels={REF: "sha256:other"}))
    assert handler.mounted == []
    # remora annotations: mounted, committed under the target with labels and parent -> ALREADY_EXISTS
    commit_layer(S, "base")
    req = pb.PrepareSnapshotRequest(key="default/1/extract-1", parent="base", labels=REMOTE_LABELS)
    assert code_of(S.call, "Prepare", req) == grpc.StatusCode.ALREADY_EXISTS
    [layer] = handler.mounted
    assert (layer.target, layer.parent, layer.namespace, layer.key) == ("sha256:chain1", "base", "default",
                                                                      "default/1/extract-1")
    info = S.call("Stat", pb.StatSnapshotRequest(key="sha256:chain1")).info
    assert info.kind == pb.COMMITTED and info.parent == "base" and dict(info.labels) == REMOTE_LABELS
    assert code_of(S.call, "Stat", pb.StatSnapshotRequest(key="default/1/extract-1")) == grpc.StatusCode.NOT_FOUND
    # exactly containerd's follow-up query finds it
    flt = f'labels."{REF}"==sha256:chain1,parent=="base"'
    assert [i.name for i in S.call("List", pb.ListSnapshotsRequest(filters=[flt]))] == ["sha256:chain1"]
    # a second Prepare for the same target answers ALREADY_EXISTS without mounting again
    req2 = pb.PrepareSnapshotRequest(key="default/2/extract-1", parent="base", labels=REMOTE_LABELS)
    assert code_of(S.call, "Prepare", req2) == grpc.StatusCode.ALREADY_EXISTS and len(handler.mounted) == 1
    # a container on top sees the remote layer through overlay
    mounts = S.call("Prepare", pb.PrepareSnapshotRequest(key="ctr", parent="sha256:chain1")).mounts
    target = tmp_path / "mnt"
    target.mkdir()
    mount_all([Mount(m.type, m.source, list(m.options)) for m in mounts], target)
    try:
        assert (target / "marker").read_text() == "sha256:chain1"
    finally:
        subprocess.run(["umount", str(target)], check=True)
    # restart: the live mount is left in place (containers may use it) and handed to restore (once);
    # a stray mount anywhere else under the root is detached
    stray = tmp_path / "root" / "snapshots" / S.server.store.snapshot_id("ctr") / "work"
    subprocess.run(["mount", "-t", "tmpfs", "stray", str(stray)], check=True)
    S.stop()
    S = start_server(handler)
    assert handler.restored == [layer.snapshot_id]
    assert mountpoints_under(tmp_path / "root") == [str(layer.mountpoint)]
    assert (layer.mountpoint / "marker").read_text() == "sha256:chain1"
    # Remove unmounts through the handler before deleting the directory
    S.call("Remove", pb.RemoveSnapshotRequest(key="ctr"))
    S.call("Remove", pb.RemoveSnapshotRequest(key="sha256:chain1"))
    assert handler.unmounted == [layer.snapshot_id]
    assert mountpoints_under(tmp_path / "root") == []


class GatedRestoreHandler(RecordingHandler):
    """A RecordingHandler whose restore waits until the test opens the gate (a slow re-mount)."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    async def restore(self, snapshot_id, mountpoint, labels) -> None:
        import asyncio

        await asyncio.to_thread(self.gate.wait, 60)
        await super().restore(snapshot_id, mountpoint, labels)


def test_a_slow_restore_at_start_reports_progress(start_server, caplog):
    """A snapshotter that takes more than a second to restore its lazy mounts says so, every second,
    before it serves (its log must not look hung); a quick start says nothing."""
    import logging

    from remora.procutil import wait_until

    caplog.set_level(logging.WARNING, logger="remora.snapshotter.server")
    handler = GatedRestoreHandler()
    handler.gate.set()
    S = start_server(handler)
    commit_layer(S, "base")
    req = pb.PrepareSnapshotRequest(key="default/1/extract-1", parent="base", labels=REMOTE_LABELS)
    assert code_of(S.call, "Prepare", req) == grpc.StatusCode.ALREADY_EXISTS
    S.stop()
    S = start_server(handler)  # quick restore (gate open): no progress line
    assert "restoring the lazy mounts" not in caplog.text
    S.stop()
    handler.gate.clear()
    started: list = []
    starter = threading.Thread(target=lambda: started.append(start_server(handler)), daemon=True)
    starter.start()
    try:
        wait_until(lambda: "restoring the lazy mounts of the previous run before serving: 0/1 done" in caplog.text,
                   15, what="a progress line while the restore is blocked")
        assert not started, "the server does not serve before its restore is done"
    finally:
        handler.gate.set()
        starter.join(60)
    assert started and len(handler.restored) == 2  # once per restart
    assert started[0].call("Stat", pb.StatSnapshotRequest(key="sha256:chain1")).info.kind == pb.COMMITTED


def test_remote_failure_falls_back_to_local_layer(start_server):
    S = start_server(RecordingHandler(fail=True))
    resp = S.call("Prepare", pb.PrepareSnapshotRequest(key="k", labels=REMOTE_LABELS))
    assert resp.mounts[0].type == "bind"  # containerd will download and apply the layer itself
    assert S.call("Stat", pb.StatSnapshotRequest(key="k")).info.kind == pb.ACTIVE


def test_socket_in_use_and_too_long(start_server, server, tmp_path):
    import asyncio

    from remora.errors import UsageError
    from remora.snapshotter.server import SnapshotterServer

    with pytest.raises(UsageError, match="in use"):
        asyncio.run(SnapshotterServer(tmp_path / "root2", server.address).start())
    # a second server on the same root (other socket) must not run recovery under the first one
    with pytest.raises(UsageError, match="in use by another snapshotter"):
        asyncio.run(SnapshotterServer(server.root, tmp_path / "other.sock").start())
    assert server.call("List", pb.ListSnapshotsRequest()) == []
    with pytest.raises(UsageError, match="too long"):
        asyncio.run(SnapshotterServer(tmp_path / "root3", "/tmp/" + "x" * 120).start())


def test_kill_9_leaves_consistent_state(tmp_path):
    """SIGKILL the real snapshotter process at random moments of a Prepare/write/Commit/Remove loop;
    after each restart every snapshot the client saw committed is intact (labels, parent, content),
    no directory is orphaned, and no unknown snapshot appeared."""
    rng = random.Random(1234)
    snap = RemoraSnapshotter(tmp_path / "snap", log_level="warning")
    committed: dict[str, str] = {}  # name -> parent, for every Commit that returned OK
    attempted: dict[str, str] = {}  # name -> parent, for every Commit sent (its reply may be lost)
    parents: set[str] = set()  # everything ever given as a parent (an active child may outlive a kill)
    removed: set[str] = set()
    seq = 0
    try:
        for _round in range(6):
            snap.start()
            channel = grpc.insecure_channel(f"unix://{snap.address}")
            stub = snapshots_pb2_grpc.SnapshotsStub(channel)
            timer = threading.Timer(rng.uniform(0.2, 1.0), snap.kill)
            timer.start()
            try:
                while True:
                    seq += 1
                    parent = rng.choice(sorted(set(committed) - removed) or [""]) if rng.random() < 0.8 else ""
                    name, key = f"layer-{seq}", f"extract-{seq}"
                    parents.add(parent)
                    mounts = stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent), timeout=5).mounts
                    (upper(mounts) / "content").write_text(name)
                    attempted[name] = parent
                    stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels={"name": name, "parent": parent}),
                                timeout=5)
                    committed[name] = parent
                    leaves = sorted(set(committed) - removed - parents)
                    if leaves and rng.random() < 0.3:
                        victim = rng.choice(leaves)
                        removed.add(victim)  # before the call: its reply may be lost to a kill
                        stub.Remove(pb.RemoveSnapshotRequest(key=victim), timeout=5)
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                      grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN), exc
            except FileNotFoundError:
                pass  # the kill raced our write into the upper directory; the commit never happened
            finally:
                timer.join()
                channel.close()
        assert seq > 30, "the loop barely ran: the test proves nothing"
        snap.start()  # recovery on start: orphans removed
        with grpc.insecure_channel(f"unix://{snap.address}") as channel:
            stub = snapshots_pb2_grpc.SnapshotsStub(channel)
            infos = {i.name: i for r in stub.List(pb.ListSnapshotsRequest(), timeout=10) for i in r.info}
            stub.Cleanup(pb.CleanupRequest(), timeout=10)
        snap.stop()
        live = set(committed) - removed
        committed_now = {n for n, i in infos.items() if i.kind == pb.COMMITTED}
        # every acknowledged commit not asked to be removed survived; anything else is one in flight at a
        # kill (a commit or removal whose reply was lost), never something the client did not ask for
        assert live <= committed_now
        assert committed_now <= set(attempted)
        for name in committed_now:
            info = infos[name]
            expected = {"name": name, "parent": attempted[name]} if attempted[name] else {"name": name}  # "" not kept
            assert info.parent == attempted[name] and dict(info.labels) == expected
        for name, info in infos.items():
            if info.kind == pb.ACTIVE:
                assert name.startswith("extract-")
        store = SnapshotStore(tmp_path / "snap")
        try:
            assert store.orphans() == []
            for name in committed_now:
                sid = store.snapshot_id(name)
                assert (store.fs_path(sid) / "content").read_text() == name
        finally:
            store.close()
    finally:
        snap.close()
