"""Back-to-source (plugins/peer/source.py) against registries that answer a Range request their own way.

A registry may ignore Range (200, the whole blob), answer exactly (206), or, like a CDN that aligns
ranges to its blocks, answer 206 with a larger range that contains the one asked: all three must give
the client exactly the bytes it asked for. A 206 that does not say which bytes it holds, or holds
other bytes than asked, must fail cleanly (502) and leave nothing behind: cut into pieces, those bytes
would be served for range reads (no whole-blob digest checks them) and their piece digests published.
"""
from __future__ import annotations

import os

import aiohttp
import pytest
from aiohttp import web
from peer_util import sha, start_peer

from remora.plugins.peer.config import MIN_PIECE_SIZE

BLOB_SIZE = 5 * MIN_PIECE_SIZE + 1234
BLOB = os.urandom(BLOB_SIZE)
DIGEST = sha(BLOB)
BLOCK = 100_000     # the fake CDN's block: not a divisor of the piece size, so its ranges start before the asked one


def _ranged(request) -> tuple[int, int] | None:
    value = request.headers.get("Range", "")
    if not value.startswith("bytes="):
        return None
    a, b = value[len("bytes="):].split("-")
    return int(a), int(b)


async def _registry(answer):
    """A registry on loopback whose blob GETs with Range are answered by ``answer(a, b)`` -> (status,
    Content-Range or None, body)."""
    requests = []

    async def blob(request):
        headers = {"Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(BLOB_SIZE)})
        span = _ranged(request)
        requests.append(span)
        if span is None:
            return web.Response(body=BLOB, headers=headers)
        status, content_range, body = answer(*span)
        if content_range:
            headers["Content-Range"] = content_range
        return web.Response(status=status, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/v2/{name:.+}/blobs/{d}", blob)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}", requests


def aligned(a: int, b: int):
    """A CDN serving whole blocks: the range it sends starts before and ends after the one asked."""
    lo, hi = a // BLOCK * BLOCK, min(BLOB_SIZE - 1, (b // BLOCK + 1) * BLOCK - 1)
    return 206, f"bytes {lo}-{hi}/{BLOB_SIZE}", BLOB[lo:hi + 1]


def exact(a: int, b: int):
    return 206, f"bytes {a}-{b}/{BLOB_SIZE}", BLOB[a:b + 1]


def ignores_range(a: int, b: int):
    return 200, None, BLOB


def from_start(a: int, b: int):
    """Says 206 and tells the truth, but the bytes start at 0: not the range asked."""
    return 206, f"bytes 0-{b - a}/{BLOB_SIZE}", BLOB[:b - a + 1]


def unlabelled(a: int, b: int):
    """206 without Content-Range, bytes from the wrong place: nothing says which bytes these are."""
    return 206, None, BLOB[:b - a + 1]


def other_blob(a: int, b: int):
    """The right bytes per Content-Range, but of a blob of another size: not this blob."""
    return 206, f"bytes {a}-{b}/{BLOB_SIZE + 1}", BLOB[a:b + 1]


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


async def _read(peer, http, host: str, start: int, end: int):
    url = f"{peer.mirror_url}/v2/lib/app/blobs/{DIGEST}?ns={host}"
    async with http.get(url, headers={"Range": f"bytes={start}-{end - 1}"}) as r:
        return r.status, await r.read()


@pytest.mark.parametrize("answer", [aligned, exact, ignores_range], ids=lambda f: f.__name__)
async def test_a_range_read_gets_exactly_its_bytes_however_the_registry_answers_range(tmp_path, http, answer):
    runner, host, requests = await _registry(answer)
    peer = await start_peer(tmp_path, "src")
    try:
        peer.upstream.allow(host)
        start = 2 * MIN_PIECE_SIZE + 100
        status, body = await _read(peer, http, host, start, start + 5000)
        assert (status, body) == (206, BLOB[start:start + 5000])
        assert requests and all(span is not None for span in requests), "the peer asked a range, not the blob"
        entry = peer.store.open(DIGEST)
        assert entry.have == {2}, "only the piece the read needed"
        # The pieces cut from the stream are those of the blob: the whole blob, once complete, verifies.
        url = f"{peer.mirror_url}/v2/lib/app/blobs/{DIGEST}?ns={host}"
        async with http.get(url) as r:
            assert r.status == 200 and await r.read() == BLOB
        assert entry.verified
    finally:
        await peer.stop()
        await runner.cleanup()


@pytest.mark.parametrize("answer", [from_start, unlabelled, other_blob], ids=lambda f: f.__name__)
async def test_a_206_with_other_bytes_than_asked_fails_and_stores_nothing(tmp_path, http, answer):
    runner, host, requests = await _registry(answer)
    peer = await start_peer(tmp_path, "src")
    try:
        peer.upstream.allow(host)
        start = 3 * MIN_PIECE_SIZE + 7
        status, body = await _read(peer, http, host, start, start + 100)
        assert status == 502, body[:200]
        assert b"Content-Range" in body
        assert requests, "the registry was never asked: the test proves nothing"
        entry = peer.store.open(DIGEST)
        assert not entry.have, "bytes of an unknown place in the blob must not be kept as a piece"
    finally:
        await peer.stop()
        await runner.cleanup()


# -- the seed's landing queue (SourceStream._cut_pieces) -------------------------------------------------
class _Body:
    """A registry response body: ``chunks`` handed out one by one, the count of those taken kept."""

    def __init__(self, data: bytes, chunk: int):
        self.chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
        self.taken = 0

    async def iter_any(self):
        for c in self.chunks:
            self.taken += 1
            yield c


class _Resp:
    def __init__(self, body: _Body):
        self.content = body


def _stream(tmp_path, store, pieces: int):
    import asyncio  # noqa: F401  (the fixture's loop runs the coroutine)

    from remora.plugins.peer.pieces import BlobEntry
    from remora.plugins.peer.source import SourceStream

    entry = BlobEntry(tmp_path, DIGEST)
    entry.set_layout(pieces * MIN_PIECE_SIZE, MIN_PIECE_SIZE)
    return SourceStream(None, DIGEST, entry, [], in_flight=set(), from_source=set(), store=store,
                        announce=lambda: None)


async def test_a_slow_landing_does_not_stop_the_registry_stream(tmp_path):
    """Pieces land one at a time, in order (the whole-blob hash is fed in order), while the stream goes on
    into the free buffers: with the first landing held, the reader still takes the stream up to its
    buffers' worth instead of stopping at the second piece."""
    import asyncio
    import hashlib

    from remora.plugins.peer import source as source_mod

    buffers = max(2, min(source_mod.SEED_BUFFERS_MAX, source_mod.SEED_BUFFER_BYTES // MIN_PIECE_SIZE))
    pieces = buffers + 8
    data = os.urandom(pieces * MIN_PIECE_SIZE)
    body = _Body(data, 64 << 10)
    gate = asyncio.Event()
    landed: list[tuple[int, bytes]] = []

    async def store(i, view, t0, whole):
        if not landed:
            await gate.wait()
        whole.update(view)
        landed.append((i, bytes(view)))

    stream = _stream(tmp_path, store, pieces)
    task = asyncio.ensure_future(stream._cut_pieces(_Resp(body), 0, pieces - 1, 0))
    for _ in range(200):
        await asyncio.sleep(0)
    per_piece = MIN_PIECE_SIZE // (64 << 10)
    assert not task.done()
    # read ahead into every buffer while piece 0 waits, and not one piece further (memory stays bounded)
    assert buffers * per_piece <= body.taken <= buffers * per_piece + 1, (body.taken, buffers)
    gate.set()
    digest = await task
    assert [i for i, _ in landed] == list(range(pieces))
    assert b"".join(b for _, b in landed) == data
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()


async def test_a_landing_that_fails_stops_the_stream_with_its_error(tmp_path):
    """A full disk while a piece lands: the stream stops, the error is the store's, nothing hangs."""
    import asyncio

    from remora.errors import StorageError

    pieces = 40
    body = _Body(os.urandom(pieces * MIN_PIECE_SIZE), 256 << 10)
    landed = []

    async def store(i, view, t0, whole):
        if i == 3:
            raise StorageError("disk full")
        await asyncio.sleep(0.01)
        landed.append(i)

    stream = _stream(tmp_path, store, pieces)
    with pytest.raises(StorageError, match="disk full"):
        await asyncio.wait_for(stream._cut_pieces(_Resp(body), 0, pieces - 1, 0), 10)
    assert landed == [0, 1, 2]
    assert body.taken < len(body.chunks), "kept reading after the landing failed"
    assert not stream._in_flight
