"""The slow-parent rule never drops the only candidate holding a piece the child needs: a slow parent
beats none (the debug log says it was kept); it still drops slow candidates whose pieces others hold."""
from __future__ import annotations

import logging
import random

import pytest
from sched_util import plain_scheduler

from remora._proto import remora_scheduler_pb2 as pb
from remora.plugins.scheduler.selection import ParentSelector, SelectionConfig, WeightedScorer
from remora.plugins.scheduler.state import Host, SchedulerState

TASK = "sha256:" + "c3" * 32
PIECE = 256 * 1024
SLOW_COSTS = [0.01, 0.01, 0.01, 0.5]   # the last one is 50x the mean: slow


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def state():
    return SchedulerState(peer_ttl=60, clock=Clock())


def peer(state, pid, pieces=(), done=False):
    state.register_peer(Host(peer_id=pid, host_id=f"host-{pid}", ip="127.0.0.1", upload_port=1))
    state.join_task(pid, TASK, content_length=10 * 4096, piece_size=4096)
    return state.announce(pid, TASK, pieces, (), done=done)


def make_slow(state, *pids):
    """A child that fetched pieces from each of ``pids`` (the last one far slower), then left."""
    peer(state, "witness")
    for pid in pids:
        for i, cost in enumerate(SLOW_COSTS):
            state.report_piece("witness", TASK, pid, i, True, cost, 4096)
    state.leave_task("witness", TASK)


def select(state, child="child"):
    sel = ParentSelector(state, WeightedScorer(), SelectionConfig(), random.Random(5))
    return sel.select(state.tasks[TASK], child)


def test_the_only_holder_of_needed_pieces_is_kept_though_slow(state, caplog):
    peer(state, "child", pieces=[0, 1])
    peer(state, "slowpoke", pieces=range(10))      # the only one with pieces 5..9
    peer(state, "partial", pieces=range(5))
    make_slow(state, "slowpoke")
    with caplog.at_level(logging.DEBUG, logger="remora.plugins.scheduler.selection"):
        decision = select(state)
    assert sorted(c.peer_id for c in decision.parents) == ["partial", "slowpoke"]
    assert "slowpoke" in decision.kept_slow and decision.dropped["slow"] == 0
    assert any("keeping slow parent slowpoke" in r.getMessage() and "5 needed piece(s)" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_slow_sole_candidate_is_kept(state):
    peer(state, "child")
    peer(state, "slowpoke", done=True)             # complete, and nobody else holds anything
    make_slow(state, "slowpoke")
    decision = select(state)
    assert [c.peer_id for c in decision.parents] == ["slowpoke"]


def test_a_slow_candidate_whose_pieces_others_hold_is_still_dropped(state):
    peer(state, "child", pieces=[0])
    peer(state, "slowpoke", pieces=range(10))
    peer(state, "steady", done=True)               # holds everything the slow one holds
    make_slow(state, "slowpoke")
    decision = select(state)
    assert "slowpoke" not in [c.peer_id for c in decision.parents]
    assert decision.dropped["slow"] == 1 and decision.kept_slow == []


def test_of_two_slow_holders_of_the_same_pieces_one_is_kept(state):
    peer(state, "child")
    peer(state, "slow-a", pieces=range(6))
    peer(state, "slow-b", pieces=range(6))
    make_slow(state, "slow-a", "slow-b")
    decision = select(state)
    kept = [c.peer_id for c in decision.parents if c.peer_id.startswith("slow")]
    assert len(kept) == 1 and decision.dropped["slow"] == 1


async def test_get_parents_returns_the_slow_only_holder_over_grpc():
    async with plain_scheduler(("seed", "child", "other"), random_seed=2) as (server, stub):
        assert (await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="seed", task_id=TASK))).back_to_source
        await stub.AnnouncePieces(pb.AnnouncePiecesRequest(
            peer_id="seed", task_id=TASK, finished=range(8), content_length=8 * PIECE, piece_size=PIECE,
            piece_digests=[f"sha256:{i:064x}" for i in range(8)]))
        await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="other", task_id=TASK))
        # "other" got pieces from the seed; the last one took far longer than the others: slow.
        await stub.ReportPieceResults(pb.ReportPieceResultsRequest(peer_id="other", task_id=TASK, results=[
            pb.PieceResult(parent_id="seed", piece=i, success=True, cost_us=int(c * 1e6), size=PIECE)
            for i, c in enumerate(SLOW_COSTS)]))
        # "other" holds pieces 0..3 (announced), the seed alone holds 4..7.
        await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="other", task_id=TASK, finished=range(4)))
        r = await stub.RegisterTask(pb.RegisterTaskRequest(peer_id="child", task_id=TASK))
        assert not r.back_to_source
        assert sorted(p.host.peer_id for p in r.parents) == ["other", "seed"], r.reason
        # Once the child holds 4..7 (from anyone), the seed is no longer the only holder: dropped as slow.
        await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="child", task_id=TASK, finished=range(4, 8)))
        g = await stub.GetParents(pb.GetParentsRequest(peer_id="child", task_id=TASK))
        assert [p.host.peer_id for p in g.parents] == ["other"]
