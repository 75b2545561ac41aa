"""The snapshotter's lazy range reads pointed at the node's `remora peer` (issue: P2P integration)."""
from __future__ import annotations

import sys
from pathlib import Path

import requests
from remote_support import NAMESPACE, lowest_dir, remote_busybox

from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from remora.procutil import Daemon, free_port, port_open, wait_until


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.split()[-1])
    return total


def test_lazy_reads_go_through_the_local_peer(registry, tmp_path):
    port = free_port()
    peer = Daemon([sys.executable, "-m", "remora.cli", "peer", "--listen", f"127.0.0.1:{port}",
                   "--upload-listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "peer"),
                   "--gc-high", "64G", "--gc-low", "48G",
                   # no scheduler, no mesh: a node-local pull-through mirror of the test registry only
                   "--insecure-plain-mesh", "--registry", registry.host],
                  tmp_path / "peer.log").start()
    try:
        wait_until(lambda: port_open("127.0.0.1", port) or not peer.alive(), 30, what="remora peer")
        assert peer.alive(), peer.log_tail()
        mirror = ["--mirror", f"http://127.0.0.1:{port}"]
        with remote_busybox(registry, tmp_path, "viapeer/bb", mirror) as (stub, top, root):
            resp = stub.Prepare(pb.PrepareSnapshotRequest(key="ctr", parent=top), metadata=NAMESPACE, timeout=30)
            data = Path(lowest_dir(resp.mounts[0]), "bin", "busybox").read_bytes()
            assert data == Path("/bin/busybox").read_bytes()
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        served = _metric(metrics, "remora_peer_served_bytes_total", kind="range")
        assert served > 0, "the lazy reads were not served by the peer"
    finally:
        peer.stop()
