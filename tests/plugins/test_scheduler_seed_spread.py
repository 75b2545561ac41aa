"""Seed election spreads the registry streams of concurrent tasks over peers (server.py ``seed_elsewhere``).

The peers of a preheat ask for the same blobs at once; the first to ask used to be elected the seed of
every blob, so one peer's links carried every registry stream and every fresh piece. A peer that already
fetches a blob from the registry (it says so in ``seeding``, or it is a working seed here) is now put off
("retry") while another peer could seed the task, for at most ``SEED_SPREAD_WAIT``; a foreground request
is never put off for a peer that has not asked for the task."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest
from sched_util import plain_scheduler

from remora._proto import remora_scheduler_pb2 as pb
from remora.plugins.peer.download import TaskManager
from remora.plugins.scheduler import server as server_mod

A, B = "sha256:" + "a1" * 32, "sha256:" + "b2" * 32


@pytest.fixture
async def sched():
    async with plain_scheduler(("x", "y", "z"), random_seed=3) as both:
        yield both


def register(stub, pid, task, seeding=0, background=True):
    return stub.RegisterTask(pb.RegisterTaskRequest(peer_id=pid, task_id=task, seeding=seeding, background=background))


def get_parents(stub, pid, task, seeding=0, background=True):
    return stub.GetParents(pb.GetParentsRequest(peer_id=pid, task_id=task, seeding=seeding, background=background))


async def test_a_busy_seed_is_put_off_and_a_free_preheating_peer_seeds_the_next_blob(sched):
    server, stub = sched
    assert (await register(stub, "x", A)).back_to_source            # x seeds A
    child = await register(stub, "y", A)                              # y preheats too: a child of A
    assert not child.back_to_source and server.state.tasks[A].seed_peer == "x"
    # x asks for B first. It says it fetches nothing else (seeding=0), but the scheduler knows it seeds A.
    first = await register(stub, "x", B)
    assert not first.back_to_source and first.retry_after_ms == server_mod.SEED_SPREAD_RETRY_MS
    assert first.reason.startswith("seed_elsewhere")
    # y, which fetches nothing from the registry, asks next: it is the seed of B.
    assert (await register(stub, "y", B)).back_to_source
    task = server.state.tasks[B]
    assert task.seed_peer == "y"
    # x is now a child of B like any other (waiting for y's first pieces).
    again = await get_parents(stub, "x", B)
    assert not again.back_to_source and again.reason.startswith("no_candidates"), again.reason
    assert task.seed_peer == "y"


async def test_the_seeding_the_peer_reports_counts_for_tasks_of_other_schedulers(sched):
    server, stub = sched
    await get_parents(stub, "y", A)   # y preheats (A has no seed here: y is elected, then reports done below)
    server.state.tasks[A].seed_peer = None   # y's registry fetch ended; y fetches nothing now
    assert not server.state.busy_seeding("y")
    # x seeds a blob at another scheduler: it says so, and B goes to y.
    put_off = await register(stub, "x", B, seeding=1)
    assert not put_off.back_to_source and put_off.reason.startswith("seed_elsewhere")
    assert (await register(stub, "y", B)).back_to_source


async def test_a_foreground_request_is_not_put_off_for_a_peer_that_never_asked_for_the_blob(sched):
    server, stub = sched
    assert (await register(stub, "x", A)).back_to_source
    await register(stub, "y", A)   # y is preheating, free
    # A pull on x (nobody preheats B): elected at once, busy or not.
    assert (await register(stub, "x", B, background=False)).back_to_source


async def test_nobody_else_preheating_means_no_wait(sched):
    server, stub = sched
    assert (await register(stub, "x", A)).back_to_source
    # y and z are known to the scheduler but idle (no background request): a lone preheat is not slowed.
    assert (await register(stub, "x", B)).back_to_source


async def test_the_wait_is_bounded(sched, monkeypatch):
    server, stub = sched
    monkeypatch.setattr(server_mod, "SEED_SPREAD_WAIT", 0.3)
    assert (await register(stub, "x", A)).back_to_source
    await register(stub, "y", A)
    assert not (await register(stub, "x", B)).back_to_source   # put off: y may come
    await asyncio.sleep(0.15)
    await get_parents(stub, "y", A)                            # y keeps preheating A, never asks for B
    assert not (await get_parents(stub, "x", B)).back_to_source
    await asyncio.sleep(0.2)
    await get_parents(stub, "y", A)
    late = await get_parents(stub, "x", B)                      # 0.35 s after the first put-off
    assert late.back_to_source and server.state.tasks[B].seed_peer == "x"


async def test_a_free_peer_already_in_the_task_takes_it_even_for_a_foreground_request(sched):
    server, stub = sched
    assert (await register(stub, "x", A)).back_to_source
    server.state.join_task("y", B)   # y joined B and is waiting (a pull on y, say)
    assert not (await register(stub, "x", B, background=False)).back_to_source
    assert (await register(stub, "y", B, background=False)).back_to_source


async def test_an_absurd_seeding_count_is_refused(sched):
    _, stub = sched
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await register(stub, "x", A, seeding=10**6)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_peer_counts_registry_fetches_and_registrations_but_not_the_task_asking():
    m = SimpleNamespace(streaming={"a", "b"}, registering={"c"})
    assert TaskManager.seeding(m) == 3
    assert TaskManager.seeding(m, besides="c") == 2
    assert TaskManager.seeding(m, besides="a") == 2
    assert TaskManager.seeding(m, besides="zzz") == 3
