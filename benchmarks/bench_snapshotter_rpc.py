#!/usr/bin/env python3
"""Per-RPC latency of the remora snapshotter vs containerd's built-in overlayfs snapshotter.

Three targets, same RPC sequence (Prepare on a committed parent -> Mounts -> Commit), measured in
the same run on the same machine:

* ``overlayfs via containerd``: containerd 1.6's built-in snapshotter, called through containerd's
  own snapshots service (the baseline: what every ``ctr``/CRI call pays today);
* ``remora via containerd``: the same service with ``snapshotter = "remora"``: containerd's metadata
  layer plus the proxy hop to our Python server (what containerd actually pays with remora);
* ``remora direct``: our server's socket, no containerd (the cost of the server itself);
* ``python grpc no-op``: a grpc.aio server in its own process answering every RPC with an empty
  reply: the floor of any Python gRPC server on this machine, to tell our code's cost from grpcio's.

Run as root: ``python benchmarks/bench_snapshotter_rpc.py [-n 300]``. Prints p50/p95 in ms and the
remora/overlayfs ratios of the p50s.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from remora.procutil import Daemon, wait_until
from remora_testing.containerd import PrivateContainerd, RemoraSnapshotter

NS = "remora-bench"
# Without a lease or this label containerd's GC would collect snapshots between our calls.
ROOT = {"containerd.io/gc.root": "bench"}


NOOP_SERVER = """
import asyncio, sys
import grpc
from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb, snapshots_pb2_grpc as g
from google.protobuf import empty_pb2
class Noop(g.SnapshotsServicer):
    async def Prepare(self, r, c): return pb.PrepareSnapshotResponse()
    async def Mounts(self, r, c): return pb.MountsResponse()
    async def Commit(self, r, c): return empty_pb2.Empty()
    async def Stat(self, r, c): return pb.StatSnapshotResponse()
async def main():
    s = grpc.aio.server()
    g.add_SnapshotsServicer_to_server(Noop(), s)
    s.add_insecure_port("unix://" + sys.argv[1])
    await s.start()
    await s.wait_for_termination()
asyncio.run(main())
"""


def measure(address: Path, snapshotter: str, n: int, tag: str) -> dict[str, list[float]]:
    md = [("containerd-namespace", NS)]
    times: dict[str, list[float]] = {"Prepare": [], "Mounts": [], "Commit": [], "Stat": []}
    with grpc.insecure_channel(f"unix://{address}") as ch:
        stub = snapshots_pb2_grpc.SnapshotsStub(ch)
        base = f"{tag}-base"
        stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=f"{base}-k", labels=ROOT),
                     metadata=md, timeout=30)
        stub.Commit(pb.CommitSnapshotRequest(snapshotter=snapshotter, name=base, key=f"{base}-k", labels=ROOT),
                    metadata=md, timeout=30)
        for i in range(n + 10):  # the first 10 are warm-up
            key, name = f"{tag}-k{i}", f"{tag}-c{i}"
            calls = [("Prepare", stub.Prepare, pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=base,
                                                                labels=ROOT)),
                     ("Mounts", stub.Mounts, pb.MountsRequest(snapshotter=snapshotter, key=key)),
                     ("Commit", stub.Commit,
                      pb.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=ROOT)),
                     ("Stat", stub.Stat, pb.StatSnapshotRequest(snapshotter=snapshotter, key=name))]
            for rpc, fn, req in calls:
                t0 = time.perf_counter()
                fn(req, metadata=md, timeout=30)
                if i >= 10:
                    times[rpc].append((time.perf_counter() - t0) * 1000)
    return times


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=300, help="measured iterations per target (default: %(default)s)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="remora-bench-") as tmp:
        tmp = Path(tmp)
        with RemoraSnapshotter(tmp / "snap", log_level="warning") as snap, \
                PrivateContainerd(tmp / "ctd", snap.address, namespace=NS) as ctd:
            noop_sock = snap.address.parent / "noop.sock"
            noop = Daemon([sys.executable, "-c", NOOP_SERVER, str(noop_sock)], tmp / "noop.log").start()
            try:
                wait_until(noop_sock.exists, 30, what="no-op server")
                results = {
                    "overlayfs via containerd": measure(ctd.address, "overlayfs", args.n, "ovl"),
                    "remora via containerd": measure(ctd.address, "remora", args.n, "rem"),
                    "remora direct": measure(snap.address, "", args.n, "dir"),
                    "python grpc no-op": measure(noop_sock, "", args.n, "noop"),
                }
            finally:
                noop.stop()
    rpcs = ["Prepare", "Mounts", "Commit", "Stat"]
    print(f"per-RPC latency, ms (n={args.n}; p50 / p95)")
    print(f"{'target':28}" + "".join(f"{r:>18}" for r in rpcs))
    for target, t in results.items():
        print(f"{target:28}" + "".join(f"{pct(t[r], 50):>8.2f} / {pct(t[r], 95):<7.2f}" for r in rpcs))
    base = results["overlayfs via containerd"]
    print("\np50 ratio vs overlayfs via containerd")
    for target in ("remora via containerd", "remora direct", "python grpc no-op"):
        print(f"{target:28}" + "".join(f"{pct(results[target][r], 50) / pct(base[r], 50):>17.2f}x" for r in rpcs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
