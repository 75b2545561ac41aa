"""The piece fetcher (plugins/peer/fetcher.py) against parents on loopback that misbehave one way each.

A real peer's task fetches one piece at a time from a parent that lies (right size, wrong bytes; a
wrong Content-Length), dies mid-piece, stalls, refuses (403), is busy (503) or relayed the piece to
another child (503 + X-Remora-Relayed). Each must end the way the mesh relies on: bad parents
blocklisted with the reason the scheduler is told and nothing stored, busy and relayed ones only left
alone for a moment, a good piece stored and reported, and back to the registry after too many bad
parents. A piece whose digest is unknown is never asked for (its bytes could not be verified).
"""
from __future__ import annotations

import asyncio
import os
import time

import pytest
from aiohttp import web
from peer_util import sha, start_peer

from remora._proto import remora_scheduler_pb2 as pb
from remora.plugins.peer.config import MIN_PIECE_SIZE, RELAYED_HEADER

SIZE = 3 * MIN_PIECE_SIZE
BLOB = os.urandom(SIZE)
DIGEST = sha(BLOB)
PIECE = 1
GOOD = BLOB[PIECE * MIN_PIECE_SIZE:(PIECE + 1) * MIN_PIECE_SIZE]


class Parent:
    """An upload endpoint on loopback that answers every piece request as ``mode`` says."""

    def __init__(self, mode: str):
        self.mode = mode
        self.requests = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _piece(self, request):
        self.requests += 1
        mode = self.mode
        if mode == "busy":
            return web.Response(status=503)
        if mode == "relayed":
            return web.Response(status=503, headers={RELAYED_HEADER: "1"})
        if mode == "denied":
            return web.Response(status=403)
        if mode == "long":
            return web.Response(body=GOOD + b"x")
        if mode == "lies":
            return web.Response(body=bytes(len(GOOD)))
        if mode in ("flips", "trickles"):
            # flips: the right bytes, then one flipped in the middle of the stream, then the right rest;
            # trickles: the right bytes, steadily but far below min_piece_rate (no single read stalls)
            resp = web.StreamResponse(headers={"Content-Length": str(len(GOOD))})
            await resp.prepare(request)
            if mode == "flips":
                mid = len(GOOD) // 2
                await resp.write(GOOD[:mid])
                await asyncio.sleep(0.05)
                await resp.write(bytes([GOOD[mid] ^ 1]) + GOOD[mid + 1:])
                await resp.write_eof()
                return resp
            for at in range(0, len(GOOD), 1000):
                await resp.write(GOOD[at:at + 1000])
                await asyncio.sleep(0.05)
            return resp
        if mode in ("dies", "stalls"):
            resp = web.StreamResponse(headers={"Content-Length": str(len(GOOD))})
            await resp.prepare(request)
            await resp.write(GOOD[:1000])
            if mode == "dies":
                request.transport.abort()
                return resp
            await asyncio.sleep(30)  # the fetcher's deadline ends this (the runner's cleanup otherwise)
            return resp
        return web.Response(body=GOOD)

    async def start(self) -> Parent:
        app = web.Application()
        app.router.add_get("/pieces/{digest}/{index}", self._piece)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    def as_parent(self, peer_id: str | None = None) -> pb.Parent:
        return pb.Parent(host=pb.PeerHost(peer_id=peer_id or f"parent-{self.mode}", ip="127.0.0.1",
                                           upload_port=self.port, upload_slots=4), pieces=[PIECE])

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def task(tmp_path):
    """The task of a real peer (no scheduler) with the blob's layout and piece digests known."""
    peer = await start_peer(tmp_path, "fetch", piece_timeout=0.5, min_piece_rate=64 * MIN_PIECE_SIZE,
                            max_parent_failures=3)
    try:
        t = peer.tasks.task(DIGEST)
        t.entry.set_layout(SIZE, MIN_PIECE_SIZE)
        t.entry.set_piece_digests([sha(BLOB[i * MIN_PIECE_SIZE:(i + 1) * MIN_PIECE_SIZE]) for i in range(3)])
        yield t
    finally:
        await peer.stop()


async def fetch(task, mode: str, peer_id: str | None = None) -> Parent:
    parent = await Parent(mode).start()
    try:
        await asyncio.wait_for(task.fetcher.fetch(PIECE, parent.as_parent(peer_id)), 10)
    finally:
        await parent.stop()
    assert parent.requests == 1
    return parent


def bookkeeping_clean(task) -> bool:
    return +task.picker.load == {} and not task.picker.fetching and not task._in_flight


async def test_a_good_parent_s_piece_is_stored_and_reported(task):
    await fetch(task, "good")
    assert task.entry.have == {PIECE} and task.entry.read_piece(PIECE) == GOOD
    assert task.bytes_from["peer"] == len(GOOD) and task.blocklist == {}
    [result] = task.session._results
    assert result.success and result.piece == PIECE and result.parent_id == "parent-good"
    assert bookkeeping_clean(task)


@pytest.mark.parametrize("mode, reason", [("lies", "corrupt"), ("long", "corrupt"), ("dies", "connection"),
                                          ("stalls", "timeout"), ("denied", "denied"), ("flips", "corrupt"),
                                          ("trickles", "timeout")])
async def test_a_bad_parent_is_blocklisted_and_nothing_is_stored(task, mode, reason):
    t0 = time.monotonic()
    await fetch(task, mode)
    assert time.monotonic() - t0 < 5, "the piece deadline bounds a stalled parent"
    assert task.blocklist == {f"parent-{mode}": reason}
    assert not task.entry.have and not task.entry.piece_path(PIECE).exists(), "unverified bytes on disk"
    [result] = task.session._results
    assert not result.success and result.error == reason
    assert task.m.metrics.registry.get_sample_value("remora_peer_blocklist_total", {"reason": reason}) == 1
    assert bookkeeping_clean(task)
    assert not task.back_to_source, "one bad parent is not enough to give up the mesh"


@pytest.mark.parametrize("mode", ["busy", "relayed"])
async def test_a_busy_or_relaying_parent_is_not_blamed(task, mode):
    before = time.monotonic()
    await fetch(task, mode)
    assert task.blocklist == {} and task.fetcher.failures == 0 and not task.session._results
    if mode == "busy":
        assert task.picker.busy_until["parent-busy"] > before
    else:
        assert task.picker.refused[("parent-relayed", PIECE)] > before
    assert not task.entry.have and bookkeeping_clean(task)


async def test_too_many_bad_parents_send_the_task_to_the_registry(task):
    for n in range(3):
        await fetch(task, "lies", peer_id=f"liar-{n}")
        assert task.back_to_source == (n == 2)
    assert task.source_reason == "parent_failures" and len(task.blocklist) == 3
    # The same bad parent failing again (another of its pieces) does not count twice.
    task.back_to_source = False
    await fetch(task, "lies", peer_id="liar-0")
    assert task.fetcher.failures == 3


async def test_a_piece_without_a_known_digest_is_never_asked_for(task):
    task.entry.piece_digests[PIECE] = ""
    parent = await Parent("good").start()
    try:
        await task.fetcher.fetch(PIECE, parent.as_parent())
    finally:
        await parent.stop()
    assert parent.requests == 0 and not task.entry.have and bookkeeping_clean(task)

