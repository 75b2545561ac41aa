"""Consistent hashing of tasks onto schedulers, and the failover client against real gRPC schedulers."""
from __future__ import annotations

import asyncio
import hashlib

import pytest

from remora._proto import remora_scheduler_pb2 as pb
from remora.errors import UsageError
from remora.plugins.scheduler.client import SchedulerClient, SchedulerRequestError, SchedulerUnavailable
from remora.plugins.scheduler.ring import SchedulerRing
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerServer

TASKS = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(10_000)]
FOUR = [f"10.0.0.{i}:8002" for i in range(1, 5)]


def owners(ring: SchedulerRing) -> list[str]:
    return [ring.owner(t) for t in TASKS]


def test_pick_is_a_deterministic_failover_order():
    ring = SchedulerRing(FOUR)
    again = SchedulerRing(list(reversed(FOUR)) + [FOUR[0]])      # order and duplicates don't matter
    without = {gone: SchedulerRing([a for a in FOUR if a != gone]) for gone in FOUR}
    for task in TASKS[:500]:
        order = ring.pick(task)
        assert sorted(order) == sorted(FOUR) and order == again.pick(task)
        # the second choice is exactly where the task goes when its owner is removed
        assert without[order[0]].owner(task) == order[1]


def test_load_is_balanced():
    counts = dict.fromkeys(FOUR, 0)
    for owner in owners(SchedulerRing(FOUR)):
        counts[owner] += 1
    assert all(0.18 < c / len(TASKS) < 0.32 for c in counts.values()), counts


def test_adding_a_scheduler_moves_about_one_nth():
    before = owners(SchedulerRing(FOUR))
    new = "10.0.0.5:8002"
    after = owners(SchedulerRing(FOUR + [new]))
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert 0.14 < len(moved) / len(TASKS) < 0.26           # ideal 1/5
    assert all(a == new for _, a in moved)                  # only to the newcomer, never between old ones


def test_removing_a_scheduler_moves_only_its_tasks():
    before = owners(SchedulerRing(FOUR))
    after = owners(SchedulerRing(FOUR[:3]))
    assert all(b == a for b, a in zip(before, after) if b != FOUR[3])


def test_no_address_is_a_usage_error():
    with pytest.raises(UsageError):
        SchedulerRing([" ", ""])


# -- the client, against real schedulers on loopback ------------------------------------------------------

def host(peer_id="peer-1") -> pb.PeerHost:
    return pb.PeerHost(peer_id=peer_id, host_id="h-" + peer_id, ip="127.0.0.1", upload_port=4100)


@pytest.fixture
async def two():
    servers = [await SchedulerServer(SchedulerConfig(), "127.0.0.1:0", insecure_plain=True).start() for _ in range(2)]
    try:
        yield servers
    finally:
        for s in servers:
            await s.stop(0)


def task_owned_by(ring: SchedulerRing, address: str) -> str:
    return next(t for t in TASKS if ring.owner(t) == address)


async def test_client_routes_by_hash_and_fails_over(two):
    a, b = two
    client = SchedulerClient([a.address, b.address], host(), timeout=2, down_for=30)
    try:
        task = task_owned_by(client.ring, a.address)
        r = await client.register_task(pb.RegisterTaskRequest(peer_id="peer-1", task_id=task))
        assert r.back_to_source and task in a.state.tasks and task not in b.state.tasks
        assert client.last_address[task] == a.address

        await a.stop(0)
        # The owner is gone: the same call lands on the next scheduler of the ring, which learns the
        # task from it (and, nobody there having the blob, elects this peer as seed).
        g = await client.get_parents(pb.GetParentsRequest(peer_id="peer-1", task_id=task))
        assert g.back_to_source and client.last_address[task] == b.address
        assert b.state.tasks[task].seed_peer == "peer-1"
        # Marked down: the next call goes straight to b without waiting on a again.
        assert client.order(task)[0] == b.address

        await b.stop(0)
        with pytest.raises(SchedulerUnavailable) as err:
            await client.announce_pieces(pb.AnnouncePiecesRequest(peer_id="peer-1", task_id=task, finished=[0]))
        assert a.address in str(err.value) and b.address in str(err.value)
        # Both marked down: the next call gives up at once instead of waiting on dead schedulers.
        with pytest.raises(SchedulerUnavailable) as err:
            await client.get_parents(pb.GetParentsRequest(peer_id="peer-1", task_id=task))
        assert "down (retry in" in str(err.value)
    finally:
        await client.close()


async def test_client_comes_back_to_a_restarted_owner(two):
    a, b = two
    client = SchedulerClient([a.address, b.address], host(), timeout=2, down_for=0.2)
    try:
        task = task_owned_by(client.ring, a.address)
        await a.stop(0)
        await client.register_task(pb.RegisterTaskRequest(peer_id="peer-1", task_id=task))
        assert client.last_address[task] == b.address
        restarted = await SchedulerServer(SchedulerConfig(), a.address, insecure_plain=True).start()
        try:
            for _ in range(30):   # the channel reconnects within its (shortened) backoff
                await client.announce_pieces(pb.AnnouncePiecesRequest(peer_id="peer-1", task_id=task, in_flight=[0]))
                if client.last_address[task] == a.address:
                    break
                await asyncio.sleep(0.2)
            assert client.last_address[task] == a.address
            assert "peer-1" in restarted.state.tasks[task].peers     # registered again transparently
        finally:
            await restarted.stop(0)
    finally:
        await client.close()


async def test_client_re_registers_when_the_scheduler_forgot_it(two):
    a, _ = two
    client = SchedulerClient([a.address], host(), timeout=2)
    try:
        task = TASKS[0]
        await client.register_task(pb.RegisterTaskRequest(peer_id="peer-1", task_id=task))
        a.state.remove_peer("peer-1")        # as after a TTL expiry
        assert await client.keepalive() == [a.address]            # known=False: re-announce your tasks
        assert await client.keepalive() == []                     # remembered now
        a.state.remove_peer("peer-1")
        # A task call re-registers transparently, and the next keepalive still reports the loss (the
        # peer's other tasks there are gone too and must be re-announced).
        await client.announce_pieces(pb.AnnouncePiecesRequest(peer_id="peer-1", task_id=task, finished=[3]))
        assert a.state.tasks[task].peers["peer-1"].finished == {3}
        assert await client.keepalive() == [a.address]
        assert await client.keepalive() == [] and client.keepalive_interval == pytest.approx(20.0)
        b_less = SchedulerClient([a.address, "127.0.0.1:1"], host("peer-2"), timeout=1)
        try:
            assert await b_less.register() == [a.address] and "peer-2" in a.state.peers
        finally:
            await b_less.close()
        targets = await client.sync_probes([])
        assert [t.peer_id for t in targets] == ["peer-2"]   # the other registered peer is to be probed
    finally:
        await client.close()


async def test_client_does_not_fail_over_on_a_bad_request(two):
    a, b = two
    client = SchedulerClient([a.address, b.address], host(), timeout=2)
    try:
        with pytest.raises(SchedulerRequestError) as err:
            await client.register_task(pb.RegisterTaskRequest(peer_id="peer-1", task_id="latest"))
        assert "INVALID_ARGUMENT" in str(err.value)
        assert not client._down_until
    finally:
        await client.close()
