"""Cache isolation (``remora snapshotter --cache-isolation``): knowing a chunk's digest is not enough
to read another tenant's chunk from the node's cache.

The end-to-end tests run the real ``remora snapshotter`` process, its FUSE fs processes and a real
registry; the layers are prepared over gRPC as containerd 1.6 asks a proxy snapshotter: backend keys
``<namespace>/<seq>/<key>`` and no ``containerd-namespace`` header (the namespace comes from the key;
tests/snapshotter/test_lazy_versions.py covers the path through a real containerd). Tenant A (namespace
``a``) mounts an image and reads it; tenant B (namespace ``b``) mounts a *crafted* image whose chunk
table names A's chunk digests while no source B can use holds them:

* B1: its own bootstrap, pushed to B's repository, which does not hold A's data blobs (404);
* B2: A's very bootstrap digest, under a registry host where nothing listens (every source offline).

With ``namespace`` isolation (the default) every read of B fails with EIO and B's cache partition
stays empty; with ``none`` B reads A's bytes from the shared cache (so the test can fail). A second
crafted image in A's own namespace still reads A's chunks from the cache: sharing inside a tenant
keeps working.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import os
import sqlite3
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from lazy_support import build_image, dead_port_url

from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from remora.cache import ChunkCache, fair_quotas
from remora.errors import InvalidInput
from remora.format import annotations as ann
from remora.format.bootstrap import write_bootstrap
from remora.format.bootstrap_layer import encode_bootstrap_layer
from remora.procutil import wait_until
from remora.registry.client import RegistryClient
from remora.snapshotter.mount import MountManager
from remora.snapshotter.remote import TARGET_REF_LABEL
from remora_testing.containerd import RemoraSnapshotter

pytestmark = pytest.mark.timeout(300)


def chunk(i: int, size: int = 1000) -> tuple[bytes, bytes]:
    data = hashlib.sha256(b"%d" % i).digest() * (size // 32) + bytes(size % 32)
    return hashlib.sha256(data).digest(), data


# -- the cache itself -------------------------------------------------------------------------------
def test_a_chunk_in_one_partition_is_never_read_from_another(tmp_path):
    a = ChunkCache(tmp_path, 1 << 20, partition="ns-a")
    b = ChunkCache(tmp_path, 1 << 20, partition="ns-b")
    shared = ChunkCache(tmp_path, 1 << 20)
    d, data = chunk(1)
    a.put(d, data)
    assert a.get(d) == data
    assert b.get(d) is None and not b.contains(d), "B must not see A's chunk"
    assert shared.get(d) is None, "nor the shared partition"
    assert a.path(d) == tmp_path / "parts" / "ns-a" / "sha256" / d.hex()[:2] / d.hex()
    assert not (tmp_path / "parts" / "ns-b" / "sha256" / d.hex()[:2]).exists()
    b.put(d, data)  # B fetched it from its own source: now both have a copy, accounted twice
    info = a.info()
    assert info["bytes"] == 2 * len(data)
    assert info["partitions"]["ns-a"] == {"bytes": len(data), "chunks": 1, "pinned_chunks": 0}
    assert info["partitions"]["ns-b"]["bytes"] == len(data)
    with pytest.raises(InvalidInput):
        ChunkCache(tmp_path, 1 << 20, partition="../ns-a")


def test_pins_hold_only_in_their_partition(tmp_path):
    a = ChunkCache(tmp_path, 4000, partition="ns-a")
    b = ChunkCache(tmp_path, 4000, partition="ns-b")
    d, data = chunk(1)
    a.pin("mount-a", [d])
    a.put(d, data)
    b.put(d, data)
    for d2, data2 in (chunk(i) for i in range(10, 16)):
        b.put(d2, data2)
    assert a.contains(d), "A's pinned chunk stays"
    assert not b.contains(d), "A's pin does not protect B's copy of the same digest"
    a.unpin("mount-a")
    assert a.owners() == []


def test_eviction_is_fair_between_partitions(tmp_path):
    """A tenant that streams lots of data loses its own chunks, not a small tenant's."""
    small = ChunkCache(tmp_path, 20_000, partition="ns-small")
    big = ChunkCache(tmp_path, 20_000, partition="ns-big")
    mine = [chunk(i) for i in range(5)]           # 5 KB: well under a fair half of 20 KB
    for d, data in mine:
        small.put(d, data)
    for d, data in (chunk(i) for i in range(100, 160)):   # 60 KB of churn
        big.put(d, data)
    assert all(small.contains(d) for d, _ in mine), "the small tenant's chunks must survive the big one's churn"
    info = small.info()
    assert info["bytes"] <= 20_000
    assert info["partitions"]["ns-big"]["bytes"] <= 20_000 - 5_000
    assert big.evicted_chunks > 0 and small.evicted_chunks == 0


def test_fair_quotas_water_filling():
    assert fair_quotas({"a": 100, "b": 5000, "c": 5000}, 3000) == {"a": 100, "b": 1450, "c": 1450}
    assert fair_quotas({"a": 10, "b": 20}, 1000) == {"a": 10, "b": 20}
    assert sum(fair_quotas({"a": 7, "b": 9, "c": 11}, 10).values()) <= 10


def test_a_version1_index_is_migrated_into_the_shared_partition(tmp_path):
    """A cache written before partitions keeps its chunks, sizes and pins (partition "")."""
    d, data = chunk(3)
    (tmp_path / "sha256" / d.hex()[:2]).mkdir(parents=True)
    (tmp_path / "sha256" / d.hex()[:2] / d.hex()).write_bytes(data)
    db = sqlite3.connect(tmp_path / "index.db")
    db.executescript("""
        CREATE TABLE chunks (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, atime REAL NOT NULL);
        CREATE TABLE pins (owner TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (owner, digest)) WITHOUT ROWID;
        CREATE TABLE usage (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);""")
    db.execute("INSERT INTO chunks VALUES (?, ?, 1.0)", (d.hex(), len(data)))
    db.execute("INSERT INTO pins VALUES ('old-mount', ?)", (d.hex(),))
    db.execute("INSERT INTO usage VALUES (0, ?)", (len(data),))
    db.commit()
    db.close()
    cache = ChunkCache(tmp_path, 1 << 20)
    assert cache.get(d) == data
    assert cache.info()["partitions"][""] == {"bytes": len(data), "chunks": 1, "pinned_chunks": 1}
    assert cache.owners() == ["old-mount"]
    assert ChunkCache(tmp_path, 1 << 20, partition="ns-x").get(d) is None


def test_drop_partition_removes_a_throwaway_partition(tmp_path):
    p = ChunkCache(tmp_path, 1 << 20, partition="snap-42")
    d, data = chunk(4)
    p.put(d, data)
    p.pin("42", [d])
    with pytest.raises(InvalidInput):
        p.drop_partition("snap-42")
    p.unpin("42")
    assert p.drop_partition("snap-42") == len(data)
    assert not (tmp_path / "parts" / "snap-42").exists()
    assert p.info()["bytes"] == 0


def test_namespace_of_a_containerd_backend_key():
    from remora.snapshotter.snapshotter import namespace_of_key

    assert namespace_of_key("k8s.io/42/extract-1 sha256:ab") == "k8s.io"
    assert namespace_of_key("default/7/c1") == "default"
    assert namespace_of_key("extract-1") is None and namespace_of_key("a/b/c") is None
    assert namespace_of_key("/1/x") is None


def test_partition_for_each_mode(tmp_path):
    class Cred:
        username, identity_token = "alice", ""

    mm = {m: MountManager(tmp_path / m, tmp_path / "cache", read_only=True, cache_isolation=m)
          for m in ("none", "namespace", "credential")}
    assert mm["none"].partition_for("7", "k8s.io") == ""
    assert mm["namespace"].partition_for("7", "k8s.io") == "ns-k8s.io"
    assert mm["namespace"].partition_for("7", None) == "snap-7", "unknown tenant: a partition of its own"
    alice = mm["credential"].partition_for("7", "a", Cred(), "reg:5000")
    assert alice.startswith("cred-") and alice == mm["credential"].partition_for("8", "b", Cred(), "reg:5000")
    assert alice != mm["credential"].partition_for("7", "a", None, "reg:5000")
    import argparse

    from remora.snapshotter.cli import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    assert sub.choices["snapshotter"].parse_args([]).cache_isolation == "namespace", "secure by default"
    with pytest.raises(InvalidInput):
        MountManager(tmp_path / "e", tmp_path / "cache", read_only=True, cache_isolation="tenant")


def test_a_staged_hot_blob_is_offered_only_to_its_own_repository(tmp_path):
    """Early prefetch: bytes staged for image A's repository never become a source of B's mount."""
    from remora.snapshotter.staging import StagingArea

    class Source:
        name = "test"

        def read_range(self, blob, start, end, sink=None):
            sink(data[start:end + 1])
            return end + 1 - start

    data = os.urandom(5000)
    blob = "sha256:" + hashlib.sha256(data).hexdigest()
    area = StagingArea(tmp_path / "staging")
    assert area.start(blob, len(data), [Source()], scope="reg:5000/tenant-a/app")
    area.wait(blob, 30, scope="reg:5000/tenant-a/app")
    assert area.staged([blob], scope="reg:5000/tenant-a/app") == {blob: len(data)}
    assert area.staged([blob], scope="reg:5000/tenant-b/crafted") == {}, "B's image must fetch it itself"
    assert area.staged([blob]) == {}
    a_dir, b_dir = area.dir_for("reg:5000/tenant-a/app"), area.dir_for("reg:5000/tenant-b/crafted")
    assert a_dir != b_dir and (a_dir / f"sha256-{blob[7:]}").read_bytes() == data
    assert not b_dir.exists()


# -- end to end: the real snapshotter, its fs processes, a real registry ----------------------------
def _push_bootstrap(host: str, repo: str, db: Path, workdir: Path) -> tuple[str, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    layer, digest, size, _ = encode_bootstrap_layer(db, workdir)
    with RegistryClient(host) as c:
        c.push_blob(repo, digest, size, layer)
    return digest, size


_SEQ = itertools.count(1)


def _prepare_code(stub, namespace: str, location: str, boot: tuple[str, int], target: str = ""):
    """Prepare a bootstrap layer as containerd's unpacker does; the gRPC status code and details."""
    labels = {TARGET_REF_LABEL: target or f"sha256:{uuid.uuid4().hex * 2}",
              **ann.layer_annotations("bootstrap", boot[0], boot[1], repository=location)}
    # the key as containerd's metadata layer names it (<namespace>/<seq>/<key>) and, like containerd 1.6,
    # no containerd-namespace header: the snapshotter takes the namespace from the key
    key = f"{namespace}/{next(_SEQ)}/extract-{uuid.uuid4().hex[:8]} {target}"
    with pytest.raises(grpc.RpcError) as err:
        stub.Prepare(pb.PrepareSnapshotRequest(key=key, labels=labels), timeout=60)
    return err.value.code(), err.value.details()


def _prepare(stub, namespace: str, location: str, boot: tuple[str, int]) -> str:
    target = f"sha256:{uuid.uuid4().hex * 2}"
    code, details = _prepare_code(stub, namespace, location, boot, target)
    assert code == grpc.StatusCode.ALREADY_EXISTS, f"not mounted remotely: {details}"
    return target


def _new_mount(root: Path, known: set[str]):
    mm = MountManager(root / "lazy", root / "cache", read_only=True)
    new = [m for m in mm.ids() if m not in known]
    assert len(new) == 1, new
    known.add(new[0])
    return mm.spec(new[0])


def _read(mountpoint: str, path: bytes) -> bytes | int:
    """The file's bytes, or the errno its read failed with."""
    try:
        with open(os.fsencode(mountpoint) + path, "rb") as f:
            return f.read()
    except OSError as exc:
        return exc.errno


@pytest.mark.parametrize("mode", ["default", "namespace", "none"])
def test_crafted_image_reads_nothing_of_another_namespace(registry, tmp_path, mode):
    image = build_image(tmp_path / "a", registry.host)
    files = {p: data for p, data in image.contents.items() if data}
    assert len(files) > 60
    boot_a = _push_bootstrap(registry.host, image.repo, image.bootstrap, tmp_path / "la")
    # B1: a bootstrap of B's own whose chunk table names A's chunks (and A's blobs: not in B's repo)
    crafted = tmp_path / "crafted.db"
    write_bootstrap(crafted, image.tree, image.table, [], {"created_by": "tenant b"})
    repo_b = f"tenant-b/img-{uuid.uuid4().hex[:8]}"
    boot_b = _push_bootstrap(registry.host, repo_b, crafted, tmp_path / "lb")
    assert boot_b[0] != boot_a[0]
    # C: the same kind of crafted image, in A's own namespace
    crafted_c = tmp_path / "crafted-c.db"
    write_bootstrap(crafted_c, image.tree, image.table, [], {"created_by": "tenant a, another image"})
    repo_c = f"tenant-a/other-{uuid.uuid4().hex[:8]}"
    boot_c = _push_bootstrap(registry.host, repo_c, crafted_c, tmp_path / "lc")
    dead = dead_port_url().removeprefix("http://")

    flags = [] if mode == "default" else ["--cache-isolation", mode]
    root = tmp_path / "root"
    snap = RemoraSnapshotter(root, argv=[sys.executable, "-m", "remora.snapshotter.cli", *flags]).start()
    channel = grpc.insecure_channel(f"unix://{snap.address}")
    stub = snapshots_pb2_grpc.SnapshotsStub(channel)
    known: set[str] = set()
    isolated = mode != "none"
    try:
        # tenant A reads its image; every chunk lands in A's partition
        target_a = _prepare(stub, "a", f"{registry.host}/{image.repo}", boot_a)
        spec_a = _new_mount(root, known)
        assert spec_a.cache_partition == ("ns-a" if isolated else "")
        for path, data in files.items():
            assert _read(spec_a.mountpoint, path) == data
        cache_a = ChunkCache(root / "cache", partition=spec_a.cache_partition)
        digests = set(image.table.by_digest)
        wait_until(lambda: all(cache_a.contains(d) for d in digests), 30, what="A's chunks in its cache partition")

        # tenant B: crafted images naming A's chunks, no source of B's holds them
        for where, boot in ((f"{registry.host}/{repo_b}", boot_b), (f"{dead}/tenant-b/offline", boot_a)):
            _prepare(stub, "b", where, boot)
            spec_b = _new_mount(root, known)
            got = {path: _read(spec_b.mountpoint, path) for path in files}
            if isolated:
                assert spec_b.cache_partition == "ns-b"
                leaked = [p for p, v in got.items() if v != errno.EIO]
                assert not leaked, f"{where}: B read {len(leaked)} of A's files, e.g. {leaked[:3]}"
                cache_b = ChunkCache(root / "cache", partition="ns-b")
                assert not any(cache_b.contains(d) for d in digests), "nothing of A's may land in B's partition"
            else:
                assert got == files, f"{where}: with a shared cache B reads A's chunks (what isolation prevents)"

        # B4: B names A's layer by its chain ID (containerd then links A's snapshot, A's mount, into B's
        # namespace): refused unless B's registry would give B the whole image
        code, details = _prepare_code(stub, "b", f"{registry.host}/{repo_b}", boot_a, target=target_a)
        if isolated:
            assert code == grpc.StatusCode.FAILED_PRECONDITION, details
            assert "mounted for another tenant" in details and "does not hold" in details
        else:
            assert code == grpc.StatusCode.ALREADY_EXISTS, "shared cache: the layer is shared by chain ID alone"
        code, details = _prepare_code(stub, "b", f"{dead}/tenant-b/offline", boot_a, target=target_a)
        assert code == (grpc.StatusCode.FAILED_PRECONDITION if isolated else grpc.StatusCode.ALREADY_EXISTS), details
        # ... and shared with a tenant whose registry serves it every blob of the image (same repository)
        code, details = _prepare_code(stub, "b", f"{registry.host}/{image.repo}", boot_a, target=target_a)
        assert code == grpc.StatusCode.ALREADY_EXISTS, details
        assert len(MountManager(root / "lazy", root / "cache", read_only=True).ids()) == len(known)

        # B3: A's bootstrap digest under B's live repository, which does not hold it: refused outright
        # (the bootstrap on this node was fetched for A; B's registry would not give it to B)
        labels = {TARGET_REF_LABEL: f"sha256:{uuid.uuid4().hex * 2}",
                  **ann.layer_annotations("bootstrap", *boot_a, repository=f"{registry.host}/{repo_b}")}
        with pytest.raises(grpc.RpcError) as err:
            stub.Prepare(pb.PrepareSnapshotRequest(key=f"extract-{uuid.uuid4().hex}", labels=labels),
                         metadata=(("containerd-namespace", "b"),), timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "does not hold bootstrap" in err.value.details()
        assert len(MountManager(root / "lazy", root / "cache", read_only=True).ids()) == len(known)

        # same namespace, another image naming the same chunks: served from A's partition, no fetch
        _prepare(stub, "a", f"{registry.host}/{repo_c}", boot_c)
        spec_c = _new_mount(root, known)
        assert spec_c.cache_partition == spec_a.cache_partition
        for path, data in files.items():
            assert _read(spec_c.mountpoint, path) == data
        stats = MountManager(root / "lazy", root / "cache", read_only=True)
        wait_until(lambda: stats.stats(spec_c.id).get("fetch", {}).get("bytes_fetched") == 0
                   and stats.stats(spec_c.id).get("cache", {}).get("cache_hits", 0) > 0, 10,
                   what="C's published counters")
        info = cache_a.info()
        if isolated:
            b = info["partitions"].get("ns-b", {})
            assert (b.get("bytes", 0), b.get("chunks", 0)) == (0, 0), f"B's partition holds nothing: {b}"
            assert info["partitions"]["ns-a"]["chunks"] >= len(digests)
    finally:
        channel.close()
        snap.stop()
        MountManager(root / "lazy", root / "cache").unmount_all()
        snap.close()
