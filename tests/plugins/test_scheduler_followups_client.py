"""A best-effort scheduler RPC (announcement, piece or result report) that misses its deadline does not
make the peer hold the scheduler down: downloads keep using it. Only a connectivity error does.

The scheduler runs as a process of its own so that SIGSTOP makes it really miss deadlines (the TCP
connection stays up, nothing answers)."""
from __future__ import annotations

import os
import signal
import sys
import time

import aiohttp
import pytest
from peer_util import push_blob, unique

from remora._proto import remora_scheduler_pb2 as pb
from remora.plugins.peer.config import MIN_PIECE_SIZE
from remora.plugins.scheduler.client import SchedulerClient, SchedulerUnavailable
from remora.procutil import Daemon, free_port

TASK = "sha256:" + "e5" * 32
BLOB_SIZE = 6 * MIN_PIECE_SIZE + 77


@pytest.fixture
def sched_proc(tmp_path):
    """(address, daemon) of a `remora scheduler` process on loopback; continued and stopped at the end."""
    port = free_port()
    proc = Daemon([sys.executable, "-m", "remora.cli", "scheduler", "--listen", f"127.0.0.1:{port}",
                   "--metrics-listen", "", "--insecure-plain-mesh"], tmp_path / "scheduler.log").start()
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in proc.log_tail(20):
            assert proc.alive(), proc.log_tail()
            assert time.monotonic() < deadline, "scheduler did not start: " + proc.log_tail()
            time.sleep(0.05)
        yield f"127.0.0.1:{port}", proc
    finally:
        if proc.alive():
            os.killpg(proc.pid, signal.SIGCONT)   # a stopped process would not act on SIGTERM
        proc.stop()


class Paused:
    """SIGSTOP the scheduler process for the ``with`` block (SIGCONT on the way out, whatever happens)."""

    def __init__(self, proc: Daemon):
        self.proc = proc

    def __enter__(self):
        os.killpg(self.proc.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        os.killpg(self.proc.pid, signal.SIGCONT)


def host(pid: str) -> pb.PeerHost:
    return pb.PeerHost(peer_id=pid, host_id=f"host-{pid}", ip="127.0.0.1", upload_port=4000)


async def test_client_best_effort_deadline_keeps_the_scheduler(sched_proc):
    address, proc = sched_proc
    async with SchedulerClient([address], host("p1"), timeout=0.5, down_for=30.0) as client:
        await client.register_task(pb.RegisterTaskRequest(peer_id="p1", task_id=TASK))
        with Paused(proc):
            with pytest.raises(SchedulerUnavailable) as err:
                await client.call(TASK, "AnnouncePieces", pb.AnnouncePiecesRequest(
                    peer_id="p1", task_id=TASK, finished=[0], seq=1), best_effort=True)
            assert "DEADLINE_EXCEEDED" in str(err.value)
            assert client.order(TASK) == [address]          # not held down
        # A download call right after goes to it (and is answered).
        r = await client.get_parents(pb.GetParentsRequest(peer_id="p1", task_id=TASK))
        assert r.back_to_source and r.reason == "seed"

        # A download call that misses its deadline still fails over (and holds the scheduler down).
        with Paused(proc):
            with pytest.raises(SchedulerUnavailable):
                await client.get_parents(pb.GetParentsRequest(peer_id="p1", task_id=TASK))
            assert client.order(TASK) == []


async def test_client_best_effort_connectivity_error_marks_down(sched_proc):
    address, proc = sched_proc
    async with SchedulerClient([address], host("p2"), timeout=0.5, down_for=30.0) as client:
        await client.register_task(pb.RegisterTaskRequest(peer_id="p2", task_id=TASK))
        proc.stop()                                      # gone: connection refused
        with pytest.raises(SchedulerUnavailable) as err:
            await client.call(TASK, "AnnouncePieces", pb.AnnouncePiecesRequest(peer_id="p2", task_id=TASK),
                              best_effort=True)
        assert "UNAVAILABLE" in str(err.value)
        assert client.order(TASK) == []                  # held down: downloads go to the registry at once


async def fetch(peer, registry, repo, digest) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{peer.mirror_url}/v2/{repo}/blobs/{digest}?ns={registry.host}") as r:
            return r.status, await r.read()


def sample(peer, name, **labels) -> float:
    return peer.metrics.registry.get_sample_value(name, labels or None) or 0.0


async def test_peer_download_after_a_missed_announcement_still_uses_the_mesh(sched_proc, peers, registry):
    """The real peer: its re-announcement (best effort) times out while the scheduler is stopped; the
    next pull, right after, still gets its parents from the scheduler and its bytes from the mesh."""
    address, proc = sched_proc
    repo = unique("followups/app")
    blobs = [os.urandom(BLOB_SIZE) for _ in range(2)]
    digests = [push_blob(registry.url, repo, b) for b in blobs]
    seed = await peers("seed", [address], scheduler_timeout=0.5)
    for d, b in zip(digests, blobs):
        assert await fetch(seed, registry, repo, d) == (200, b)
    child = await peers("child", [address], scheduler_timeout=0.5)
    assert await fetch(child, registry, repo, digests[0]) == (200, blobs[0])
    assert sample(child, "remora_peer_download_bytes_total", source="registry") == 0

    with Paused(proc):
        t0 = time.monotonic()
        assert not await child.tasks.reannounce_all()    # the announcement missed its deadline
        assert time.monotonic() - t0 >= 0.4
    assert await fetch(child, registry, repo, digests[1]) == (200, blobs[1])
    assert sample(child, "remora_peer_back_to_source_total", reason="scheduler_down") == 0
    assert sample(child, "remora_peer_download_bytes_total", source="registry") == 0
    assert sample(child, "remora_peer_download_bytes_total", source="peer") == 2 * BLOB_SIZE
