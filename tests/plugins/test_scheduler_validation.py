"""Hostile scheduler requests: every field checked (INVALID_ARGUMENT), state bounded (RESOURCE_EXHAUSTED),
and a real ``remora scheduler`` process under an address-space limit keeps a small RSS through an attack
that used to take it to MemoryError (one announcement) or 8.6 GB (2,000 of them)."""
from __future__ import annotations

import asyncio
import sys
import time

import grpc
import pytest

from remora._proto import remora_scheduler_pb2 as pb
from remora._proto import remora_scheduler_pb2_grpc as pb_grpc
from remora.plugins.peer.config import MAX_PIECE_SIZE, MIN_PIECE_SIZE, piece_size_for
from remora.plugins.scheduler import state as state_mod
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerServer
from remora.procutil import Daemon, free_port, port_open, wait_until

TASK = "sha256:" + "7a" * 32
TIB = 1 << 40
GOOD_DIGEST = "sha256:" + "0" * 64


@pytest.fixture
async def stub():
    server = await SchedulerServer(SchedulerConfig(random_seed=1), "127.0.0.1:0", insecure_plain=True).start()
    channel = grpc.aio.insecure_channel(server.address)
    s = pb_grpc.SchedulerStub(channel)
    await s.RegisterPeer(pb.RegisterPeerRequest(host=pb.PeerHost(peer_id="p", host_id="h", ip="127.0.0.1",
                                                                 upload_port=1)))
    try:
        yield s
    finally:
        await channel.close()
        await server.stop(0)


def announce(**kw):
    kw.setdefault("peer_id", "p")
    kw.setdefault("task_id", TASK)
    return ("AnnouncePieces", pb.AnnouncePiecesRequest(**kw))


BAD = {
    "content_length 2^40, piece size 1": (announce(content_length=TIB, piece_size=1, done=True), "piece_size"),
    "piece size not a power of two": (announce(content_length=10 << 20, piece_size=300_000), "piece_size"),
    "piece size above the range": (announce(content_length=TIB, piece_size=2 * MAX_PIECE_SIZE), "piece_size"),
    "piece size the blob size does not imply": (announce(content_length=5 << 20, piece_size=MAX_PIECE_SIZE),
                                                "does not match the blob size"),
    "content length over 1 TiB": (announce(content_length=TIB + 1), "content_length"),
    "piece index beyond the layout": (announce(content_length=3 * MIN_PIECE_SIZE, finished=[3]), "finished"),
    "in-flight index beyond any layout": (announce(in_flight=[1 << 20]), "in_flight"),
    "digests without a layout": (announce(piece_digests=[GOOD_DIGEST]), "piece_digests"),
    "digest count not the piece count": (announce(content_length=3 * MIN_PIECE_SIZE, piece_digests=[GOOD_DIGEST]),
                                         "piece_digests"),
    "malformed digest": (announce(content_length=MIN_PIECE_SIZE, piece_digests=["sha256:" + "G" * 64]),
                         "piece_digests[0]"),
    "task id not a sha256 digest": (announce(task_id="md5:abc"), "task_id"),
    "task id with uppercase hex": (announce(task_id="sha256:" + "AB" * 32), "task_id"),
    "peer id too long": (announce(peer_id="x" * 300), "peer_id"),
    "peer id with a space": (announce(peer_id="a b"), "peer_id"),
    "register task with an absurd layout": (("RegisterTask", pb.RegisterTaskRequest(
        peer_id="p", task_id=TASK, content_length=TIB, piece_size=1)), "piece_size"),
    "too many excluded peers": (("GetParents", pb.GetParentsRequest(
        peer_id="p", task_id=TASK, exclude=[f"x{i}" for i in range(2000)])), "exclude"),
    "absurd parent limit": (("GetParents", pb.GetParentsRequest(peer_id="p", task_id=TASK, limit=1 << 30)),
                            "limit"),
    "too many piece results": (("ReportPieceResults", pb.ReportPieceResultsRequest(
        peer_id="p", task_id=TASK, results=[pb.PieceResult(parent_id="q", piece=0)] * 5000)), "results"),
    "piece result index out of range": (("ReportPieceResults", pb.ReportPieceResultsRequest(
        peer_id="p", task_id=TASK, results=[pb.PieceResult(parent_id="q", piece=1 << 31)])), "results"),
    "host ip not an address": (("RegisterPeer", pb.RegisterPeerRequest(host=pb.PeerHost(
        peer_id="q", host_id="h", ip="999.1.1.1"))), "host.ip"),
    "host with a thousand labels": (("RegisterPeer", pb.RegisterPeerRequest(host=pb.PeerHost(
        peer_id="q", host_id="h", labels={f"k{i}": "v" for i in range(1000)}))), "host.labels"),
    "task error text of a megabyte": (("ReportTaskResult", pb.ReportTaskResultRequest(
        peer_id="p", task_id=TASK, error="e" * (1 << 20))), "error"),
    "too many probe results": (("SyncProbes", pb.SyncProbesRequest(
        peer_id="p", results=[pb.ProbeResult(peer_id="q")] * 2000)), "results"),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_each_bad_field_is_invalid_argument_and_leaves_no_state(stub, case):
    (method, request), field_name = BAD[case]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, method)(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field_name in info.value.details()
    # the task stays usable: an honest peer registers it and is elected seed as usual
    r = await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="p", task_id=TASK))
    assert r.back_to_source and r.reason == "seed"
    await stub.AnnouncePieces(pb.AnnouncePiecesRequest(
        peer_id="p", task_id=TASK, content_length=3 << 20, piece_size=piece_size_for(3 << 20), finished=[0, 1],
        piece_digests=[GOOD_DIGEST] * 12))
    stat = await stub.StatTask(pb.StatTaskRequest(task_id=TASK))
    assert stat.content_length == 3 << 20 and stat.piece_size == MIN_PIECE_SIZE


async def test_state_bounds_answer_resource_exhausted(stub, monkeypatch):
    monkeypatch.setattr(state_mod, "MAX_TASKS_PER_PEER", 3)
    for i in range(3):
        await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="p", task_id=f"sha256:{i:064x}"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="p", task_id=f"sha256:{9:064x}"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tasks" in info.value.details()
    monkeypatch.setattr(state_mod, "MAX_MARKS_PER_PEER", 100)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="p", task_id=f"sha256:{0:064x}",
                                                           content_length=TIB, finished=range(200)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # ... and nothing of the refused announcement was kept
    assert (await stub.StatTask(pb.StatTaskRequest(task_id=f"sha256:{0:064x}"))).content_length == 0


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def test_absurd_announcements_leave_the_scheduler_process_small_and_the_task_usable(tmp_path):
    """The issue's attack against a real scheduler process capped at 1.5 GiB of address space: one
    announcement of a 2^40-byte blob in 1-byte pieces, then 2,000 announcements of 1 TiB blobs, "done",
    plus seeds publishing ~30,000 digests per task. Every one is refused or kept within bounds; the
    process stays small, and the attacked digest still works for an honest peer afterwards."""
    port = free_port()
    d = Daemon([sys.executable, "-m", "remora.cli", "scheduler", "--insecure-plain-mesh",
                "--listen", f"127.0.0.1:{port}",
                "--metrics-listen", f"127.0.0.1:{free_port()}"], tmp_path / "scheduler.log",
               preexec_argv=["prlimit", f"--as={3 << 29}", "--"]).start()
    figures = {}
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 20, what="scheduler port")
        figures["rss_start_mib"] = _rss_kib(d.pid) / 1024

        async def attack():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                s = pb_grpc.SchedulerStub(ch)
                for i in range(4):
                    await s.RegisterPeer(pb.RegisterPeerRequest(host=pb.PeerHost(
                        peer_id=f"attacker{i}", host_id=f"evil{i}", ip="127.0.0.1", upload_port=1)))
                t0 = time.perf_counter()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await s.AnnouncePieces(pb.AnnouncePiecesRequest(
                        peer_id="attacker0", task_id=TASK, content_length=TIB, piece_size=1, done=True,
                        finished=[0]))
                figures["reject_ms"] = (time.perf_counter() - t0) * 1000
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
                codes: dict[str, int] = {}
                for n in range(2000):
                    try:
                        await s.AnnouncePieces(pb.AnnouncePiecesRequest(
                            peer_id=f"attacker{n % 4}", task_id=f"sha256:{n + 1:064x}", content_length=TIB,
                            piece_size=MAX_PIECE_SIZE, done=True, finished=range(0, 65536, 16)))
                        codes["OK"] = codes.get("OK", 0) + 1
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                # seeds (elected: they asked first) publishing every digest of a 1/2 TiB blob
                for n in range(40):
                    task = f"sha256:{n + 5000:064x}"
                    try:
                        await s.RegisterTask(pb.RegisterTaskRequest(peer_id=f"attacker{n % 4}", task_id=task))
                        await s.AnnouncePieces(pb.AnnouncePiecesRequest(
                            peer_id=f"attacker{n % 4}", task_id=task, content_length=TIB // 2,
                            piece_size=MAX_PIECE_SIZE, in_flight=range(32768),
                            piece_digests=[f"sha256:{i:064x}" for i in range(32768)]))
                        codes["seed OK"] = codes.get("seed OK", 0) + 1
                    except grpc.aio.AioRpcError as exc:
                        codes["seed " + exc.code().name] = codes.get("seed " + exc.code().name, 0) + 1
                figures["codes"] = codes
                assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "seed OK", "seed RESOURCE_EXHAUSTED"}, codes
                # the attacked digest still works for an honest peer
                await s.RegisterPeer(pb.RegisterPeerRequest(host=pb.PeerHost(
                    peer_id="honest", host_id="good", ip="127.0.0.1", upload_port=1)))
                r = await s.RegisterTask(pb.RegisterTaskRequest(peer_id="honest", task_id=TASK))
                assert r.back_to_source and r.reason == "seed"
                await s.AnnouncePieces(pb.AnnouncePiecesRequest(
                    peer_id="honest", task_id=TASK, content_length=3 << 20, piece_size=MIN_PIECE_SIZE,
                    finished=[0]))
                g = await s.GetParents(pb.GetParentsRequest(peer_id="honest", task_id=TASK))
                assert g.back_to_source and g.content_length == 3 << 20

        asyncio.run(attack())
        figures["rss_end_mib"] = _rss_kib(d.pid) / 1024
        figures["rss_peak_mib"] = _rss_kib(d.pid, "VmHWM") / 1024
        print(f"\nscheduler under attack: {figures}")
        assert d.alive(), d.log_tail()
        assert figures["rss_peak_mib"] < 256, figures
        assert "MemoryError" not in d.log_tail(200)
    finally:
        d.stop(grace=5)
