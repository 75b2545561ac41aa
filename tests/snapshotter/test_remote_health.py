"""A dead lazy filesystem is detected: restored when possible, otherwise UNAVAILABLE (never a hang).

Talks to ``remora snapshotter`` over its gRPC socket the way containerd's unpacker does (Prepare with
snapshot.ref and the layer annotations), so no containerd is needed to create the remote layers.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from remora.procutil import free_port

from remote_support import NAMESPACE, lowest_dir, remote_busybox


@pytest.fixture
def lazy_layers(registry, tmp_path):
    """A converted busybox image prepared remotely in a fresh snapshotter that serves /metrics."""
    port = free_port()
    with remote_busybox(registry, tmp_path, "health/bb", ["--metrics-address", f"127.0.0.1:{port}"]) as (stub, top, root):
        yield stub, NAMESPACE, top, root, port


def _fs_pid(root: Path) -> int:
    pids = list((root / "lazy" / "mounts").glob("*.pid"))
    assert len(pids) == 1, pids
    return int(pids[0].read_text().split()[0])  # "pid start-time"


def test_dead_fs_is_restored_then_unavailable_when_it_cannot_be(lazy_layers):
    stub, md, top, root, _ = lazy_layers
    resp = stub.Prepare(pb.PrepareSnapshotRequest(key="ctr-1", parent=top), metadata=md, timeout=30)
    assert resp.mounts, "an active snapshot on a lazy layer gets mounts"
    os.kill(_fs_pid(root), signal.SIGKILL)
    time.sleep(0.5)
    # the dead fs process is noticed and the layer re-mounted from its record
    stub.Mounts(pb.MountsRequest(key="ctr-1"), metadata=md, timeout=60)
    assert _fs_pid(root) > 0
    mountpoint = lowest_dir(resp.mounts[0])
    assert os.path.exists(os.path.join(mountpoint, "bin", "busybox"))
    # now make a restore impossible: the bootstrap it mounts from is gone
    for db in (root / "bootstraps").glob("*.db"):
        db.unlink()
    os.kill(_fs_pid(root), signal.SIGKILL)
    time.sleep(0.5)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Mounts(pb.MountsRequest(key="ctr-1"), metadata=md, timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "lazily mounted layer" in err.value.details()
    assert time.monotonic() - started < 30, "a dead layer is reported, not waited on"


def test_stats_and_prometheus_metrics(lazy_layers):
    import json
    import subprocess

    import requests

    stub, md, top, root, port = lazy_layers
    resp = stub.Prepare(pb.PrepareSnapshotRequest(key="ctr-1", parent=top), metadata=md, timeout=30)
    mountpoint = lowest_dir(resp.mounts[0])
    data = Path(mountpoint, "bin", "busybox").read_bytes()          # a lazy read: fetched from the registry
    assert len(data) > 100_000
    time.sleep(1.5)                                                 # the fs process publishes every second
    proc = subprocess.run(["remora", "stats", "--root", str(root), "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    [mount] = stats["mounts"]
    assert mount["state"] == "ok"
    assert mount["fetch"]["bytes_fetched"] > 0 and mount["fetch"]["requests"] >= 1
    assert stats["cache"]["chunks"] >= 1
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'remora_mount_up{mount="' in text
    fetched = [l for l in text.splitlines() if l.startswith("remora_fetch_bytes_total{")]
    assert fetched and float(fetched[0].split()[-1]) > 0
    assert "remora_fuse_op_seconds_bucket" in text
    assert "remora_early_prefetch_failures_total 0.0" in text  # the snapshotter's own counters too
    proc = subprocess.run(["remora", "stats", "--root", str(root)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "chunk cache" in proc.stdout
