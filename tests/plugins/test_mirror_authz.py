"""Authorization per repository at the mirror and in the mesh (issue 10, part 2), with two tenants.

A real distribution with ``auth: token`` and a real JWT token server (tests/core/regclient_tokenserver.py):
tenant A (alice) may read ``team-a/app``, tenant B (bob) ``team-b/app``, the nodes' own credentials
("node") read everything. The peers reach the registry through a counting proxy on loopback, so the
tests see every blob GET the registry served. Peers on 127.0.0.1, a real scheduler.

What must hold: the node's credentials fetch but never authorize; a client gets a manifest or blob of a
repository only if the registry would give it that repository, whatever the peers already hold; tenant B
gets no byte of tenant A's private blob through the mirror under another repository name, another
``?ns=`` registry, the upload port of a peer, or a peer without credentials; and tenant A's pulls still go
peer to peer.
"""
from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import requests
from aiohttp import web
from peer_util import RegistryProxy, make_layer, start_peer, unique
from test_peer_containerd import SID_CONTAINERD, containerd, ctr  # noqa: F401 (a fixture)

from remora.plugins.peer.access import SOURCE_HEADER
from remora.plugins.peer.config import MIN_PIECE_SIZE
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerServer
from remora.registry.client import RegistryClient
from remora_testing.registry import LocalRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "core"))
from regclient_tokenserver import TokenAuthRegistry, TokenServer

USERS = {"alice": ("alice-pw", {"team-a/app"}), "bob": ("bob-pw", {"team-b/app"}), "node": ("node-pw", {"*"})}
BLOB_SIZE = 6 * MIN_PIECE_SIZE + 4321


@pytest.fixture(autouse=True)
def no_env_credentials(monkeypatch):
    monkeypatch.delenv("REMORA_USERNAME", raising=False)
    monkeypatch.delenv("REMORA_PASSWORD", raising=False)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push(host: str, user: str, repo: str, data: bytes, tmp: Path) -> str:
    digest = sha(data)
    path = tmp / digest[7:]
    path.write_bytes(data)
    RegistryClient(host, credentials=(user, USERS[user][0])).push_blob(repo, digest, len(data), path)
    return digest


def push_manifest(host: str, user: str, repo: str, tag: str, layer: str, size: int, tmp: Path) -> bytes:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_digest = push(host, user, repo, config, tmp)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": config_digest, "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       "digest": layer, "size": size}]}).encode()
    RegistryClient(host, credentials=(user, USERS[user][0])).push_manifest(
        repo, tag, manifest, "application/vnd.oci.image.manifest.v1+json")
    return manifest


def push_image_manifest(host: str, user: str, repo: str, tag: str, layer: bytes, layer_digest: str, tmp: Path):
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers", "diff_ids": [sha(gzip.decompress(layer))]}}).encode()
    config_digest = push(host, user, repo, config, tmp)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": config_digest, "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       "digest": layer_digest, "size": len(layer)}]}).encode()
    RegistryClient(host, credentials=(user, USERS[user][0])).push_manifest(
        repo, tag, manifest, "application/vnd.oci.image.manifest.v1+json")


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    """The token registry with a private blob (and image) of tenant A, one of tenant B, and a blob both
    tenants pushed (a shared base layer: the legitimate cross-repository case)."""
    work = tmp_path_factory.mktemp("authz")
    server = TokenServer(USERS, work).start()
    reg = TokenAuthRegistry(work / "registry", server)
    open_reg = LocalRegistry(root=work / "open")   # no auth at all: the registry tenant B controls
    try:
        reg.start()
        open_reg.start()
        a_blob, b_blob, shared = os.urandom(BLOB_SIZE), os.urandom(BLOB_SIZE), os.urandom(2 * MIN_PIECE_SIZE)
        t = {"reg": reg, "server": server, "open": open_reg, "a": a_blob, "b": b_blob, "shared": shared,
             "a_digest": push(reg.host, "alice", "team-a/app", a_blob, work),
             "b_digest": push(reg.host, "bob", "team-b/app", b_blob, work),
             "shared_digest": push(reg.host, "alice", "team-a/app", shared, work)}
        push(reg.host, "bob", "team-b/app", shared, work)
        t["manifest"] = push_manifest(reg.host, "alice", "team-a/app", "v1", t["a_digest"], BLOB_SIZE, work)
        # a real image (an unpackable layer) for containerd
        layer = make_layer({"etc/tenant": b"tenant A's secret\n", "srv/data": os.urandom(900_000)})
        t["image_layer"], t["image_layer_digest"] = layer, push(reg.host, "alice", "team-a/app", layer, work)
        push_image_manifest(reg.host, "alice", "team-a/app", "img", layer, t["image_layer_digest"], work)
        yield t
    finally:
        open_reg.stop()
        reg.stop()
        server.stop()


class CountingProxy(RegistryProxy):
    """The registry as the peers see it: every request passed through, blob GETs counted per digest
    (and their body bytes), so a test knows how often the registry itself served a blob."""

    def __init__(self, target: str):
        super().__init__(target)
        self.blob_gets: Counter = Counter()
        self.blob_bytes: Counter = Counter()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        status, out, data, length = await self.forward(request)
        if request.method == "GET" and "/blobs/sha256:" in request.path and status in (200, 206):
            digest = request.path.rsplit("/", 1)[1]
            self.blob_gets[digest] += 1
            self.blob_bytes[digest] += len(data)
        return await self.respond(request, status, out, data, length)


def docker_config(path: Path, host: str | None) -> Path:
    auths = {host: {"auth": base64.b64encode(b"node:node-pw").decode()}} if host else {}
    path.write_text(json.dumps({"auths": auths}))
    return path


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{USERS[user][0]}".encode()).decode()


def bearer(t, user: str, repo: str) -> str:
    """What containerd does after the mirror's 401: a token from the registry's realm for the scope."""
    r = requests.get(t["server"].realm, params={"service": "remora-test-registry", "scope": f"repository:{repo}:pull"},
                     auth=(user, USERS[user][0]), timeout=10)
    r.raise_for_status()
    return f"Bearer {r.json()['token']}"


@pytest.fixture
async def mesh(tmp_path, tenants):
    """A scheduler, the counting proxy in front of the registry, and three peers: two with the node's
    credentials (seed, child), one without any (nocred). ``?ns=`` may name the registry or the open one."""
    proxy = await CountingProxy(tenants["reg"].host).start()
    sched = await SchedulerServer(SchedulerConfig(), "127.0.0.1:0", insecure_plain=True).start()
    peers = {}
    try:
        for name, creds in (("seed", True), ("child", True), ("nocred", False)):
            peers[name] = await start_peer(
                tmp_path, name, [sched.address], upstream=proxy.host, registries=[tenants["open"].host],
                insecure_plain_mesh=True,
                registry_config=docker_config(tmp_path / f"{name}.json", proxy.host if creds else None))
        yield {"proxy": proxy, "sched": sched, **peers}
    finally:
        for p in peers.values():
            await p.stop()
        await sched.stop(0)
        await proxy.stop()


async def fetch(peer, path: str, auth: str | None = None, method: str = "GET", **headers):
    if auth:
        headers["Authorization"] = auth
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.request(method, f"{peer.mirror_url}{path}", headers=headers) as r:
            return r.status, await r.read(), dict(r.headers)


def held(peer, digest: str) -> int:
    """Pieces of ``digest`` in the peer's store."""
    entry = peer.store.get(digest)
    return len(entry.have) if entry is not None else 0


async def test_anonymous_client_gets_the_registrys_challenge_even_when_the_peer_holds_the_blob(mesh, tenants,
                                                                                             caplog):
    caplog.set_level(logging.DEBUG)
    seed, proxy = mesh["seed"], mesh["proxy"]
    a = tenants["a_digest"]
    # Tenant A pulls through the seed (its own Basic credentials): the seed now holds the blob.
    status, body, _ = await fetch(seed, f"/v2/team-a/app/blobs/{a}", basic("alice"))
    assert (status, body == tenants["a"]) == (200, True)
    assert held(seed, a) == seed.store.get(a).n_pieces

    for kind, ref in (("manifests", "v1"), ("manifests", sha(tenants["manifest"])), ("blobs", a)):
        for method in ("GET", "HEAD"):
            status, body, headers = await fetch(seed, f"/v2/team-a/app/{kind}/{ref}", method=method)
            assert status == 401, (kind, method, status)
            assert tenants["a"][:4096] not in body and b"schemaVersion" not in body
            # The registry's own challenge: containerd gets its token there, not from the mirror.
            challenge = headers["WWW-Authenticate"]
            assert challenge.startswith("Bearer ") and f'realm="{tenants["server"].realm}"' in challenge
            assert 'scope="repository:team-a/app:pull"' in challenge
    status, _, _ = await fetch(seed, f"/v2/team-a/app/blobs/{a}", Range="bytes=0-99")
    assert status == 401, "a lazy range read without credentials"

    # The auth dance containerd does with that challenge: a token for the scope, then Bearer.
    token = bearer(tenants, "alice", "team-a/app")
    status, body, _ = await fetch(seed, "/v2/team-a/app/manifests/v1", token,
                                  Accept="application/vnd.oci.image.manifest.v1+json")
    assert (status, body) == (200, tenants["manifest"]), body
    status, body, _ = await fetch(seed, f"/v2/team-a/app/blobs/{a}", token, Range="bytes=100-199")
    assert (status, body) == (206, tenants["a"][100:200])
    # A token the realm gave bob for team-a/app grants nothing (the token server leaves the scope out).
    status, _, _ = await fetch(seed, f"/v2/team-a/app/blobs/{a}", bearer(tenants, "bob", "team-a/app"))
    assert status == 401
    assert proxy.blob_gets[a] == 1, "one registry GET, by the node, however many clients asked"
    # The answers are cached: asking again costs the registry nothing.
    asked = seed.tasks.access.asked
    await fetch(seed, f"/v2/team-a/app/blobs/{a}", token, Range="bytes=0-9")
    assert seed.tasks.access.asked == asked
    # Credentials are neither logged nor kept in clear (the cache is keyed by an HMAC of the header).
    secrets = [basic("alice"), basic("alice")[6:], token[7:], "alice-pw"]
    assert not any(x in r.getMessage() for r in caplog.records for x in secrets)
    assert not any(x in repr(k) for k in seed.tasks.access._cache for x in secrets)
    state = seed.cfg.data_dir / "access-anonymous.json"
    assert not state.exists() or not any(x in state.read_text() for x in secrets)


async def test_registry_unreachable_an_earlier_yes_stands_everyone_else_is_refused(mesh, tenants):
    seed, proxy = mesh["seed"], mesh["proxy"]
    a = tenants["a_digest"]
    assert (await fetch(seed, f"/v2/team-a/app/blobs/{a}", basic("alice")))[:2] == (200, tenants["a"])
    await proxy.stop()   # the registry is gone: no answer at all
    status, body, _ = await fetch(seed, f"/v2/team-a/app/blobs/{a}", basic("alice"), Range="bytes=5-9")
    assert (status, body) == (206, tenants["a"][5:10]), "the registry said yes to alice moments ago"
    for auth, repo in ((None, "team-a/app"), (basic("bob"), "team-b/app"), (basic("bob"), "team-a/app")):
        status, body, _ = await fetch(seed, f"/v2/{repo}/blobs/{a}", auth)
        assert status == 502 and tenants["a"][:64] not in body, (repo, status)


async def test_tenant_b_gets_no_byte_of_tenant_a_by_any_path(mesh, tenants):
    seed, child, nocred, proxy = mesh["seed"], mesh["child"], mesh["nocred"], mesh["proxy"]
    a, reg, open_host = tenants["a_digest"], proxy.host, tenants["open"].host
    assert (await fetch(seed, f"/v2/team-a/app/blobs/{a}", basic("alice")))[0] == 200   # the seed holds it
    secret = tenants["a"]
    bob_b = bearer(tenants, "bob", "team-b/app")

    def leaked(body: bytes) -> bool:
        return any(secret[i:i + 64] in body for i in range(0, len(secret), MIN_PIECE_SIZE))

    attempts = [
        # the mirror, under tenant B's own repository (B's Basic and B's token), under A's repository
        (seed, f"/v2/team-b/app/blobs/{a}", basic("bob"), {}),
        (seed, f"/v2/team-b/app/blobs/{a}", bob_b, {"Range": "bytes=0-1023"}),
        (seed, f"/v2/team-a/app/blobs/{a}", basic("bob"), {}),
        (seed, f"/v2/team-a/app/blobs/{a}", bob_b, {}),
        # another registry, one B controls and that accepts anyone: by ?ns= and by header
        (seed, f"/v2/team-b/app/blobs/{a}?ns={open_host}", None, {}),
        (seed, f"/v2/anything/blobs/{a}?ns={open_host}", basic("bob"), {}),
        (seed, f"/v2/team-b/app/blobs/{a}", None, {"X-Remora-Upstream": open_host}),
        # a peer without credentials, and a peer that never saw the blob
        (nocred, f"/v2/team-a/app/blobs/{a}", None, {}),
        (nocred, f"/v2/team-b/app/blobs/{a}", basic("bob"), {}),
        (child, f"/v2/team-b/app/blobs/{a}", bob_b, {}),
        (child, f"/v2/team-a/app/blobs/{a}", basic("bob"), {}),
    ]
    for peer, path, auth, headers in attempts:
        for method in ("GET", "HEAD"):
            status, body, _ = await fetch(peer, path, auth, method=method, **headers)
            assert status in (401, 403, 404) and not leaked(body), (peer.cfg.peer_id, path, method, status)
    assert held(nocred, a) == 0 and held(child, a) == 0, "nothing fetched for a client that may not read it"

    # The upload port of the seed: the digest and a piece index are not enough.
    upload = f"http://127.0.0.1:{seed.upload_port}/pieces/{a}/0"
    tries = [{}, {SOURCE_HEADER: f"{reg}/team-b/app", "Authorization": bob_b},
             {SOURCE_HEADER: f"{reg}/team-a/app", "Authorization": bob_b},
             {SOURCE_HEADER: f"{reg}/team-a/app", "Authorization": basic("bob")},
             {SOURCE_HEADER: f"{reg}/team-a/app"},
             {SOURCE_HEADER: f"{open_host}/team-b/app"},
             {SOURCE_HEADER: "evil.example:5000/team-a/app", "Authorization": basic("alice")}]
    async with aiohttp.ClientSession() as s:
        for headers in tries:
            async with s.get(upload, headers=headers) as r:
                body = await r.read()
                assert r.status == 403 and not leaked(body), (headers.get(SOURCE_HEADER), r.status)
        # Positive control: tenant A's proof opens it.
        async with s.get(upload, headers={SOURCE_HEADER: f"{reg}/team-a/app",
                                          "Authorization": bearer(tenants, "alice", "team-a/app")}) as r:
            assert r.status == 200 and await r.read() == secret[:MIN_PIECE_SIZE]
    assert proxy.blob_gets[a] == 1
    assert held(nocred, a) == 0 and held(child, a) == 0


async def test_tenant_a_pulls_still_go_peer_to_peer_even_through_a_peer_without_credentials(mesh, tenants):
    seed, child, nocred, proxy = mesh["seed"], mesh["child"], mesh["nocred"], mesh["proxy"]
    a = tenants["a_digest"]
    assert (await fetch(seed, f"/v2/team-a/app/blobs/{a}", basic("alice")))[:2] == (200, tenants["a"])
    # The child's client shows a token; the peer without credentials' client its Basic credentials: each
    # peer forwards what its client proved to the parents, which check it with the registry.
    assert (await fetch(child, f"/v2/team-a/app/blobs/{a}", bearer(tenants, "alice", "team-a/app")))[:2] == \
        (200, tenants["a"])
    assert (await fetch(nocred, f"/v2/team-a/app/blobs/{a}", basic("alice")))[:2] == (200, tenants["a"])
    for peer in (child, nocred):
        m = peer.metrics.registry.get_sample_value
        assert m("remora_peer_download_bytes_total", {"source": "peer"}) == BLOB_SIZE
        assert (m("remora_peer_download_bytes_total", {"source": "registry"}) or 0) == 0
    assert proxy.blob_gets[a] == 1, "the registry served the blob once, to the seed"
    assert all(p.tasks.tasks[a].grant is None for p in (child, nocred)), "no client credential kept once done"
    assert proxy.blob_bytes[a] <= 1.05 * BLOB_SIZE
    # The legitimate cross-repository case: a layer both tenants pushed is served to bob under his
    # repository from what alice's pull stored (the registry says bob may read it there).
    shared = tenants["shared_digest"]
    assert (await fetch(seed, f"/v2/team-a/app/blobs/{shared}", basic("alice")))[:2] == (200, tenants["shared"])
    assert (await fetch(seed, f"/v2/team-b/app/blobs/{shared}", basic("bob")))[:2] == (200, tenants["shared"])
    assert (await fetch(seed, f"/v2/team-b/app/blobs/{shared}"))[0] == 401
    assert proxy.blob_gets[shared] == 1


async def test_basic_auth_registry_anonymous_refused_and_the_mesh_forwards_basic(tmp_path, auth_registry):
    """htpasswd (Basic) registry: the mirror passes the Basic challenge through, checks the client's Basic
    credentials, and a child without node credentials gets the pieces from the seed with them."""
    from peer_util import push_blob

    AUTH_USER, AUTH_PASSWORD = "remora", "s3cret-pass"   # tests/conftest.py's auth_registry user
    repo = unique("authz/basic")
    data = os.urandom(3 * MIN_PIECE_SIZE + 17)
    digest = push_blob(auth_registry.url, repo, data, auth=(AUTH_USER, AUTH_PASSWORD))
    cred = "Basic " + base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    node = tmp_path / "node.json"
    node.write_text(json.dumps({"auths": {auth_registry.host: {"auth": base64.b64encode(
        f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()}}}))
    sched = await SchedulerServer(SchedulerConfig(), "127.0.0.1:0", insecure_plain=True).start()
    peers = []
    try:
        seed = await start_peer(tmp_path, "bseed", [sched.address], upstream=auth_registry.host,
                                insecure_plain_mesh=True, registry_config=node)
        peers.append(seed)
        child = await start_peer(tmp_path, "bchild", [sched.address], upstream=auth_registry.host,
                                 insecure_plain_mesh=True, registry_config=docker_config(tmp_path / "none.json", None))
        peers.append(child)
        assert (await fetch(seed, f"/v2/{repo}/blobs/{digest}", cred))[:2] == (200, data)
        status, body, headers = await fetch(seed, f"/v2/{repo}/blobs/{digest}")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ") and data[:64] not in body
        wrong = "Basic " + base64.b64encode(f"{AUTH_USER}:nope".encode()).decode()
        assert (await fetch(seed, f"/v2/{repo}/blobs/{digest}", wrong))[0] == 401
        assert (await fetch(child, f"/v2/{repo}/blobs/{digest}", wrong))[0] == 401
        assert held(child, digest) == 0
        assert (await fetch(child, f"/v2/{repo}/blobs/{digest}", cred))[:2] == (200, data)
        m = child.metrics.registry.get_sample_value
        assert m("remora_peer_download_bytes_total", {"source": "peer"}) == len(data)
    finally:
        for p in peers:
            await p.stop()
        await sched.stop(0)


async def test_ctr_pulls_a_private_image_through_the_mirror_with_the_registrys_token(tmp_path, tenants, mesh,
                                                                                     containerd):  # noqa: F811
    """containerd (1.6 and 2.1) with the peer as hosts.toml mirror: the mirror's 401 carries the registry's
    challenge, containerd gets a token from the registry's realm with the pull's credentials and comes
    back with it. Tenant A's pull is served by the mirror; tenant B's fails and reads nothing."""
    from remora.plugins.peer import hoststoml

    seed, proxy = mesh["seed"], mesh["proxy"]
    hosts = tmp_path / "certs.d"
    hoststoml.write(hosts, [proxy.host], seed.mirror_url,
                    containerd="1.6" if containerd["version"] == "1.6" else "2.x")
    ref = f"{proxy.host}/team-a/app:img"
    layer = tenants["image_layer_digest"]

    def pull(user: str):
        return ctr(containerd, "images", "pull", "--user", f"{user}:{USERS[user][0]}", "--hosts-dir", str(hosts),
                   ref, check=False)

    out = await asyncio.to_thread(pull, "bob")
    assert out.returncode != 0
    assert proxy.blob_gets[layer] == 0 and held(seed, layer) == 0
    out = await asyncio.to_thread(pull, "alice")
    assert out.returncode == 0, out.stderr.decode()
    assert ctr(containerd, "content", "get", layer).stdout == tenants["image_layer"]
    served = seed.metrics.registry.get_sample_value("remora_peer_served_bytes_total", {"kind": "blob"})
    assert served >= len(tenants["image_layer"]), "the layer came through the mirror, not the fallback host"
    assert proxy.blob_gets[layer] == 1, "fetched once, by the peer"
    denied = seed.metrics.registry.get_sample_value("remora_peer_mirror_requests_total",
                                                    {"kind": "manifest", "status": "401"})
    assert denied >= 1, "containerd was challenged by the mirror first"


async def test_the_snapshotters_lazy_reads_authenticate_to_the_local_peer(mesh, tenants):
    """What the snapshotter sends (snapshotter/sources.py, HttpBlobSource): first nothing, then, on the
    mirror's pass-through challenge, a token from the registry's realm got with the image's credentials."""
    from remora.errors import AuthError
    from remora.snapshotter.sources import SourceSpec, open_source

    child, proxy = mesh["child"], mesh["proxy"]
    a = tenants["a_digest"]
    ok = open_source(SourceSpec.peer(child.mirror_url, "team-a/app", proxy.host, username="alice", password="alice-pw"))
    anon = open_source(SourceSpec.peer(child.mirror_url, "team-a/app", proxy.host))
    other = open_source(SourceSpec.peer(child.mirror_url, "team-a/app", proxy.host, username="bob", password="bob-pw"))
    try:
        got = await asyncio.to_thread(ok.read_range, a, 1000, 1999)
        assert got == tenants["a"][1000:2000]
        for source in (anon, other):
            with pytest.raises(AuthError):
                await asyncio.to_thread(source.read_range, a, 0, 99)
    finally:
        for source in (ok, anon, other):
            source.close()
