"""Announcements and result reports carry a per-(peer, task) ``seq``: one that arrives after a newer one
from the same peer for the same task is ignored. A delayed "not done" must not undo a success report
(the scheduler then elected a second seed, which fetched the blob from the registry again)."""
from __future__ import annotations

import pytest
from sched_util import plain_scheduler

from remora._proto import remora_scheduler_pb2 as pb
from remora.plugins.scheduler import state as state_mod

TASK = "sha256:" + "d4" * 32
PIECE = 256 * 1024
N = 8
DIGESTS = [f"sha256:{i:064x}" for i in range(N)]


@pytest.fixture
async def sched():
    async with plain_scheduler(("seed", "child", "late"), random_seed=4) as both:
        yield both


def announce(stub, pid, seq, finished=(), in_flight=(), done=False, digests=()):
    return stub.AnnouncePieces(pb.AnnouncePiecesRequest(
        peer_id=pid, task_id=TASK, finished=list(finished), in_flight=list(in_flight), done=done, seq=seq,
        content_length=N * PIECE, piece_size=PIECE, piece_digests=list(digests)))


async def test_a_delayed_not_done_announcement_does_not_undo_success(sched):
    server, stub = sched
    assert (await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="seed", task_id=TASK))).back_to_source
    await announce(stub, "seed", 100, finished=range(3), in_flight=range(3, N), digests=DIGESTS)
    # The peer sent "5 of 8, in progress" (seq 101), then "done" (102) and its success report (103); the
    # network delivers 102 and 103 first.
    await announce(stub, "seed", 102, finished=range(N), done=True, digests=DIGESTS)
    await stub.ReportTaskResult(pb.ReportTaskResultRequest(peer_id="seed", task_id=TASK, success=True, seq=103))
    await announce(stub, "seed", 101, finished=range(5), in_flight=range(5, N), digests=DIGESTS)

    task = server.state.tasks[TASK]
    assert task.peers["seed"].done and task.state == "succeeded" and not task.needs_seed()
    stat = await stub.StatTask(pb.StatTaskRequest(task_id=TASK))
    assert stat.state == "succeeded"
    # A new peer gets the complete seed as parent, holding every piece: nobody goes to the registry.
    r = await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="late", task_id=TASK))
    assert not r.back_to_source, r.reason
    assert [p.host.peer_id for p in r.parents] == ["seed"] and list(r.parents[0].pieces) == list(range(N))

    # A NEWER "not done" is the truth (the peer lost pieces): taken.
    await announce(stub, "seed", 104, finished=range(6))
    assert not task.peers["seed"].done and task.peers["seed"].finished == set(range(6))


async def test_a_delayed_announcement_does_not_bring_back_a_peer_that_left(sched):
    server, stub = sched
    await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="seed", task_id=TASK))
    await announce(stub, "seed", 10, finished=range(N), done=True, digests=DIGESTS)
    await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="child", task_id=TASK))
    await announce(stub, "child", 20, finished=[0, 1])
    # The child failed and left (report 22); its announcement 21 arrives afterwards.
    await stub.ReportTaskResult(pb.ReportTaskResultRequest(peer_id="child", task_id=TASK, success=False,
                                                          error="disk full", seq=22))
    assert "child" not in server.state.tasks[TASK].peers
    await announce(stub, "child", 21, finished=[0, 1, 2])
    assert "child" not in server.state.tasks[TASK].peers
    stat = await stub.StatTask(pb.StatTaskRequest(task_id=TASK))
    assert sorted(stat.peers) == ["seed"]
    # It starts over later (newer seq): taken again.
    await announce(stub, "child", 23, finished=[0])
    assert server.state.tasks[TASK].peers["child"].finished == {0}
    # A delayed older failure report does not throw it out again.
    await stub.ReportTaskResult(pb.ReportTaskResultRequest(peer_id="child", task_id=TASK, success=False, seq=22))
    assert "child" in server.state.tasks[TASK].peers


async def test_unnumbered_messages_from_older_peers_are_taken_as_before(sched):
    server, stub = sched
    await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="seed", task_id=TASK))
    await announce(stub, "seed", 0, finished=range(N), done=True, digests=DIGESTS)
    await announce(stub, "seed", 0, finished=range(2))
    assert not server.state.tasks[TASK].peers["seed"].done


def test_seq_memory_per_peer_is_bounded():
    bound = state_mod.MAX_SEQS_PER_PEER
    state = state_mod.SchedulerState(peer_ttl=60)
    state.register_peer(state_mod.Host(peer_id="p", host_id="h"))
    for i in range(bound + 10):
        assert state.fresh("p", f"sha256:{i:064x}", 5)
    assert len(state.peers["p"].seqs) == bound
    assert not state.fresh("p", f"sha256:{bound + 9:064x}", 5)   # the newest are kept
