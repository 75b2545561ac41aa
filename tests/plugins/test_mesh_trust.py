"""Lying peers and damaged stores: real peers, a real scheduler and the real registry on 127.0.0.1.

A fake peer here is our own gRPC client plus an HTTP piece server: it says whatever an attacker would
(that it holds the blob, with piece digests of its own bytes) and serves bytes that match its lies.
"""
from __future__ import annotations

import hashlib
import os

import aiohttp
import grpc
import pytest
from aiohttp import web
from peer_util import push_blob, sha, unique

from remora._proto import remora_scheduler_pb2 as pb
from remora._proto import remora_scheduler_pb2_grpc as pb_grpc
from remora.plugins.peer.config import MIN_PIECE_SIZE

BLOB_SIZE = 12 * MIN_PIECE_SIZE + 999
N_PIECES = 13


@pytest.fixture
def blob(registry):
    repo = unique("trust/app")
    data = os.urandom(BLOB_SIZE)
    return repo, push_blob(registry.url, repo, data), data


async def fetch(peer, registry, repo, digest, headers=None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(
            f"{peer.mirror_url}/v2/{repo}/blobs/{digest}?ns={registry.host}", headers=headers or {}) as r:
        return r.status, await r.read()


def counter(peer, name, **labels) -> float:
    return peer.metrics.registry.get_sample_value(name, labels or None) or 0.0


def piece(data: bytes, i: int) -> bytes:
    return data[i * MIN_PIECE_SIZE:(i + 1) * MIN_PIECE_SIZE]


class FakePeer:
    """Registers, announces the blob with piece digests of ``fake`` bytes, and serves those bytes."""

    def __init__(self, fake: bytes, name: str = "liar"):
        self.fake = fake
        self.peer_id = f"fake-{name}"
        self.requests = 0

    async def handler(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(body=piece(self.fake, int(request.match_info["index"])))

    async def start(self, scheduler_address: str) -> FakePeer:
        app = web.Application()
        app.router.add_get("/pieces/{digest}/{index}", self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.channel = grpc.aio.insecure_channel(scheduler_address)
        self.stub = pb_grpc.SchedulerStub(self.channel)
        await self.stub.RegisterPeer(pb.RegisterPeerRequest(host=pb.PeerHost(
            peer_id=self.peer_id, host_id=f"host-{self.peer_id}", ip="127.0.0.1", upload_port=self.port,
            upload_slots=16)))
        return self

    async def announce(self, digest: str, done: bool) -> None:
        await self.stub.AnnouncePieces(pb.AnnouncePiecesRequest(
            peer_id=self.peer_id, task_id=digest, finished=range(N_PIECES), done=done,
            content_length=BLOB_SIZE, piece_size=MIN_PIECE_SIZE,
            piece_digests=[sha(piece(self.fake, i)) for i in range(N_PIECES)]))

    async def stop(self) -> None:
        await self.channel.close()
        await self.runner.cleanup()


async def test_a_fake_peer_with_bogus_digests_cannot_make_an_honest_peer_serve_its_bytes(scheduler, peers,
                                                                                        registry, blob):
    """Before: the first "done" announcement's digests won; the victim answered a Range read with the
    attacker's bytes (206), every whole GET failed 502, and the liar was never isolated."""
    repo, digest, data = blob
    fake = await FakePeer(os.urandom(BLOB_SIZE)).start(scheduler.address)
    try:
        await fake.announce(digest, done=True)      # first to speak, says it holds everything
        victim = await peers("victim", [scheduler.address], piece_timeout=1.0)
        at = 3 * MIN_PIECE_SIZE
        status, body = await fetch(victim, registry, repo, digest, {"Range": f"bytes={at}-{at + 99}"})
        assert (status, body) == (206, data[at:at + 100]), "a Range read served bytes that are not the blob's"
        assert await fetch(victim, registry, repo, digest) == (200, data)
        # The honest seed's digests now stand: a second child offered the liar catches it at its first
        # piece, and the scheduler isolates the liar from the task for everybody.
        child = await peers("child", [scheduler.address], piece_timeout=1.0)
        assert await fetch(child, registry, repo, digest) == (200, data)
        task = scheduler.state.tasks[digest]
        assert task.digest_source == victim.cfg.peer_id
        assert fake.requests >= 1, "the liar was never offered as a parent: the test proves nothing"
        assert fake.peer_id in task.isolated
        g = await fake.stub.GetParents(pb.GetParentsRequest(peer_id=fake.peer_id, task_id=digest))
        assert g.back_to_source and g.reason == "isolated", "an isolated peer must never be elected seed"
        other = pb_grpc.SchedulerStub(fake.channel)
        await other.RegisterPeer(pb.RegisterPeerRequest(host=pb.PeerHost(
            peer_id="probe", host_id="host-probe", ip="127.0.0.1", upload_port=1)))
        for _ in range(5):
            g = await other.GetParents(pb.GetParentsRequest(peer_id="probe", task_id=digest, limit=8))
            assert fake.peer_id not in {p.host.peer_id for p in g.parents}
    finally:
        await fake.stop()


async def test_a_lying_seed_is_isolated_once_the_blob_contradicts_its_digests(scheduler, peers, registry, blob):
    """A liar that gets elected seed (it asked first) can publish any digests; a child's whole-blob check
    catches it: the GET fails (never 200 with wrong bytes), the liar is isolated and the task re-seeded,
    so the next GET is right. Before: every whole GET failed 502 forever."""
    repo, digest, data = blob
    fake = await FakePeer(os.urandom(BLOB_SIZE), "seed").start(scheduler.address)
    try:
        r = await fake.stub.RegisterTask(pb.RegisterTaskRequest(peer_id=fake.peer_id, task_id=digest))
        assert r.back_to_source   # elected: its word on the digests counts, for now
        await fake.announce(digest, done=False)
        child = await peers("child", [scheduler.address], piece_timeout=1.0)
        status, body = await fetch(child, registry, repo, digest)
        assert status == 502 and body != data, "a blob that contradicts its digest was served"
        assert await fetch(child, registry, repo, digest) == (200, data), "the liar still poisons the task"
        task = scheduler.state.tasks[digest]
        assert fake.peer_id in task.isolated
        assert task.digest_source == child.cfg.peer_id
    finally:
        await fake.stop()


def corrupt_on_disk(peer, digest: str, index: int) -> None:
    path = peer.store.get(digest).piece_path(index)
    raw = bytearray(path.read_bytes())
    raw[100:110] = bytes(b ^ 0xFF for b in raw[100:110])
    path.write_bytes(bytes(raw))


async def test_a_piece_corrupted_on_disk_is_never_served(scheduler, peers, registry, blob):
    """Before: a verified blob was served from its pieces as they were on disk, 200 with wrong bytes."""
    repo, digest, data = blob
    seed = await peers("seed", [scheduler.address])
    assert await fetch(seed, registry, repo, digest) == (200, data)
    corrupt_on_disk(seed, digest, 2)
    at = 2 * MIN_PIECE_SIZE + 50
    assert await fetch(seed, registry, repo, digest, {"Range": f"bytes={at}-{at + 199}"}) == (206, data[at:at + 200])
    corrupt_on_disk(seed, digest, 4)
    assert await fetch(seed, registry, repo, digest) == (200, data)
    assert counter(seed, "remora_peer_store_corrupt_pieces_total") == 2
    # A damaged piece does not leave the node for another peer either: it gets a 404 and the piece from
    # elsewhere (here: the registry), never the damaged bytes.
    corrupt_on_disk(seed, digest, 7)
    child = await peers("child", [scheduler.address], piece_timeout=1.0)
    assert await fetch(child, registry, repo, digest) == (200, data)
    assert counter(seed, "remora_peer_upload_pieces_total", result="corrupt") == 1
    assert counter(seed, "remora_peer_store_corrupt_pieces_total") == 3
    assert hashlib.sha256(seed.store.get(digest).read_piece(2)).digest() == hashlib.sha256(piece(data, 2)).digest()
