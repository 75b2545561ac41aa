"""A dead lazy filesystem is detected: restored when possible, otherwise UNAVAILABLE (never a hang).

Talks to ``remora snapshotter`` over its gRPC socket the way containerd's unpacker does (Prepare with
snapshot.ref and the layer annotations), so no containerd is needed to create the remote layers.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from remote_support import NAMESPACE, lowest_dir, remote_busybox

from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from remora.procutil import free_port, wait_until


@pytest.fixture
def lazy_layers(registry, tmp_path):
    """A converted busybox image prepared remotely in a fresh snapshotter that serves /metrics."""
    port = free_port()
    metrics = ["--metrics-address", f"127.0.0.1:{port}"]
    with remote_busybox(registry, tmp_path, "health/bb", metrics) as (stub, top, root):
        yield stub, NAMESPACE, top, root, port


def _mount_files(root: Path, suffix: str) -> list[Path]:
    return [p for p in (root / "lazy" / "mounts").glob(f"*{suffix}") if not p.name.startswith("spare-")]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _fs_pid(root: Path) -> int:
    """The pid recorded for the one lazy mount, checked: the process is alive, is an fs process, and
    is the one serving that mount (its own stats file, written after this call, names its pid)."""
    [pid_file] = _mount_files(root, ".pid")
    stats_file = pid_file.with_name(pid_file.name[:-4] + ".stats.json")
    pid = int(pid_file.read_text().split()[0])  # "pid start-time"
    assert _alive(pid), f"recorded fs process {pid} is not running"
    assert b"remora.snapshotter.fs" in Path(f"/proc/{pid}/cmdline").read_bytes()
    since = time.time()

    def fresh() -> dict:
        try:
            data = json.loads(stats_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if data.get("time", 0) > since else {}

    wait_until(lambda: fresh(), 10, what="the fs process to publish its stats")
    stats = fresh() or json.loads(stats_file.read_text())
    assert stats["pid"] == pid and stats["id"] == pid_file.name[:-4], (stats.get("pid"), pid)
    return pid


def _kill_fs(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _alive(pid), 10, what=f"fs process {pid} to die")


def test_dead_fs_is_restored_then_unavailable_when_it_cannot_be(lazy_layers):
    stub, md, top, root, _ = lazy_layers
    resp = stub.Prepare(pb.PrepareSnapshotRequest(key="ctr-1", parent=top), metadata=md, timeout=30)
    assert resp.mounts, "an active snapshot on a lazy layer gets mounts"
    first = _fs_pid(root)
    _kill_fs(first)
    # the dead fs process is noticed and the layer re-mounted from its record
    stub.Mounts(pb.MountsRequest(key="ctr-1"), metadata=md, timeout=60)
    second = _fs_pid(root)
    assert second != first, "the layer is served by a new fs process"
    mountpoint = lowest_dir(resp.mounts[0])
    assert os.path.exists(os.path.join(mountpoint, "bin", "busybox"))
    # now make a restore impossible: the bootstrap it mounts from is gone
    for db in (root / "bootstraps").glob("*.db"):
        db.unlink()
    _kill_fs(second)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Mounts(pb.MountsRequest(key="ctr-1"), metadata=md, timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "lazily mounted layer" in err.value.details()
    assert time.monotonic() - started < 30, "a dead layer is reported, not waited on"


def test_stats_and_prometheus_metrics(lazy_layers):
    import subprocess

    import requests

    stub, md, top, root, port = lazy_layers
    resp = stub.Prepare(pb.PrepareSnapshotRequest(key="ctr-1", parent=top), metadata=md, timeout=30)
    mountpoint = lowest_dir(resp.mounts[0])
    data = Path(mountpoint, "bin", "busybox").read_bytes()          # a lazy read: fetched from the registry
    assert len(data) > 100_000
    [pid_file] = _mount_files(root, ".pid")
    stats_file = pid_file.with_name(pid_file.name[:-4] + ".stats.json")  # published every second

    def published_fetch() -> bool:
        try:
            return json.loads(stats_file.read_text())["fetch"]["bytes_fetched"] > 0
        except (OSError, ValueError, KeyError):
            return False

    wait_until(published_fetch, 10, what="the fs process to publish the fetch")
    proc = subprocess.run(["remora", "stats", "--root", str(root), "--json"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    [mount] = stats["mounts"]
    assert mount["state"] == "ok"
    assert mount["fetch"]["bytes_fetched"] > 0 and mount["fetch"]["requests"] >= 1
    assert stats["cache"]["chunks"] >= 1
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'remora_mount_up{mount="' in text
    fetched = [line for line in text.splitlines() if line.startswith("remora_fetch_bytes_total{")]
    assert fetched and float(fetched[0].split()[-1]) > 0
    assert "remora_fuse_op_seconds_bucket" in text
    assert "remora_early_prefetch_failures_total 0.0" in text  # the snapshotter's own counters too
    proc = subprocess.run(["remora", "stats", "--root", str(root)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "chunk cache" in proc.stdout
