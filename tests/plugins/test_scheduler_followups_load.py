"""A parent's load (``parent_load``, the free-upload feature, the learned scorer's load factor) is the
piece transfers children report running from it, not the children that merely list it; a transfer ends
with its piece result or the child's next announcement, and expires when the child goes silent."""
from __future__ import annotations

import os

import aiohttp
import grpc
import pytest
from peer_util import push_blob, unique

from remora._proto import remora_scheduler_pb2 as pb
from remora._proto import remora_scheduler_pb2_grpc as pb_grpc
from remora.plugins.peer.config import MIN_PIECE_SIZE
from remora.plugins.scheduler.selection import FEATURE_NAMES
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerServer
from remora.plugins.scheduler.state import Host, SchedulerState

TASK = "sha256:" + "7a" * 32
PIECE = 256 * 1024
LOAD = FEATURE_NAMES.index("parent_load")


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
async def sched():
    clock = Clock()
    server = await SchedulerServer(SchedulerConfig(peer_ttl=600, random_seed=3), "127.0.0.1:0", clock=clock,
                                   insecure_plain=True).start()
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield server, pb_grpc.SchedulerStub(channel), clock
    finally:
        await channel.close()
        await server.stop(0)


async def join(stub, pid):
    await stub.RegisterPeer(pb.RegisterPeerRequest(host=pb.PeerHost(
        peer_id=pid, host_id=f"host-{pid}", ip="127.0.0.1", upload_port=4000, upload_slots=4)))
    return await stub.RegisterTask(pb.RegisterTaskRequest(peer_id=pid, task_id=TASK))


def announce(stub, pid, transfers, finished=(), seq=0):
    return stub.AnnouncePieces(pb.AnnouncePiecesRequest(
        peer_id=pid, task_id=TASK, finished=list(finished), content_length=16 * PIECE, piece_size=PIECE,
        transfers=[pb.Transfer(parent_id=p, piece=i) for p, i in transfers], transfers_known=True, seq=seq))


def parent_load(server, child, parent) -> tuple[int, float]:
    """(state's upload load, the raw parent_load feature the learned scorer and the history get)."""
    task = server.state.tasks[TASK]
    feats = server.service.selector.features(task, task.peers[child], [task.peers[parent]])
    return server.state.upload_load(parent), feats[0].raw[LOAD]


async def test_load_counts_reported_transfers_not_listed_children(sched):
    server, stub, clock = sched
    r = await join(stub, "seed")
    assert r.back_to_source
    await stub.AnnouncePieces(pb.AnnouncePiecesRequest(
        peer_id="seed", task_id=TASK, finished=range(16), content_length=16 * PIECE, piece_size=PIECE,
        piece_digests=[f"sha256:{i:064x}" for i in range(16)]))
    for child in ("c1", "c2", "c3"):
        r = await join(stub, child)
        assert [p.host.peer_id for p in r.parents] == ["seed"]   # each lists the seed as its parent
    # Listed by three children, but none fetches anything from it yet.
    for child in ("c1", "c2", "c3"):
        await announce(stub, child, [])
    assert parent_load(server, "c1", "seed") == (0, 0.0)
    free_before = server.service.selector.features(
        server.state.tasks[TASK], server.state.tasks[TASK].peers["c1"], [server.state.tasks[TASK].peers["seed"]])[0]
    assert free_before.free_upload == 1.0

    await announce(stub, "c1", [("seed", 0), ("seed", 1)])
    await announce(stub, "c2", [("seed", 2)])
    assert parent_load(server, "c3", "seed") == (3, 3.0)
    f = server.service.selector.features(server.state.tasks[TASK], server.state.tasks[TASK].peers["c3"],
                                         [server.state.tasks[TASK].peers["seed"]])[0]
    assert f.free_upload == pytest.approx(1 / 4)     # 4 slots, 3 transfers

    # A piece result ends its transfer; the child's next announcement is its whole set.
    await stub.ReportPieceResults(pb.ReportPieceResultsRequest(peer_id="c1", task_id=TASK, results=[
        pb.PieceResult(parent_id="seed", piece=0, success=True, cost_us=20_000, size=PIECE)]))
    assert parent_load(server, "c3", "seed") == (2, 2.0)
    await announce(stub, "c2", [], finished=[2])
    assert parent_load(server, "c3", "seed") == (1, 1.0)
    # A child that completes fetches nothing more.
    await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="c1", task_id=TASK, done=True,
                                                      transfers_known=True))
    assert parent_load(server, "c3", "seed") == (0, 0.0)
    assert server.state.transfer_count == 0 and not server.state.transfers_to


async def test_transfers_of_a_silent_child_expire(sched):
    """c1 dies mid-piece: no result, no announcement ever comes. Its transfers stop counting after the
    transfer TTL although the peer itself is not expired yet (its TTL is longer)."""
    server, stub, clock = sched
    ttl = server.state.transfer_ttl
    assert ttl < server.config.peer_ttl
    await join(stub, "seed")
    await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="seed", task_id=TASK, finished=range(16),
                                                      content_length=16 * PIECE, piece_size=PIECE))
    for child in ("c1", "c2"):
        await join(stub, child)
    await announce(stub, "c1", [("seed", 4), ("seed", 5)])
    await announce(stub, "c2", [("seed", 6)])
    assert parent_load(server, "c2", "seed") == (3, 3.0)
    clock.now += ttl * 0.6
    await announce(stub, "c2", [("seed", 6)])      # c2 is alive: its transfer is still running
    clock.now += ttl * 0.6
    server.service.expire()                          # the sweeper
    assert "c1" in server.state.peers                # not expired as a peer...
    assert parent_load(server, "c2", "seed") == (1, 1.0)   # ... but its dead transfers are gone
    assert server.state.transfer_count == 1
    clock.now += ttl
    assert parent_load(server, "c2", "seed") == (0, 0.0)   # expired at read time too, sweeper or not
    assert server.state.transfer_count == 0


async def test_transfers_are_bounded_and_checked(sched):
    server, stub, clock = sched
    await join(stub, "seed")
    await join(stub, "c1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await announce(stub, "c1", [("seed", i % 16) for i in range(300)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "transfers" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await announce(stub, "c1", [("seed", 99)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in err.value.details()
    # Transfers from peers that are not in the task (or from itself) are not kept.
    await announce(stub, "c1", [("nobody", 1), ("c1", 2), ("seed", 3)])
    assert server.state.transfer_count == 1 and list(server.state.transfers_to) == ["seed"]
    # The parent leaving the task ends the transfers from it.
    await stub.LeaveTask(pb.LeaveTaskRequest(peer_id="seed", task_id=TASK))
    assert server.state.transfer_count == 0 and not server.state.transfers_to


def test_older_children_still_count_by_their_parent_edges():
    """Peers that do not report transfers (no ``transfers_known``) keep the old measure."""
    state = SchedulerState(peer_ttl=60, clock=Clock())
    for pid in ("p", "old", "new"):
        state.register_peer(Host(peer_id=pid, host_id=f"h-{pid}"))
        state.join_task(pid, TASK, content_length=8 * PIECE, piece_size=PIECE)
    state.announce("p", TASK, range(8), ())
    task = state.tasks[TASK]
    task.set_parents("old", ["p"])
    task.set_parents("new", ["p"])
    state.announce("old", TASK, [], ())                   # an older peer: edges count
    state.announce("new", TASK, [], (), transfers=[])     # reports transfers: its edge does not
    assert state.upload_load("p") == 1
    state.announce("new", TASK, [], (), transfers=[("p", 1), ("p", 2)])
    assert state.upload_load("p") == 3


async def test_real_peers_number_their_messages_and_report_transfers(scheduler, peers, registry):
    """The peer side: a child's announcements say which transfers it runs (``transfers_known``) and
    carry a growing ``seq``; its success report is numbered after its last announcement."""
    repo = unique("followups/load")
    data = os.urandom(24 * MIN_PIECE_SIZE + 5)
    digest = push_blob(registry.url, repo, data)
    seen: list[tuple[str, int]] = []   # (child, transfers tracked) at every piece report
    state = scheduler.state
    state.piece_listeners.append(lambda task, child, parent, size, cost, ok: seen.append((child, state.transfer_count)))
    seed = await peers("seed", [scheduler.address])
    child = await peers("child", [scheduler.address])
    for p in (seed, child):
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{p.mirror_url}/v2/{repo}/blobs/{digest}?ns={registry.host}") as r:
                assert r.status == 200 and await r.read() == data
    assert any(c == child.cfg.peer_id for c, _ in seen)    # it fetched from the seed
    tp = state.tasks[digest].peers[child.cfg.peer_id]
    assert tp.done and tp.reports_transfers and not tp.transfers
    assert state.peers[child.cfg.peer_id].seqs[digest] > 0
    assert state.transfer_count == 0 and not state.transfers_to
