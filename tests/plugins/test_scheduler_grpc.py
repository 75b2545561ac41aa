"""The scheduler over real gRPC on loopback: seed election, in-flight parents, resets, blocklists, expiry."""
from __future__ import annotations

import asyncio
import sys

import aiohttp
import grpc
import pytest

from remora._proto import remora_scheduler_pb2 as pb
from remora._proto import remora_scheduler_pb2_grpc as pb_grpc
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerServer
from remora.procutil import Daemon, free_port, port_open, wait_until

TASK = "sha256:" + "5e" * 32
PIECE = 256 * 1024   # the piece size every blob below 64 MiB gets (peer.config.piece_size_for)


@pytest.fixture
async def sched():
    server = await SchedulerServer(SchedulerConfig(random_seed=1), "127.0.0.1:0", "127.0.0.1:0",
                                   insecure_plain=True).start()
    channel = grpc.aio.insecure_channel(server.address)
    stub = pb_grpc.SchedulerStub(channel)
    try:
        yield server, stub
    finally:
        await channel.close()
        await server.stop(0)


async def register(stub, peer_id, host_id=None, **kw):
    resp = await stub.RegisterPeer(pb.RegisterPeerRequest(host=pb.PeerHost(
        peer_id=peer_id, host_id=host_id or f"host-{peer_id}", ip="127.0.0.1", upload_port=4000, **kw)))
    return resp


async def metrics(server) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{server.metrics_address}/metrics") as r:
            assert r.status == 200
            return await r.text()


def metric(text: str, sample: str) -> float:
    """The value of one sample, named exactly as exposed (labels in the exposition's sorted order)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in metrics:\n{text}")


async def test_first_is_seed_second_gets_seed_with_in_flight_pieces(sched):
    server, stub = sched
    first = await register(stub, "seed")
    assert first.known is False and first.peer_ttl_ms == 60_000 and first.keepalive_interval_ms == 20_000
    assert (await register(stub, "seed")).known is True
    r = await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="seed", task_id=TASK))
    assert r.back_to_source and r.reason == "seed" and not r.parents
    await stub.AnnouncePieces(pb.AnnouncePiecesRequest(
        peer_id="seed", task_id=TASK, finished=[0], in_flight=[1, 2], content_length=5 * PIECE,
        piece_size=PIECE, piece_digests=[f"sha256:{i:064x}" for i in range(5)]))

    await register(stub, "child")
    r = await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="child", task_id=TASK))
    assert not r.back_to_source
    assert [p.host.peer_id for p in r.parents] == ["seed"]
    assert list(r.parents[0].pieces) == [0] and list(r.parents[0].in_flight) == [1, 2]
    assert r.parents[0].host.upload_port == 4000
    assert r.content_length == 5 * PIECE and r.piece_size == PIECE and len(r.piece_digests) == 5

    stat = await stub.StatTask(pb.StatTaskRequest(task_id=TASK))
    assert stat.seed_peer == "seed" and stat.state == "running" and sorted(stat.peers) == ["child", "seed"]
    text = await metrics(server)
    assert metric(text, 'remora_scheduler_back_to_source_total{reason="seed"}') == 1
    assert metric(text, 'remora_scheduler_parent_decisions_total{outcome="parents",scorer="weighted"}') == 1
    assert metric(text, "remora_scheduler_peers") == 2


async def test_a_child_learns_metadata_and_parents_later_via_get_parents(sched):
    server, stub = sched
    for p in ("seed", "child"):
        await register(stub, p)
    await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="seed", task_id=TASK))
    r = await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="child", task_id=TASK))
    # The seed announced nothing yet: no parent, come back later (not back to source).
    assert not r.back_to_source and not r.parents and r.retry_after_ms == 200
    await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="seed", task_id=TASK, in_flight=[0],
                                                       content_length=3 * PIECE, piece_size=PIECE))
    g = await stub.GetParents(pb.GetParentsRequest(peer_id="child", task_id=TASK))
    assert [p.host.peer_id for p in g.parents] == ["seed"] and g.content_length == 3 * PIECE


async def test_failed_seed_resets_the_task_and_the_next_registrant_is_seed(sched):
    server, stub = sched
    for p in ("s1", "c1", "c2"):
        await register(stub, p)
    assert (await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="s1", task_id=TASK))).back_to_source
    await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="s1", task_id=TASK, in_flight=[0, 1],
                                                       content_length=2 * PIECE, piece_size=PIECE,
                                                       piece_digests=["sha256:" + "0" * 64, ""]))
    r = await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="c1", task_id=TASK))
    assert [p.host.peer_id for p in r.parents] == ["s1"]

    await stub.ReportTaskResult(pb.ReportTaskResultRequest(peer_id="s1", task_id=TASK, success=False,
                                                           back_to_source=True, error="digest mismatch"))
    stat = await stub.StatTask(pb.StatTaskRequest(task_id=TASK))
    assert stat.seed_peer == "" and stat.state == "failed" and "s1" not in stat.peers
    # The failed seed starts over at once, but is not re-elected while others can try the registry.
    r = await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="s1", task_id=TASK))
    assert not r.back_to_source and r.retry_after_ms > 0
    r = await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="c2", task_id=TASK))
    assert r.back_to_source and r.reason == "reseed"
    assert not r.piece_digests          # the failed seed's digests were dropped with it
    assert (await stub.StatTask(pb.StatTaskRequest(task_id=TASK))).seed_peer == "c2"
    # c1, which was waiting on the failed seed, is now told to wait for c2, not made a second seed.
    await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="c2", task_id=TASK, in_flight=[0]))
    g = await stub.GetParents(pb.GetParentsRequest(peer_id="c1", task_id=TASK))
    assert [p.host.peer_id for p in g.parents] == ["c2"] and not g.back_to_source
    text = await metrics(server)
    assert metric(text, 'remora_scheduler_task_resets_total{reason="seed_failed"}') == 1
    assert metric(text, 'remora_scheduler_back_to_source_total{reason="reseed"}') == 1


async def test_waiting_child_becomes_seed_when_the_seed_leaves(sched):
    server, stub = sched
    for p in ("s1", "c1"):
        await register(stub, p)
    await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="s1", task_id=TASK))
    await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="c1", task_id=TASK))
    await stub.LeavePeer(pb.LeavePeerRequest(peer_id="s1"))
    g = await stub.GetParents(pb.GetParentsRequest(peer_id="c1", task_id=TASK))
    assert g.back_to_source and g.reason == "reseed"


async def test_blocklisted_parent_is_never_returned_again(sched):
    server, stub = sched
    for p in ("seed", "p2", "p3", "child"):
        await register(stub, p)
    await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="seed", task_id=TASK))
    for p in ("seed", "p2", "p3"):
        await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id=p, task_id=TASK, finished=range(8),
                                                           content_length=8 * PIECE, piece_size=PIECE))
    g = await stub.GetParents(pb.GetParentsRequest(peer_id="child", task_id=TASK, exclude=["p2"]))
    assert {p.host.peer_id for p in g.parents} == {"seed", "p3"}
    await stub.ReportPieceResults(pb.ReportPieceResultsRequest(peer_id="child", task_id=TASK, results=[
        pb.PieceResult(parent_id="p3", piece=1, success=False, cost_us=1000, size=PIECE, error="corrupt"),
        pb.PieceResult(parent_id="seed", piece=0, success=True, cost_us=20_000, size=PIECE)]))
    for _ in range(20):   # the exclusion was remembered even though the child no longer sends it
        g = await stub.GetParents(pb.GetParentsRequest(peer_id="child", task_id=TASK))
        assert [p.host.peer_id for p in g.parents] == ["seed"]
    # An exclusion holds for that child only; a corrupt piece (bytes against the seed's digest) isolates
    # the parent from the task for every child.
    await register(stub, "other")
    g = await stub.GetParents(pb.GetParentsRequest(peer_id="other", task_id=TASK, limit=5))
    assert {p.host.peer_id for p in g.parents} == {"seed", "p2", "child"}   # child holds piece 0 now
    text = await metrics(server)
    assert metric(text, 'remora_scheduler_blocklist_events_total{reason="excluded"}') == 1
    assert metric(text, 'remora_scheduler_blocklist_events_total{reason="isolated"}') == 1


async def test_repeated_scheduling_failures_send_the_peer_to_the_source(sched):
    server, stub = sched
    server.config.max_schedule_failures = 3
    for p in ("seed", "child"):
        await register(stub, p)
    await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="seed", task_id=TASK))   # never announces
    answers = [await stub.GetParents(pb.GetParentsRequest(peer_id="child", task_id=TASK)) for _ in range(3)]
    assert [a.back_to_source for a in answers] == [False, False, True]
    assert answers[0].retry_after_ms > 0 and "no_data=1" in answers[0].reason
    assert answers[2].reason == "schedule_failures"
    text = await metrics(server)
    assert metric(text, 'remora_scheduler_back_to_source_total{reason="schedule_failures"}') == 1


async def test_silent_peers_expire_and_their_task_reseeds():
    class Clock:   # injected: expiry is driven by the test, not by real sleeps
        now = 1000.0

        def __call__(self):
            return self.now

    clock = Clock()
    server = await SchedulerServer(SchedulerConfig(peer_ttl=0.4), "127.0.0.1:0", "127.0.0.1:0", clock=clock,
                                   insecure_plain=True).start()
    channel = grpc.aio.insecure_channel(server.address)
    stub = pb_grpc.SchedulerStub(channel)
    try:
        for p in ("seed", "child"):
            await register(stub, p)
        await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="seed", task_id=TASK))
        await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="seed", task_id=TASK, in_flight=[0]))
        await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="child", task_id=TASK))
        for _ in range(8):   # the child keeps alive for 0.8 s, the seed says nothing
            clock.now += 0.1
            await register(stub, "child")
            server.service.expire()
        assert "seed" not in server.state.peers and "child" in server.state.peers
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="seed", task_id=TASK, finished=[0]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        g = await stub.GetParents(pb.GetParentsRequest(peer_id="child", task_id=TASK))
        assert g.back_to_source and g.reason == "reseed"
        text = await metrics(server)
        assert metric(text, "remora_scheduler_peers_expired_total") == 1
        assert metric(text, 'remora_scheduler_task_resets_total{reason="seed_expired"}') == 1
        clock.now += 0.8   # now the child is silent too: everything is gone
        server.service.expire()
        assert not server.state.peers and not server.state.tasks
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.StatTask(pb.StatTaskRequest(task_id=TASK))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await channel.close()
        await server.stop(0)


@pytest.mark.parametrize("request_, needle", [
    (pb.RegisterTaskRequest(peer_id="x", task_id="not-a-digest"), "task_id"),
    (pb.RegisterTaskRequest(peer_id="", task_id=TASK), "peer_id"),
    (pb.AnnouncePiecesRequest(peer_id="x", task_id=TASK, finished=[1 << 30]), "out of range"),
])
async def test_bad_requests_are_rejected_clearly(sched, request_, needle):
    server, stub = sched
    await register(stub, "x")
    method = stub.RegisterTask if isinstance(request_, pb.RegisterTaskRequest) else stub.AnnouncePieces
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    assert not server.state.tasks


async def test_probes_feed_rtts_and_rotate_targets(sched):
    server, stub = sched
    for p in ("a", "b", "c"):
        await register(stub, p)
    r = await stub.SyncProbes(pb.SyncProbesRequest(peer_id="a"))
    assert {t.peer_id for t in r.targets} == {"b", "c"} and r.probe_interval_ms == 30_000
    await stub.SyncProbes(pb.SyncProbesRequest(peer_id="a", results=[
        pb.ProbeResult(peer_id="b", rtt_us=800, success=True), pb.ProbeResult(peer_id="c", success=False)]))
    assert server.state.rtt_between("a", "b").rtt_s == pytest.approx(0.0008)
    assert server.state.rtt_between("a", "c").reachable is False


def test_cli_serves_grpc_and_metrics_and_stops_on_sigterm(tmp_path):
    port, mport = free_port(), free_port()
    d = Daemon([sys.executable, "-m", "remora.cli", "scheduler", "--insecure-plain-mesh",
                "--listen", f"127.0.0.1:{port}",
                "--metrics-listen", f"127.0.0.1:{mport}", "--scorer", "bandit", "--peer-ttl", "5"],
               tmp_path / "scheduler.log").start()
    try:
        wait_until(lambda: port_open("127.0.0.1", mport) and port_open("127.0.0.1", port), 15,
                   what="scheduler ports")

        async def talk():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                r = await pb_grpc.SchedulerStub(ch).RegisterPeer(
                    pb.RegisterPeerRequest(host=pb.PeerHost(peer_id="p", host_id="h")))
                assert r.peer_ttl_ms == 5000
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{mport}/metrics") as resp:
                    return await resp.text()
        text = asyncio.run(talk())
        assert metric(text, "remora_scheduler_peers") == 1
        d.stop(grace=10)
        assert d.proc.returncode == 0, d.log_tail()
    finally:
        d.stop(grace=2)


async def test_held_covers_the_whole_task_and_source_marks_a_streaming_seed(sched):
    """``held`` lists what anyone (not blocklisted by the caller) has or fetches, parent or not: a child
    never goes to the registry for a piece the seed is streaming. ``source`` marks the streaming seed
    (children fetch each of its fresh pieces once), not a peer that merely holds the whole blob."""
    server, stub = sched
    digests = [f"sha256:{i:064x}" for i in range(6)]
    for pid in ("seed", "relay", "child"):
        await register(stub, pid)
    assert (await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="seed", task_id=TASK))).back_to_source
    await stub.AnnouncePieces(pb.AnnouncePiecesRequest(
        peer_id="seed", task_id=TASK, finished=[0, 1], in_flight=[2, 3, 4], content_length=6 * PIECE,
        piece_size=PIECE, piece_digests=digests[:2] + [""] * 4))
    await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="relay", task_id=TASK, finished=[0], in_flight=[1]))
    r = await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="child", task_id=TASK))
    assert list(r.held) == [0, 1, 2, 3, 4]          # piece 5: nobody has it or fetches it
    source = {p.host.peer_id: p.source for p in r.parents}
    assert source == {"seed": True, "relay": False}

    # the relay gave up on piece 1 (the seed sent it elsewhere): its next announcement says so
    await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="relay", task_id=TASK, finished=[0], in_flight=[]))
    r = await stub.GetParents(pb.GetParentsRequest(peer_id="child", task_id=TASK, limit=8))
    relay = next(p for p in r.parents if p.host.peer_id == "relay")
    assert list(relay.in_flight) == []
    assert len(r.piece_digests) == 6                 # the caller said it knows no digest yet
    r = await stub.GetParents(pb.GetParentsRequest(peer_id="child", task_id=TASK, limit=8, known_digests=2))
    assert list(r.piece_digests) == []               # nothing new for it: the list is left out

    # a blocklisted seed's pieces are not "held" for that child any more: they may become orphans
    r = await stub.GetParents(pb.GetParentsRequest(peer_id="child", task_id=TASK, limit=8, exclude=["seed"]))
    assert list(r.held) == [0] and [p.host.peer_id for p in r.parents] == ["relay"]

    # once the seed is done it is an ordinary complete parent, and everything is held
    await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="seed", task_id=TASK, finished=range(6),
                                                       piece_digests=digests, done=True))
    await register(stub, "late")
    r = await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="late", task_id=TASK))
    assert list(r.held) == list(range(6))
    assert {p.host.peer_id: p.source for p in r.parents}["seed"] is False
