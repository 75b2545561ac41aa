"""Several peers and a real scheduler on loopback: pieces flow between peers, faults are isolated."""
from __future__ import annotations

import asyncio
import os

import aiohttp
import grpc
import pytest
from aiohttp import web
from peer_util import push_blob, unique

from remora._proto import remora_scheduler_pb2 as pb
from remora._proto import remora_scheduler_pb2_grpc as pb_grpc
from remora.plugins.peer.config import MIN_PIECE_SIZE
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerServer
from remora.procutil import free_port

BLOB_SIZE = 12 * MIN_PIECE_SIZE + 999


@pytest.fixture
def blob(registry):
    repo = unique("mesh/app")
    data = os.urandom(BLOB_SIZE)
    return repo, push_blob(registry.url, repo, data), data


async def fetch(peer, registry, repo, digest, headers=None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{peer.mirror_url}/v2/{repo}/blobs/{digest}?ns={registry.host}", headers=headers or {}) as r:
            return r.status, await r.read()


def counter(peer, name, **labels) -> float:
    return peer.metrics.registry.get_sample_value(name, labels or None) or 0.0


async def test_children_get_the_blob_from_peers(scheduler, peers, registry, blob):
    repo, digest, data = blob
    seed = await peers("seed", [scheduler.address])
    assert await fetch(seed, registry, repo, digest) == (200, data)
    children = [await peers(f"child{i}", [scheduler.address]) for i in range(3)]
    results = await asyncio.gather(*(fetch(c, registry, repo, digest) for c in children))
    assert all(r == (200, data) for r in results)
    for c in children:
        assert counter(c, "remora_peer_download_bytes_total", source="peer") == BLOB_SIZE, c.cfg.peer_id
        assert counter(c, "remora_peer_download_bytes_total", source="registry") == 0
    assert counter(seed, "remora_peer_download_bytes_total", source="registry") == BLOB_SIZE
    uploaded = sum(counter(p, "remora_peer_upload_bytes_total") for p in [seed, *children])
    assert uploaded == 3 * BLOB_SIZE
    # A range read on a fresh peer takes only the covering pieces, from the mesh.
    lazy = await peers("lazy", [scheduler.address])
    status, body = await fetch(lazy, registry, repo, digest,
                               {"Range": f"bytes={MIN_PIECE_SIZE * 3}-{MIN_PIECE_SIZE * 3 + 9}"})
    assert (status, body) == (206, data[MIN_PIECE_SIZE * 3:MIN_PIECE_SIZE * 3 + 10])
    assert lazy.store.get(digest).have == {3}
    assert counter(lazy, "remora_peer_download_bytes_total", source="peer") == MIN_PIECE_SIZE


async def test_seed_and_children_at_once(scheduler, peers, registry, blob):
    repo, digest, data = blob
    group = [await peers(f"p{i}", [scheduler.address]) for i in range(4)]
    results = await asyncio.gather(*(fetch(p, registry, repo, digest) for p in group))
    assert all(r == (200, data) for r in results)
    from_registry = sum(counter(p, "remora_peer_download_bytes_total", source="registry") for p in group)
    assert from_registry < 2 * BLOB_SIZE, "the mesh must spare the registry"


async def test_scheduler_down_means_straight_from_the_registry(peers, registry, blob):
    repo, digest, data = blob
    p = await peers("alone", [f"127.0.0.1:{free_port()}"], scheduler_timeout=0.5)
    assert await fetch(p, registry, repo, digest) == (200, data)
    assert counter(p, "remora_peer_download_bytes_total", source="registry") == BLOB_SIZE
    assert counter(p, "remora_peer_back_to_source_total", reason="scheduler_down") == 1


class BadParent:
    """A peer that registers with the scheduler, claims to hold the whole blob, and misbehaves."""

    def __init__(self, mode: str, data: bytes = b""):
        self.mode = mode
        self.data = data      # the blob, for modes that serve the right bytes
        self.requests = 0
        self.hung_up = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        index = int(request.match_info["index"])
        size = min(MIN_PIECE_SIZE, BLOB_SIZE - index * MIN_PIECE_SIZE)
        resp = web.StreamResponse(headers={"Content-Length": str(size)})
        await resp.prepare(request)
        if self.mode == "corrupt":
            await resp.write(os.urandom(size))
        elif self.mode == "dies":
            await resp.write(os.urandom(size // 2))
            request.transport.abort()
            return resp
        elif self.mode == "slow":  # healthy but slow: ~2.4 s a piece, 8 steps of 32 KiB
            piece = self.data[index * MIN_PIECE_SIZE:index * MIN_PIECE_SIZE + size]
            try:
                for at in range(0, size, 32 * 1024):
                    await resp.write(piece[at:at + 32 * 1024])
                    await asyncio.sleep(0.3)
            except ConnectionError:  # the child got the piece elsewhere and hung up: the endgame
                self.hung_up += 1
                return resp
        elif self.mode == "crawls":
            try:
                for _ in range(size // 1024):
                    await resp.write(b"x" * 1024)
                    await asyncio.sleep(0.05)
            except ConnectionError:  # the child gave up on us, as it should
                return resp
        await resp.write_eof()
        return resp

    async def start(self, scheduler_address: str, digest: str) -> None:
        app = web.Application()
        app.router.add_get("/pieces/{digest}/{index}", self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.peer_id = f"bad-{self.mode}"
        async with grpc.aio.insecure_channel(scheduler_address) as ch:
            stub = pb_grpc.SchedulerStub(ch)
            await stub.RegisterPeer(pb.RegisterPeerRequest(host=pb.PeerHost(
                peer_id=self.peer_id, host_id=f"host-{self.peer_id}", ip="127.0.0.1", upload_port=port,
                upload_slots=16)))
            await stub.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id=self.peer_id, task_id=digest, done=True,
                                                               finished=range(13)))

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.mark.parametrize("mode", ["corrupt", "dies", "crawls"])
async def test_bad_parent_is_blocklisted_and_the_piece_fetched_elsewhere(scheduler, peers, registry, blob, mode):
    repo, digest, data = blob
    seed = await peers("seed", [scheduler.address])
    assert await fetch(seed, registry, repo, digest) == (200, data)
    bad = BadParent(mode)
    await bad.start(scheduler.address, digest)
    try:
        child = await peers("child", [scheduler.address], piece_timeout=1.0)
        assert await fetch(child, registry, repo, digest) == (200, data)
    finally:
        await bad.stop()
    assert bad.requests >= 1, "the scheduler never offered the bad parent: the test proves nothing"
    reason = {"corrupt": "corrupt", "dies": "connection", "crawls": "timeout"}[mode]
    task = child.tasks.tasks[digest]
    assert task.blocklist == {bad.peer_id: reason}
    assert counter(child, "remora_peer_blocklist_total", reason=reason) == 1
    assert counter(child, "remora_peer_download_bytes_total", source="peer") == BLOB_SIZE
    assert counter(child, "remora_peer_download_bytes_total", source="registry") == 0


async def test_endgame_asks_a_second_parent_for_the_last_pieces(scheduler, peers, registry, blob):
    """The last pieces of a download, in flight at a slow (not crawling) parent, are asked from a second
    parent too; the first copy wins, the slow request is cancelled, and the slow parent is not blamed."""
    repo, digest, data = blob
    seed = await peers("seed", [scheduler.address])
    assert await fetch(seed, registry, repo, digest) == (200, data)
    slow = BadParent("slow", data)
    await slow.start(scheduler.address, digest)
    try:
        # ~100 KiB/s from the slow parent is above the child's crawl threshold: slow, not bad
        child = await peers("child", [scheduler.address], min_piece_rate=32 * 1024)
        assert await fetch(child, registry, repo, digest) == (200, data)
    finally:
        await slow.stop()
    assert slow.requests >= 1, "the scheduler never offered the slow parent: the test proves nothing"
    lost = counter(child, "remora_peer_piece_failures_total", reason="endgame_lost")
    assert lost >= 1 and slow.hung_up >= 1, "no piece was taken over from the slow parent"
    assert child.tasks.tasks[digest].blocklist == {}, "a slow parent that was overtaken is not a bad one"
    assert counter(child, "remora_peer_download_bytes_total", source="peer") == BLOB_SIZE
    assert counter(child, "remora_peer_download_bytes_total", source="registry") == 0


async def test_no_good_parent_left_means_back_to_the_registry(scheduler, peers, registry, blob):
    repo, digest, data = blob
    bad = BadParent("corrupt")
    # The bad peer claims the task first (it says it is complete); its digests are unknown, so the child
    # cannot verify anything it would send and has to get the blob itself.
    await bad.start(scheduler.address, digest)
    try:
        child = await peers("child", [scheduler.address], piece_timeout=0.5)
        assert await fetch(child, registry, repo, digest) == (200, data)
    finally:
        await bad.stop()
    assert counter(child, "remora_peer_download_bytes_total", source="registry") == BLOB_SIZE
    assert child.tasks.tasks[digest].back_to_source


async def test_a_restarted_scheduler_learns_again_what_peers_hold(peers, registry, blob):
    repo, digest, data = blob
    config = SchedulerConfig(keepalive_interval=0.2, random_seed=7)
    first = await SchedulerServer(config, "127.0.0.1:0", insecure_plain=True).start()
    address = first.address
    try:
        seed = await peers("seed", [address])
        assert await fetch(seed, registry, repo, digest) == (200, data)
    finally:
        await first.stop(0)
    second = await SchedulerServer(config, address, insecure_plain=True).start()  # same address, empty state
    try:
        for _ in range(100):  # the seed's keepalive finds out it was forgotten and re-announces
            task = second.state.tasks.get(digest)
            if task and seed.cfg.peer_id in task.peers and task.peers[seed.cfg.peer_id].done:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the restarted scheduler never learned that the seed holds the blob")
        # A peer that says it is done proves nothing to a scheduler that did not elect it (a fake peer
        # says the same): its layout and digests are not taken, and the next peer re-seeds the task.
        assert task.content_length == 0 and task.piece_digests == []
        child = await peers("child", [address])
        assert await fetch(child, registry, repo, digest) == (200, data)
        assert counter(child, "remora_peer_download_bytes_total", source="registry") == BLOB_SIZE
        # ... and from then on the restarted scheduler serves the task from the mesh again.
        late = await peers("late", [address])
        assert await fetch(late, registry, repo, digest) == (200, data)
        assert counter(late, "remora_peer_download_bytes_total", source="peer") == BLOB_SIZE
    finally:
        await second.stop(0)


async def test_lazy_reads_of_parts_nobody_holds_come_from_the_registry_quickly(scheduler, peers, registry, blob):
    repo, digest, data = blob
    first = await peers("first", [scheduler.address], piece_timeout=1.0)
    second = await peers("second", [scheduler.address], piece_timeout=1.0)
    r0 = f"bytes={MIN_PIECE_SIZE * 2}-{MIN_PIECE_SIZE * 2 + 99}"
    assert await fetch(first, registry, repo, digest, {"Range": r0}) == (206, data[MIN_PIECE_SIZE * 2:][:100])
    t0 = asyncio.get_running_loop().time()
    r1 = f"bytes={MIN_PIECE_SIZE * 7}-{MIN_PIECE_SIZE * 7 + 99}"
    assert await fetch(second, registry, repo, digest, {"Range": r1}) == (206, data[MIN_PIECE_SIZE * 7:][:100])
    assert asyncio.get_running_loop().time() - t0 < 3.0, "a lazy read must not wait for the mesh to stall"
    assert second.store.get(digest).have == {7}
    assert counter(second, "remora_peer_download_bytes_total", source="registry") == MIN_PIECE_SIZE
    assert not second.tasks.tasks[digest].back_to_source, "the rest of the task still uses the mesh"


@pytest.fixture
async def slow_registry(registry):
    """The real registry behind a proxy that streams blobs at about 1.3 MB/s (a far-away registry)."""
    async def forward(request: web.Request) -> web.StreamResponse:
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.request(request.method, f"{registry.url}{request.path_qs}",
                                 headers={k: v for k, v in request.headers.items() if k.lower() != "host"}) as up:
                resp = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items() if k.lower() not in ("transfer-encoding", "connection")})
                await resp.prepare(request)
                async for chunk in up.content.iter_chunked(64 * 1024):
                    await resp.write(chunk)
                    await asyncio.sleep(0.05)
                await resp.write_eof()
                return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


async def test_children_wait_for_a_slow_seed_instead_of_hitting_the_registry(scheduler, peers, registry, blob,
                                                                              slow_registry):
    repo, digest, data = blob

    class Via:  # fetch() takes the registry's host from here
        host = slow_registry

    seed = await peers("seed", [scheduler.address], piece_timeout=0.5)
    children = [await peers(f"child{i}", [scheduler.address], piece_timeout=0.5) for i in range(2)]
    for p in (seed, *children):
        p.upstream.allow(slow_registry)   # the mirror fetches only from configured registries
    seed_get = asyncio.ensure_future(fetch(seed, Via, repo, digest))
    # the children come while the seed streams (the whole blob takes ~2.5 s through the proxy)
    for _ in range(200):
        task = seed.tasks.tasks.get(digest)
        if task is not None and task.entry.have:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the seed never started streaming")
    results = await asyncio.gather(seed_get, *(fetch(c, Via, repo, digest) for c in children))
    assert all(r == (200, data) for r in results)
    assert counter(seed, "remora_peer_download_bytes_total", source="registry") == BLOB_SIZE
    for c in children:
        assert counter(c, "remora_peer_download_bytes_total", source="registry") == 0, c.cfg.peer_id
        assert counter(c, "remora_peer_download_bytes_total", source="peer") == BLOB_SIZE
    # Each fresh piece left the seed once (to one child), the other child got it from that child: the
    # seed answered "relayed" to second requests, and the children served each other.
    n_pieces = seed.store.get(digest).n_pieces
    assert counter(seed, "remora_peer_upload_pieces_total", result="fresh") <= n_pieces
    assert counter(seed, "remora_peer_upload_pieces_total", result="relayed") >= 1
    assert sum(counter(c, "remora_peer_upload_bytes_total") for c in children) > 0


async def test_a_fresh_piece_is_uploaded_once_while_the_seed_streams(tmp_path):
    """The upload rule behind "each piece leaves the seed once": while a piece is fresh (this peer got it
    from the registry and is still downloading the blob), a second request gets a fast 503 marked
    relayed, during the upload and for a grace after it; once the blob is complete, anyone gets it."""
    from remora.plugins.peer.config import RELAYED_HEADER, UPLOADS_HEADER
    from remora.plugins.peer.metrics import PeerMetrics
    from remora.plugins.peer.pieces import PieceStore, sha256_digest
    from remora.plugins.peer.upload import UploadServer

    data = os.urandom(2 * MIN_PIECE_SIZE)
    digest = sha256_digest(data)
    store = PieceStore(tmp_path)
    entry = store.open(digest)
    entry.set_layout(len(data), MIN_PIECE_SIZE)
    for i in range(entry.n_pieces):
        piece = data[i * MIN_PIECE_SIZE:(i + 1) * MIN_PIECE_SIZE]
        entry.write_piece(i, piece, sha256_digest(piece))
        entry.commit_piece(i, sha256_digest(piece))
    metrics = PeerMetrics()
    upload = UploadServer(store, metrics, slots=4)
    upload.authorize = lambda digest, headers: asyncio.sleep(0)   # about uploads, not authorization
    streaming = {"on": True}
    upload.fresh = lambda d, i: streaming["on"] and d == digest
    runner = web.AppRunner(upload.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/pieces/{digest}"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/0") as r:
                assert r.status == 200 and await r.read() == data[:MIN_PIECE_SIZE]
                assert r.headers[UPLOADS_HEADER] == "1"
            async with s.get(f"{base}/0") as r:    # the same fresh piece again, within the grace
                assert r.status == 503 and r.headers.get(RELAYED_HEADER) == "1"
            async with s.get(f"{base}/1") as r:    # another fresh piece: not sent to anyone yet
                assert r.status == 200 and await r.read() == data[MIN_PIECE_SIZE:]
            streaming["on"] = False                 # the blob is complete here: the rule no longer applies
            async with s.get(f"{base}/0") as r:
                assert r.status == 200 and await r.read() == data[:MIN_PIECE_SIZE]
    finally:
        await runner.cleanup()
    assert metrics.registry.get_sample_value("remora_peer_upload_pieces_total", {"result": "fresh"}) == 2
    assert metrics.registry.get_sample_value("remora_peer_upload_pieces_total", {"result": "relayed"}) == 1
