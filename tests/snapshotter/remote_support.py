"""Prepare a remora image's layers remotely in a `remora snapshotter`, as containerd's unpacker does.

Used by tests that need lazily mounted layers without a containerd in the way.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import grpc

from remora import oci
from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from remora.converter.convert import ConvertOptions, convert
from remora.imagestore import open_store
from remora.snapshotter.pull import chain_ids, layer_labels
from remora_testing.containerd import RemoraSnapshotter
from remora_testing.imagebuild import LayerSpec, busybox_rootfs, write_image

NAMESPACE = (("containerd-namespace", "lazytest"),)


def lowest_dir(mount) -> str:
    """The directory of the lazily mounted image in an active snapshot's mounts (the top lowerdir)."""
    if mount.type == "overlay":
        return next(o for o in mount.options if o.startswith("lowerdir=")).split("=", 1)[1].split(":")[0]
    return mount.source


@contextlib.contextmanager
def remote_busybox(registry, tmp_path: Path, repo: str, snapshotter_args: list[str] = (),
                   command: list[str] | None = None):
    """Yield ``(stub, top chain id, snapshotter root)`` with every layer of a converted busybox image
    committed remotely (Prepare answered ALREADY_EXISTS). ``command``: how to start the snapshotter
    (default ``python -m remora.snapshotter.cli``)."""
    src = f"{registry.host}/{repo}:1"
    write_image(src, None, [LayerSpec(busybox_rootfs(tmp_path / "bb"))])
    dst = f"{registry.host}/{repo}:1-remora"
    convert(src, dst, ConvertOptions(progress=False))
    store = open_store(dst)
    desc, data = store.resolve()
    manifest = oci.parse_manifest(data, desc.media_type)
    config = oci.ImageConfig.from_bytes(store.open_blob(manifest.config).read())
    root = tmp_path / "root"
    command = command or [sys.executable, "-m", "remora.snapshotter.cli"]
    snap = RemoraSnapshotter(root, argv=[*command, *snapshotter_args]).start()
    channel = grpc.insecure_channel(f"unix://{snap.address}")
    stub = snapshots_pb2_grpc.SnapshotsStub(channel)
    try:
        parent = ""
        for layer, chain in zip(manifest.layers, chain_ids(config.diff_ids)):
            labels = layer_labels(layer, chain, dst, desc.digest, annotations_only=False)
            try:
                stub.Prepare(pb.PrepareSnapshotRequest(key=f"extract-{chain}", parent=parent, labels=labels),
                             metadata=NAMESPACE, timeout=60)
                raise AssertionError(f"layer {layer.digest} was not prepared remotely")
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
            parent = chain
        yield stub, parent, root
    finally:
        channel.close()
        snap.stop()
        from remora.snapshotter.mount import MountManager

        MountManager(root / "lazy", root / "cache").unmount_all()
        snap.close()
