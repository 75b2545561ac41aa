"""The generated stubs match protos/ and keep containerd's wire contract."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = [ROOT / "requirements.lock", ROOT / "requirements-dev.lock"]


def test_generated_stubs_are_fresh():
    """The committed stubs are byte for byte what the pinned grpcio-tools writes (generate.py refuses
    any other version, so a newer generator on the machine fails here with a clear message)."""
    proc = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *[r for extra in project["optional-dependencies"].values() for r in extra]]
    return {Requirement(r).name: Requirement(r) for r in reqs}


def _locked(lock: Path, name: str) -> set[str]:
    return set(re.findall(rf"^{re.escape(name)}==([^ ;\\]+)", lock.read_text(), re.M))


def test_generator_pin_and_declared_minimums_agree():
    """One grpcio-tools version everywhere, and pyproject's grpcio/protobuf minimums are ones the
    committed stubs really import with (they refuse a grpcio older than GRPC_GENERATED_VERSION and a
    protobuf runtime older than their gencode version)."""
    sys.path.insert(0, str(ROOT / "protos"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    reqs = _requirements()
    assert str(reqs["grpcio-tools"].specifier) == f"=={generate.GRPC_TOOLS_VERSION}"
    assert _locked(LOCKS[1], "grpcio-tools") == {generate.GRPC_TOOLS_VERSION}

    stubs = [p.read_text() for p in (ROOT / "remora" / "_proto").rglob("*.py")]
    grpc_gen = {m for s in stubs for m in re.findall(r"^GRPC_GENERATED_VERSION = '([^']+)'", s, re.M)}
    pb_gen = {m for s in stubs for m in re.findall(r"^# Protobuf Python Version: (\S+)", s, re.M)}
    assert grpc_gen == {generate.GRPC_TOOLS_VERSION} and len(pb_gen) == 1, (grpc_gen, pb_gen)
    for name, generated in (("grpcio", grpc_gen.pop()), ("protobuf", pb_gen.pop())):
        spec = reqs[name].specifier
        minimum = max(Version(s.version) for s in spec if s.operator == ">=")
        assert minimum >= Version(generated), f"pyproject says {name}{spec}, the stubs need >= {generated}"
        for lock in LOCKS:
            pins = _locked(lock, name)
            assert pins and all(spec.contains(v) for v in pins), (lock.name, name, pins)


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
