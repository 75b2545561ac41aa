"""The remora snapshotter under a real containerd 1.6 (proxy plugin): pull, run, whiteouts, GC,
restart, and the remote-layer handshake through the CRI plugin."""
from __future__ import annotations

import os
import subprocess
import uuid

import grpc
import pytest

from remora._proto.cri.runtime.v1 import api_pb2 as cri
from remora._proto.cri.runtime.v1 import api_pb2_grpc as cri_grpc
from remora.procutil import wait_until
from remora.snapshotter.remote import RemoteLayer, RemoteLayerHandler
from remora.snapshotter.storage import mountpoints_under
from remora_testing.containerd import PrivateContainerd
from remora_testing.imagebuild import (
    File,
    LayerSpec,
    OpaqueDir,
    Whiteout,
    busybox_layer,
    busybox_rootfs,
    tar_of_files,
    write_image,
)

pytestmark = pytest.mark.slow


def _ref(registry, name: str) -> str:
    return f"{registry.host}/snaptest/{name}-{uuid.uuid4().hex[:8]}:1"


def _snapshots(ctd: PrivateContainerd) -> list[list[str]]:
    out = ctd.ctr("snapshots", "--snapshotter", "remora", "ls").stdout.splitlines()[1:]
    return [line.split() for line in out if line.strip()]


@pytest.fixture(scope="module")
def layered_image(registry):
    """busybox + a layer adding /data/{a,b} and /opt/x + a layer deleting /data/a (whiteout),
    making /opt opaque and adding /opt/y and /data/c."""
    ref = _ref(registry, "layered")
    write_image(ref, None, [
        busybox_layer(),
        tar_of_files({"data/a": File(b"A\n"), "data/b": File(b"B\n"), "opt/x": File(b"X\n")}),
        tar_of_files({"data/a": Whiteout(), "data/c": File(b"C\n"), "opt": OpaqueDir(), "opt/y": File(b"Y\n")}),
    ], {"Cmd": ["sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]})
    return ref


def test_pull_run_whiteouts_and_gc(containerd, snapshotter_proc, layered_image):
    ctd = containerd
    ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "remora", layered_image)
    snaps = _snapshots(ctd)
    assert len(snaps) == 3 and all(s[-1] == "Committed" for s in snaps), snaps
    # one chain: base has no parent, each other layer's parent is a snapshot of ours
    names = {s[0] for s in snaps}
    parents = [s[1] for s in snaps if len(s) == 3]
    assert len(parents) == 2 and set(parents) <= names

    usage = ctd.ctr("snapshots", "--snapshotter", "remora", "usage").stdout
    assert any(unit in usage for unit in ("MiB", "KiB")), usage

    out = ctd.ctr("run", "--rm", "--snapshotter", "remora", layered_image, f"c-{uuid.uuid4().hex[:6]}",
                  "sh", "-c", "echo hello; ls /data; ls /opt; cat /data/b /data/c /opt/y; echo z > /data/new; "
                  "cat /data/new").stdout.split()
    assert out == ["hello", "b", "c", "y", "B", "C", "Y", "z"], out

    ctd.ctr("images", "rm", "--sync", layered_image)
    # containerd's GC removes the snapshots it no longer references and calls Cleanup
    wait_until(lambda: not _snapshots(ctd), 15, interval=0.2, what="containerd's GC to remove the snapshots")
    assert _snapshots(ctd) == []
    assert os.listdir(snapshotter_proc.root / "snapshots") == []
    assert mountpoints_under(snapshotter_proc.root) == []


def test_snapshotter_restart_keeps_snapshots(containerd, snapshotter_proc, layered_image):
    ctd = containerd
    ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "remora", layered_image)
    before = sorted(map(tuple, _snapshots(ctd)))
    snapshotter_proc.kill()  # crash: no graceful shutdown, stale socket file left behind
    snapshotter_proc.start()
    runs: list = []

    def runs_again() -> bool:  # containerd reconnects with backoff
        runs[:] = [ctd.ctr("run", "--rm", "--snapshotter", "remora", layered_image, f"c-{uuid.uuid4().hex[:6]}",
                           "cat", "/data/b", check=False)]
        return runs[0].returncode == 0

    try:
        wait_until(runs_again, 20, interval=0.5, what="a container on the restarted snapshotter")
    except TimeoutError:
        pass
    proc = runs[0]
    assert proc.stdout == "B\n", proc.stderr
    assert sorted(map(tuple, _snapshots(ctd))) == before


class BindMountHandler(RemoteLayerHandler):
    """A remote-layer handler for the test: "mounts" a layer by bind-mounting a directory that holds
    its content (a real mount, standing in for the lazy FUSE filesystem). Layers are looked up by the
    ``containerd.io/snapshot/cri.layer-digest`` label containerd's CRI plugin passes."""

    def __init__(self, content_by_digest: dict[str, str]):
        self.content = content_by_digest
        self.mounted: list[RemoteLayer] = []
        self.unmounted: list[str] = []

    async def mount(self, layer: RemoteLayer) -> bool:
        src = self.content.get(layer.labels.get("containerd.io/snapshot/cri.layer-digest", ""))
        if src is None:
            return False
        subprocess.run(["mount", "--bind", "-o", "ro", src, str(layer.mountpoint)], check=True)
        self.mounted.append(layer)
        return True

    async def unmount(self, snapshot_id, mountpoint) -> None:
        subprocess.run(["umount", str(mountpoint)], check=True)
        self.unmounted.append(snapshot_id)


def test_cri_pull_uses_remote_layer_handler(tmp_path, registry, start_server):
    """CRI PullImage of an image whose layers carry remora annotations: every layer is mounted by
    the handler, committed under containerd's chain ID, and containerd never downloads a layer."""
    rootfs = busybox_rootfs(tmp_path / "layer0")
    extra = tmp_path / "layer1"
    (extra / "data").mkdir(parents=True)
    (extra / "data" / "remote.txt").write_text("served by the handler\n")
    ref = _ref(registry, "remote")
    ann = {"containerd.io/snapshot/remora.test": "1"}
    img = write_image(ref, None, [LayerSpec(busybox_layer(), annotations=ann),
                                  LayerSpec(tar_of_files({"data/remote.txt": File(b"served by the handler\n")}),
                                            annotations=ann)],
                      {"Cmd": ["sh"], "Env": ["PATH=/bin"]})
    handler = BindMountHandler({img.layers[0].digest: str(rootfs), img.layers[1].digest: str(extra)})
    srv = start_server(handler)
    ctd = PrivateContainerd(tmp_path / "ctd", srv.address, cri=True, namespace="k8s.io",
                            registry_mirrors={registry.host: registry.url}).start()
    try:
        with grpc.insecure_channel(f"unix://{ctd.address}") as ch:
            resp = cri_grpc.ImageServiceStub(ch).PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)),
                                                           timeout=60)
        assert resp.image_ref.startswith("sha256:")
        assert len(handler.mounted) == 2
        base, top = handler.mounted
        assert base.parent == "" and top.parent == base.target
        assert base.namespace == "k8s.io"
        assert top.labels["containerd.io/snapshot/cri.image-ref"] == ref
        # committed under the chain IDs containerd asked for; the temporary keys are gone
        snaps = _snapshots(ctd)
        assert sorted(s[0] for s in snaps) == sorted([base.target, top.target]), snaps
        # no layer blob was downloaded into containerd's content store
        stored = {line.split()[0] for line in ctd.ctr("content", "ls").stdout.splitlines()[1:] if line.strip()}
        assert img.descriptor.digest in stored and img.config_descriptor.digest in stored
        assert not stored & {img.layers[0].digest, img.layers[1].digest}
        out = ctd.ctr("run", "--rm", "--snapshotter", "remora", ref, "c-remote",
                      "sh", "-c", "cat /data/remote.txt; echo ok > /data/w; cat /data/w").stdout
        assert out == "served by the handler\nok\n"
        # removing the image lets GC remove the snapshots, which unmounts through the handler
        with grpc.insecure_channel(f"unix://{ctd.address}") as ch:
            cri_grpc.ImageServiceStub(ch).RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)),
                                                      timeout=30)
        wait_until(lambda: not _snapshots(ctd), 15, interval=0.2, what="containerd's GC to remove the snapshots")
        assert _snapshots(ctd) == []
        assert sorted(handler.unmounted) == sorted([base.snapshot_id, top.snapshot_id])
        assert mountpoints_under(tmp_path / "root") == []
    finally:
        ctd.close()
