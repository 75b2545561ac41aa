"""Mutual TLS in the mesh, the registry allow-list and the default listeners (issue 10, parts 1 and 3).

Everything is real and on 127.0.0.1: a cluster CA made with :mod:`remora.pki.ca`, the scheduler's gRPC
server, peers (:class:`PeerDaemon`) with certificates of that CA, the session's registry. Outsiders are
a host with no certificate, with a certificate of another CA, and with a certificate of the right CA
but role ``client`` (or ``scheduler`` at the upload port): each must be refused, and the refusals are
asserted where they happen (handshake, PERMISSION_DENIED, 403), not inferred.
"""
from __future__ import annotations

import asyncio
import inspect
import io
import logging
import os
import ssl
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from peer_util import push_blob, start_peer, unique

from remora._proto import remora_scheduler_pb2 as pb
from remora._proto import remora_scheduler_pb2_grpc as pb_grpc
from remora.pki import ca as pki_ca
from remora.pki import tls
from remora.plugins.peer.config import MIN_PIECE_SIZE
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerServer
from remora.procutil import free_port

BLOB_SIZE = 6 * MIN_PIECE_SIZE + 123
CLUSTER = "tlstest"


class Pki:
    """A cluster CA in a temporary directory and member directories issued from it."""

    def __init__(self, root: Path, cluster: str = CLUSTER):
        self.root = root
        self.ca = pki_ca.init_ca(root / f"ca-{cluster}", cluster=cluster)

    def member(self, role: str, host_id: str, name: str | None = None) -> Path:
        out = self.root / (name or f"{role}-{host_id}")
        pki_ca.write_member(out, self.ca.issue(role, host_id, ips=["127.0.0.1"]), self.ca.bundle_pem)
        return out

    def reissue(self, directory: Path, role: str, host_id: str) -> int:
        issued = self.ca.issue(role, host_id, ips=["127.0.0.1"])
        pki_ca.write_member(directory, issued, self.ca.bundle_pem)
        return issued.cert.serial_number


def files(directory: Path) -> tls.TLSFiles:
    return tls.TLSFiles.in_dir(directory)


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def counter(peer, name, **labels) -> float:
    return peer.metrics.registry.get_sample_value(name, labels or None) or 0.0


async def fetch(peer, registry, repo, digest) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{peer.mirror_url}/v2/{repo}/blobs/{digest}?ns={registry.host}") as r:
            return r.status, await r.read()


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
async def tls_scheduler(pki):
    server = await SchedulerServer(SchedulerConfig(random_seed=3), "127.0.0.1:0", "127.0.0.1:0",
                                   tls=tls.Reloader(files(pki.member("scheduler", "sched-1")))).start()
    yield server
    await server.stop(0)


@pytest.fixture
async def tls_peers(tmp_path, pki):
    started = []

    async def make(name, schedulers, **kw):
        p = await start_peer(tmp_path, name, schedulers, tls_dir=pki.member("peer", f"host-{name}"), **kw)
        started.append(p)
        return p

    yield make
    for p in started:
        await p.stop()


# ------------------------------------------------------------------------------------------- scheduler


async def _call(channel, method: str, request):
    return await getattr(pb_grpc.SchedulerStub(channel), method)(request, timeout=5)


def _requests(peer_id: str, host_id: str) -> list[tuple[str, object]]:
    task = "sha256:" + "ab" * 32
    return [("RegisterPeer", pb.RegisterPeerRequest(host=pb.PeerHost(peer_id=peer_id, host_id=host_id, ip="127.0.0.1",
                                                                      upload_port=1))),
            ("AnnouncePieces", pb.AnnouncePiecesRequest(peer_id=peer_id, task_id=task, finished=[0],
                                                        content_length=MIN_PIECE_SIZE, piece_size=MIN_PIECE_SIZE)),
            ("GetParents", pb.GetParentsRequest(peer_id=peer_id, task_id=task))]


async def test_scheduler_refuses_non_members_and_accepts_members(tmp_path, pki, tls_scheduler):
    address = tls_scheduler.address
    ca_pem = pki.ca.bundle_pem
    other = Pki(tmp_path / "other-pki", cluster=CLUSTER)   # same cluster name, another CA key
    outsiders = {
        "plain": grpc.aio.insecure_channel(address),
        "no certificate": grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_pem)),
        "another CA": grpc.aio.secure_channel(address, _creds_trusting(other.member("peer", "intruder"), ca_pem)),
    }
    client_role = grpc.aio.secure_channel(address, tls.grpc_channel_credentials(files(pki.member("client", "ops"))))
    try:
        for why, channel in outsiders.items():
            for method, request in _requests(f"x-{why[:5]}", "intruder"):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _call(channel, method, request)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (why, method, err.value)
        for method, request in _requests("ops-peer", "ops"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _call(client_role, method, request)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, err.value)
        assert tls_scheduler.state.peers == {} and tls_scheduler.state.tasks == {}
        refused = tls_scheduler.service.metrics.refused
        assert sum(refused.labels(m)._value.get() for m in ("RegisterPeer", "AnnouncePieces", "GetParents")) == 3

        # A member peer registers, announces and asks for parents, for its own host only.
        member = grpc.aio.secure_channel(address, tls.grpc_channel_credentials(files(pki.member("peer", "node-a"))))
        async with member:
            for method, request in _requests("peer-a", "node-a"):
                await _call(member, method, request)
            assert set(tls_scheduler.state.peers) == {"peer-a"}
            assert tls_scheduler.state.tasks["sha256:" + "ab" * 32].peers["peer-a"].finished == {0}
            # ... not in another host's name, and not for a peer id another host registered
            for method, request in _requests("peer-b", "node-b")[:1]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _call(member, method, request)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            other_host = grpc.aio.secure_channel(address,
                                                 tls.grpc_channel_credentials(files(pki.member("peer", "node-b"))))
            async with other_host:
                await _call(other_host, *_requests("peer-b", "node-b")[0])
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _call(member, *_requests("peer-b", "node-b")[1])   # announce as peer-b
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert set(tls_scheduler.state.peers) == {"peer-a", "peer-b"}
            assert "peer-b" not in tls_scheduler.state.tasks["sha256:" + "ab" * 32].peers
    finally:
        for channel in [*outsiders.values(), client_role]:
            await channel.close()
    # the metrics say the gRPC port is mutual TLS
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{tls_scheduler.metrics_address}/metrics") as r:
            assert "remora_scheduler_mesh_tls 1.0" in await r.text()


def _creds_trusting(member_dir: Path, server_ca_pem: bytes):
    """Credentials with a certificate of another CA that still trust OUR scheduler's CA: the handshake can
    only fail because the scheduler refuses the client certificate."""
    m = tls.load_material(files(member_dir))
    return grpc.ssl_channel_credentials(root_certificates=server_ca_pem, private_key=m.key_pem,
                                        certificate_chain=m.cert_pem)


# ------------------------------------------------------------------------------------------ upload port


def _client_ssl(member_dir: Path | None, trust: bytes) -> ssl.SSLContext:
    if member_dir is None:
        ctx = ssl.create_default_context(cadata=trust.decode())
        ctx.check_hostname = False
        return ctx
    ctx = tls.client_context(tls.load_material(files(member_dir)), check_hostname=False)
    ctx.load_verify_locations(cadata=trust.decode())
    return ctx


async def _get_piece(port: int, digest: str, ctx: ssl.SSLContext | None, source: str) -> tuple[int, bytes]:
    """GET piece 0 as a child would, naming the (public) repository its client asked for (X-Remora-Source:
    the per-repository authorization of issue 10 part 2, which comes after the member check)."""
    scheme = "https" if ctx is not None else "http"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx if ctx is not None else False,
                                                                    force_close=True)) as s:
        async with s.get(f"{scheme}://127.0.0.1:{port}/pieces/{digest}/0", headers={"X-Remora-Source": source},
                         timeout=aiohttp.ClientTimeout(total=10)) as r:
            return r.status, await r.read()


async def test_upload_port_serves_pieces_only_to_member_peers(tmp_path, pki, registry, tls_peers):
    repo = unique("tls/upload")
    data = os.urandom(BLOB_SIZE)
    digest = push_blob(registry.url, repo, data)
    holder = await tls_peers("holder", [])
    assert await fetch(holder, registry, repo, digest) == (200, data)
    port = holder.upload_port
    source = f"{registry.host}/{repo}"
    other = Pki(tmp_path / "other-pki")
    trust = pki.ca.bundle_pem
    # no TLS at all; TLS without a certificate; a certificate of another CA: refused in the handshake
    for why, ctx in (("plain HTTP", None), ("no certificate", _client_ssl(None, trust)),
                     ("another CA", _client_ssl(other.member("peer", "intruder"), trust))):
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            status, body = await _get_piece(port, digest, ctx, source)
            pytest.fail(f"{why}: got {status} and {len(body)} bytes")
    # members of the CA that are not peers: through the handshake (a client cert is a TLS client), 403
    for role in ("client", "scheduler"):
        status, body = await _get_piece(port, digest, _client_ssl(pki.member(role, f"not-a-peer-{role}"), trust),
                                        source)
        assert (status, body) == (403, b"cluster members only\n"), role
    # a peer of the cluster gets the piece
    status, body = await _get_piece(port, digest, _client_ssl(pki.member("peer", "friend"), trust), source)
    assert (status, body) == (200, data[:MIN_PIECE_SIZE])
    assert counter(holder, "remora_peer_upload_bytes_total") == MIN_PIECE_SIZE


# ------------------------------------------------------------------------------------ the mesh, rotated


async def _served_serial(port: int, trust_dir: Path) -> int:
    """The serial of the certificate the upload port presents to a new connection now."""
    ctx = tls.client_context(tls.load_material(files(trust_dir)), check_hostname=False)
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        return tls.ssl_identity(writer.get_extra_info("ssl_object")).serial
    finally:
        writer.close()


async def test_members_exchange_pieces_over_tls_and_survive_rotation(tmp_path, pki, registry, tls_scheduler, tls_peers):
    sched = [tls_scheduler.address]
    seed = await tls_peers("seed", sched)
    child = await tls_peers("child", sched)
    late = await tls_peers("late", sched)
    for p in (seed, child, late):
        assert p.status()["mesh"].startswith("mTLS (cluster tlstest, peer host-")
        await wait_for(lambda p=p: p.status()["registered_everywhere"], 15, f"{p.cfg.peer_id} registered")

    async def mesh_round(parent, kid, tag):
        repo = unique(f"tls/{tag}")
        data = os.urandom(BLOB_SIZE)
        digest = push_blob(registry.url, repo, data)
        before = counter(kid, "remora_peer_download_bytes_total", source="peer")
        assert await fetch(parent, registry, repo, digest) == (200, data)
        assert await fetch(kid, registry, repo, digest) == (200, data)
        assert counter(kid, "remora_peer_download_bytes_total", source="peer") - before == BLOB_SIZE, tag

    await mesh_round(seed, child, "before")
    # The child's certificate is replaced in place (new key, new serial); nothing restarts.
    old = await _served_serial(child.upload_port, pki.root / "peer-host-seed")
    new = pki.reissue(pki.root / "peer-host-child", "peer", "host-child")
    assert new != old
    async def serving_new():
        return await _served_serial(child.upload_port, pki.root / "peer-host-seed") == new

    await wait_for(serving_new, 15,
                   "the child's upload port to present the new certificate")
    await wait_for(lambda: child.tls.generation == 2, 15, "the child's clients to reload")
    # as a parent (server side, new certificate) and as a child (client side: pieces and scheduler)
    await mesh_round(child, late, "child-serves")
    await mesh_round(seed, child, "child-fetches")
    assert child.sched._generation == child.tls.generation, "scheduler channels re-made with the new certificate"
    assert tls_scheduler.service.metrics.refused.labels("RegisterPeer")._value.get() == 0


# ------------------------------------------------------------------------------------------- registries


@pytest.fixture
async def counting_listener():
    """A TCP listener on 127.0.0.1 that counts the connections made to it (and answers nothing)."""
    accepted = []

    async def on_connect(reader, writer):
        accepted.append(writer.get_extra_info("peername"))
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], accepted
    server.close()
    await server.wait_closed()


async def test_ns_outside_the_allow_list_is_403_and_never_dialled(tmp_path, registry, counting_listener):
    port, accepted = counting_listener
    target = f"127.0.0.1:{port}"
    repo = unique("ns/app")
    data = os.urandom(BLOB_SIZE)
    digest = push_blob(registry.url, repo, data)
    peer = await start_peer(tmp_path, "ns", upstream=registry.host, registries=[])
    try:
        assert peer.status()["registries"] == [registry.host]
        async with aiohttp.ClientSession() as s:
            # the blob is cached: even then another registry's name is refused, not served
            async with s.get(f"{peer.mirror_url}/v2/{repo}/blobs/{digest}") as r:   # the default upstream
                assert r.status == 200 and await r.read() == data
            for path in (f"/v2/{repo}/blobs/{digest}?ns={target}", f"/v2/{repo}/manifests/v1?ns={target}",
                         f"/v2/{repo}/blobs/sha256:{'0' * 64}?ns={target}"):
                for method in ("GET", "HEAD"):
                    async with s.request(method, peer.mirror_url + path) as r:
                        body = await r.text()
                        assert r.status == 403, (method, path, r.status, body)
                        assert str(port) not in body
            async with s.get(f"{peer.mirror_url}/v2/{repo}/manifests/v1",
                             headers={"X-Remora-Upstream": target}) as r:
                assert r.status == 403 and "not allowed" in await r.text()
        # nothing was dialled (allow a moment for a connection that would be in flight)
        await asyncio.sleep(0.2)
        assert accepted == []
        # the same host, once configured, is dialled
        peer.upstream.allow(target)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{peer.mirror_url}/v2/{repo}/manifests/v1?ns={target}") as r:
                assert r.status == 502
        assert len(accepted) >= 1
    finally:
        await peer.stop()


async def test_unreachable_registry_error_names_no_address(tmp_path, registry):
    dead_port = free_port()
    dead = f"127.0.0.1:{dead_port}"
    repo = unique("ns/dead")
    digest = push_blob(registry.url, repo, os.urandom(1000))
    peer = await start_peer(tmp_path, "dead", registries=[dead])
    try:
        async with aiohttp.ClientSession() as s:
            for path in (f"/v2/{repo}/blobs/{digest}?ns={dead}", f"/v2/{repo}/manifests/v1?ns={dead}"):
                async with s.get(peer.mirror_url + path) as r:
                    body = await r.text()
                    assert r.status == 502, body
                    assert (await r.json())["errors"][0]["code"] == "UNAVAILABLE"
                    for leak in (str(dead_port), "127.0.0.1", "Errno", "Connect", "refused", "http://"):
                        assert leak not in body, (leak, body)
    finally:
        await peer.stop()


# -------------------------------------------------------------------------------- plain mode and listeners


async def test_plain_mode_says_so(tmp_path, caplog, registry):
    from rich.console import Console

    from remora.plugins.peer.status import render

    caplog.set_level(logging.WARNING)
    sched = await SchedulerServer(SchedulerConfig(), "127.0.0.1:0", "127.0.0.1:0", insecure_plain=True).start()
    peer = await start_peer(tmp_path, "plain", [sched.address])
    try:
        status = peer.status()
        assert status["mesh"] == "PLAIN (insecure)" and status["mesh_tls"] is False
        console = Console(record=True, width=200, file=io.StringIO())
        render(status, console)
        text = console.export_text()
        assert "mesh" in text and "PLAIN (insecure)" in text
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("mesh: PLAIN (insecure)" in w for w in warnings) == 2, warnings   # scheduler and peer
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{sched.metrics_address}/metrics") as r:
                assert "remora_scheduler_mesh_tls 0.0" in await r.text()
        # and the plain upload port does serve anyone: that is what the flag says
        assert peer.upload_port
    finally:
        await peer.stop()
        await sched.stop(0)
    with pytest.raises(Exception, match="--insecure-plain-mesh"):
        SchedulerServer(SchedulerConfig(), "127.0.0.1:0")


async def test_default_listeners_are_loopback_or_the_node_address(tmp_path):
    import argparse

    from remora.plugins.peer.cli import build_config, register_peer
    from remora.plugins.scheduler.cli import register_scheduler

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register_peer(sub)
    register_scheduler(sub)
    sched_args = parser.parse_args(["scheduler", "--insecure-plain-mesh"])
    assert sched_args.listen == "127.0.0.1:8002" and sched_args.metrics_listen == "127.0.0.1:8003"
    args = parser.parse_args(["peer", "--insecure-plain-mesh", "--data-dir", str(tmp_path / "d")])
    cfg = build_config(args)
    assert cfg.listen == ("127.0.0.1", 65001) and cfg.upload_listen == ("", 65002)
    # no host given: the upload port binds the advertised address, else the route to the scheduler,
    # else loopback; never every address
    peer = await start_peer(tmp_path, "bind", upload_listen=("", 0))
    try:
        runner = peer._runners[0]
        bound = {s.getsockname()[0] for site in runner.sites for s in site._server.sockets}
        assert bound == {"127.0.0.1"}, bound
    finally:
        await peer.stop()
    advertised = await start_peer(tmp_path, "adv", upload_listen=("", 0), advertise_ip="127.0.0.2")
    try:
        bound = {s.getsockname()[0] for site in advertised._runners[0].sites for s in site._server.sockets}
        assert bound == {"127.0.0.2"} and advertised.host.ip == "127.0.0.2"
    finally:
        await advertised.stop()
