"""What a new user hit: registration only at the first blob, a status that did not say, peers of one host
silently parentless, a store gauge stuck at 0. Real peers, scheduler and registry on 127.0.0.1."""
from __future__ import annotations

import asyncio
import io
import logging
import os

import aiohttp
import pytest
from peer_util import push_blob, unique
from rich.console import Console

from remora.plugins.peer.config import MIN_PIECE_SIZE
from remora.plugins.peer.status import fetch_status, render
from remora.procutil import free_port

BLOB_SIZE = 5 * MIN_PIECE_SIZE + 17


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def status_of(peer) -> dict:
    return await asyncio.to_thread(fetch_status, peer.mirror_url)


def rendered(status: dict) -> str:
    out = io.StringIO()
    render(status, Console(file=out, width=200, color_system=None))
    return out.getvalue()


async def test_a_peer_registers_at_start_up_and_its_status_says_so(scheduler, peers):
    peer = await peers("idle", [scheduler.address])
    # no blob was asked for: the scheduler knows the peer all the same (it can probe it, hand it out)
    await until(lambda: peer.cfg.peer_id in scheduler.state.peers, what="the peer's registration")
    status = await status_of(peer)
    assert status["registered"] == [scheduler.address] and status["registered_everywhere"] is True
    assert "yes (" + scheduler.address in rendered(status)


async def test_status_says_when_the_peer_is_not_registered(peers):
    dead = f"127.0.0.1:{free_port()}"
    peer = await peers("lonely", [dead], scheduler_timeout=0.3)
    status = await status_of(peer)
    assert status["registered"] == [] and status["registered_everywhere"] is False
    text = rendered(status)
    assert "NO with " + dead in text


async def test_peers_sharing_a_host_id_are_told_why_they_get_no_parents(scheduler, peers, registry, caplog):
    repo = unique("newuser/host")
    data = os.urandom(BLOB_SIZE)
    digest = push_blob(registry.url, repo, data)
    caplog.set_level(logging.WARNING)
    seed = await peers("one", [scheduler.address], host_id="same-machine")
    child = await peers("two", [scheduler.address], host_id="same-machine", piece_timeout=0.5)
    await until(lambda: {seed.cfg.peer_id, child.cfg.peer_id} <= set(scheduler.state.peers), what="registrations")
    url = f"/v2/{repo}/blobs/{digest}?ns={registry.host}"
    async with aiohttp.ClientSession() as s:
        for p in (seed, child):
            async with s.get(p.mirror_url + url) as r:
                assert r.status == 200 and await r.read() == data
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # the scheduler says it when the second peer registers, and the child when its parents are filtered
    assert any("same-machine" in m and "--host-id" in m and "registered" in m for m in logged), logged
    assert any("share this peer's host id" in m and "--host-id" in m for m in logged), logged


async def test_store_bytes_gauge_counts_what_was_downloaded(peers, registry):
    repo = unique("newuser/gauge")
    data = os.urandom(BLOB_SIZE)
    digest = push_blob(registry.url, repo, data)
    peer = await peers("gauge", [])
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{peer.mirror_url}/v2/{repo}/blobs/{digest}?ns={registry.host}") as r:
            assert r.status == 200 and await r.read() == data
        async with s.get(f"{peer.mirror_url}/metrics") as r:
            text = await r.text()
    values = [float(line.split()[1]) for line in text.splitlines() if line.startswith("remora_peer_store_bytes ")]
    assert values == [BLOB_SIZE]


async def test_a_child_hanging_up_mid_piece_is_not_an_error(tmp_path, caplog):
    """The endgame cancels the slower copy of a piece: its parent sees a broken pipe mid-sendfile. That
    was logged as ERROR with a traceback (aiohttp's "Error handling request"); it is a debug line now."""
    import socket
    import struct

    from aiohttp import web

    from remora.plugins.peer.metrics import PeerMetrics
    from remora.plugins.peer.pieces import PieceStore, sha256_digest
    from remora.plugins.peer.upload import UploadServer

    piece_size = 8 << 20   # far more than the socket buffers hold: sendfile is mid-piece when the child leaves
    data = os.urandom(piece_size)
    digest = sha256_digest(data)
    store = PieceStore(tmp_path)
    entry = store.open(digest)
    entry.set_layout(len(data), piece_size)
    entry.write_piece(0, data, digest)
    entry.commit_piece(0, sha256_digest(data))
    metrics = PeerMetrics()
    upload = UploadServer(store, metrics, slots=4)
    upload.authorize = lambda digest, headers: asyncio.sleep(0)   # about uploads, not authorization
    runner = web.AppRunner(upload.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    caplog.set_level(logging.DEBUG)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        await asyncio.get_running_loop().sock_sendall(
            sock, f"GET /pieces/{digest}/0 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got = await asyncio.get_running_loop().sock_recv(sock, 4096)
        assert got.startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()   # RST while the parent is still sending
        await until(lambda: metrics.registry.get_sample_value("remora_peer_upload_pieces_total",
                                                              {"result": "aborted"}) == 1, what="the abort")
    finally:
        await runner.cleanup()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
