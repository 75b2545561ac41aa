"""The download engine's fixed costs (issue 15, the mesh at 16 nodes), each with the behaviour it must keep:
the seed's "done" reaches the scheduler before its result (no second seed), the picker's index follows a
refreshed view, pieces read into reused buffers are still checked before they are stored, and a parent's
connection survives a busy answer."""
from __future__ import annotations

import asyncio
import hashlib
import os
import time

import aiohttp
import grpc
from peer_util import push_blob, unique

from remora.plugins.peer.config import MIN_PIECE_SIZE
from remora.plugins.peer.picker import Holder, PiecePicker
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerServer

BLOB_SIZE = 6 * MIN_PIECE_SIZE + 123


async def fetch(peer, registry, repo, digest) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{peer.mirror_url}/v2/{repo}/blobs/{digest}?ns={registry.host}") as r:
            return r.status, await r.read()


async def test_a_stale_announcement_does_not_make_the_finished_seed_look_unfinished(peers, registry):
    """An announcement sent while the seed still downloaded ("not done") and handled by the scheduler after
    the seed's success report used to mark the seed unfinished again: the scheduler then elected a second
    seed, which fetched the blob from the registry once more (registry egress 1.3x at 16 nodes). Here the
    scheduler handles every "not done" announcement late, as a loaded one does."""
    repo = unique("costs/stale")
    data = os.urandom(BLOB_SIZE)
    digest = push_blob(registry.url, repo, data)
    server = SchedulerServer(SchedulerConfig(random_seed=7), "127.0.0.1:0", insecure_plain=True)
    service = server.service
    announce, report = service.AnnouncePieces, service.ReportTaskResult
    late: list[str] = []
    seen: list[bool] = []   # the seed's "done" at the scheduler after each of its announcements and reports

    def record(request) -> None:
        task = server.state.tasks.get(request.task_id)
        if task is not None and request.peer_id in task.peers:
            seen.append(task.peers[request.peer_id].done)

    async def slow_announce(request, context):
        if not request.done:
            late.append(request.task_id)
            await asyncio.sleep(0.3)
        try:
            return await announce(request, context)
        finally:
            record(request)

    async def recorded_report(request, context):
        try:
            return await report(request, context)
        finally:
            record(request)

    # before start(): gRPC binds the handlers then
    service.AnnouncePieces, service.ReportTaskResult = slow_announce, recorded_report
    await server.start()
    try:
        seed = await peers("seed", [server.address])
        assert await fetch(seed, registry, repo, digest) == (200, data)
        assert late, "the scheduler never got a 'not done' announcement: nothing was tested"
        for _ in range(40):   # the late announcements still in flight (0.3 s each) are handled by then
            await asyncio.sleep(0.05)
        assert True in seen
        after = seen[seen.index(True):]
        assert all(after), f"the finished seed looked unfinished again to the scheduler: {after}"
        task = server.state.tasks[digest]
        assert task.peers[seed.cfg.peer_id].done and not task.needs_seed()
        # A child gets the blob from the seed, not from the registry as a second seed.
        child = await peers("child", [server.address])
        assert await fetch(child, registry, repo, digest) == (200, data)
        served = child.metrics.registry.get_sample_value("remora_peer_download_bytes_total",
                                                         {"source": "registry"}) or 0.0
        assert served == 0
    finally:
        await server.stop(0)


def test_the_picker_index_follows_a_refreshed_view():
    """The relay index is built once per view: picks on the same view reuse it, a refreshed view (new
    holders) is seen at once, and a parent left out (busy) is not asked."""
    picker = PiecePicker(concurrency=4)
    digests = ["sha256:x"] * 8
    view1 = {"a": Holder("a", pieces=frozenset({0}))}
    plan, _ = picker.pick({0, 1, 2}, have=set(), in_flight=set(), digests=digests, parents=view1, blocklist={},
                          running=[], now=0.0)
    assert plan == [(0, "a")]
    # The same view again: nothing new to start from "a" for 1 and 2.
    plan, _ = picker.pick({1, 2}, have=set(), in_flight={0}, digests=digests, parents=view1, blocklist={},
                          running=[(0, "a", 0.0)], now=0.0)
    assert plan == []
    # A refreshed view (the same parent id, new pieces) is used at once.
    view2 = {"a": Holder("a", pieces=frozenset({0, 1})), "b": Holder("b", pieces=frozenset({2}))}
    plan, _ = picker.pick({1, 2}, have=set(), in_flight={0}, digests=digests, parents=view2, blocklist={},
                          running=[(0, "a", 0.0)], now=0.0)
    assert sorted(plan) == [(1, "a"), (2, "b")]
    # "b" busy: the index over the usable parents drops it.
    picker.busy("b", now=1.0)
    plan, _ = picker.pick({2}, have=set(), in_flight=set(), digests=digests, parents=view2, blocklist={},
                          running=[], now=1.0)
    assert plan == []


async def test_pieces_from_parents_are_checked_and_buffers_reused(scheduler, peers, registry):
    """Pieces read into reused buffers and hashed as they arrive land intact (the whole blob matches its
    digest on two children in a row), and the buffers are recycled, bounded."""
    repo = unique("costs/buffers")
    data = os.urandom(BLOB_SIZE)
    digest = push_blob(registry.url, repo, data)
    seed = await peers("seed", [scheduler.address])
    assert await fetch(seed, registry, repo, digest) == (200, data)
    for name in ("c1", "c2"):
        child = await peers(name, [scheduler.address])
        status, body = await fetch(child, registry, repo, digest)
        assert status == 200 and hashlib.sha256(body).hexdigest() == digest.split(":")[1]
        task = child.tasks.tasks[digest]
        assert task.bytes_from["peer"] == BLOB_SIZE
        pool = task.fetcher.buffers
        assert 1 <= len(pool._free) <= pool.keep
        for i in range(task.entry.n_pieces):   # what is on disk is what the seed hashed
            task.entry.verify_piece(i)


async def test_busy_answers_keep_the_connection_to_the_parent(scheduler, peers, registry):
    """A parent with no free upload slot answers 503; the child reads that short answer to its end so the
    connection goes back to the pool: asking again reuses it (no new TLS handshake in a mutual-TLS mesh)."""
    repo = unique("costs/busy")
    data = os.urandom(BLOB_SIZE)
    digest = push_blob(registry.url, repo, data)
    seed = await peers("seed", [scheduler.address], upload_slots=1)
    assert await fetch(seed, registry, repo, digest) == (200, data)
    child = await peers("child", [scheduler.address])
    grant = await child.tasks.access.check(registry.host, repo, "blob", digest, None)   # as the mirror does
    task = child.tasks.task(digest, grant=grant)
    await task.ensure_layout()
    resp = await task.session.parents(())
    parent = next(p for p in resp.parents if p.host.peer_id == seed.cfg.peer_id)
    seed.upload.active = seed.upload.slots          # every slot taken: the seed answers 503 busy
    connector = child.tasks.peer_session.connector
    n = 3
    for i in range(n):
        await task.fetcher.fetch(i, parent)
        assert i not in task.entry.have
    assert child.metrics.piece_failures.labels("busy")._value.get() == n
    conns = [c for conns in connector._conns.values() for c in conns]
    assert len(conns) == 1, f"{len(conns)} pooled connections after {n} busy answers: each busy answer closed one"
    seed.upload.active = 0
    await task.fetcher.fetch(0, parent)
    assert 0 in task.entry.have


async def test_a_scheduler_that_stops_answering_for_a_moment_does_not_send_children_to_the_registry(peers, registry):
    """An overloaded scheduler missing a few GetParents deadlines in the middle of a download used to send
    the child to the registry at once (egress 3x in a 16-node run). The child now keeps fetching from the
    parents it knows for a bounded while (SCHEDULER_GRACE)."""
    repo = unique("costs/flaky")
    data = os.urandom(BLOB_SIZE)
    digest = push_blob(registry.url, repo, data)
    server = SchedulerServer(SchedulerConfig(random_seed=7), "127.0.0.1:0", insecure_plain=True)
    get_parents = server.service.GetParents
    refused: list[str] = []
    window = {"until": 0.0}

    async def flaky(request, context):
        if request.peer_id == "peer-child" and time.monotonic() < window["until"]:
            refused.append(request.peer_id)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded")
        return await get_parents(request, context)

    server.service.GetParents = flaky   # before start(): gRPC binds the handler then
    await server.start()
    try:
        seed = await peers("seed", [server.address])
        assert await fetch(seed, registry, repo, digest) == (200, data)
        child = await peers("child", [server.address])
        # The seed is busy for a second (every upload slot taken): the child, starved, asks for parents
        # again and again meanwhile, and the scheduler does not answer for 1.5 s.
        seed.upload.active = seed.upload.slots
        window["until"] = time.monotonic() + 1.5

        async def free_the_seed():
            await asyncio.sleep(1.0)
            seed.upload.active = 0

        freeing = asyncio.ensure_future(free_the_seed())
        assert await fetch(child, registry, repo, digest) == (200, data)
        await freeing
        assert refused, "the child never asked for parents while the scheduler was not answering"
        sample = child.metrics.registry.get_sample_value
        assert (sample("remora_peer_download_bytes_total", {"source": "registry"}) or 0.0) == 0
        assert (sample("remora_peer_back_to_source_total", {"reason": "scheduler_down"}) or 0.0) == 0
    finally:
        await server.stop(0)
