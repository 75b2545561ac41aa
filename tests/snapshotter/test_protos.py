"""The generated stubs match protos/ and keep containerd's wire contract."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh():
    proc = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_containerd_names_and_field_numbers():
    from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
    from remora._proto.containerd.types import mount_pb2
    from remora._proto.cri.runtime.v1 import api_pb2

    svc = pb.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert sorted(m.name for m in svc.methods) == sorted(
        ["Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage", "Cleanup"])
    assert svc.methods_by_name["List"].server_streaming
    fields = {f.name: f.number for f in pb.CommitSnapshotRequest.DESCRIPTOR.fields}
    assert fields == {"snapshotter": 1, "name": 2, "key": 3, "labels": 4, "parent": 5}
    assert {f.name: f.number for f in pb.Info.DESCRIPTOR.fields} == {
        "name": 1, "parent": 2, "kind": 3, "created_at": 4, "updated_at": 5, "labels": 6}
    assert (pb.VIEW, pb.ACTIVE, pb.COMMITTED) == (1, 2, 3)
    assert mount_pb2.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"
    assert {f.name: f.number for f in mount_pb2.Mount.DESCRIPTOR.fields} == {
        "type": 1, "source": 2, "target": 3, "options": 4}
    cri = api_pb2.DESCRIPTOR.services_by_name["ImageService"]
    assert cri.full_name == "runtime.v1.ImageService"
    assert {f.name: f.number for f in api_pb2.PullImageRequest.DESCRIPTOR.fields} == {"image": 1, "auth": 2}
