"""The mirror API of one peer (no scheduler: registry only) against a real registry."""
from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import pytest
from aiohttp import web
from peer_util import push_blob, push_image, sha, start_peer, unique

from remora.plugins.peer.config import MIN_PIECE_SIZE

BLOB_SIZE = 5 * MIN_PIECE_SIZE + 1234


@pytest.fixture
async def peer(tmp_path, registry):
    p = await start_peer(tmp_path, "solo", upstream=registry.host)
    yield p
    await p.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


@pytest.fixture(scope="module")
def image(registry):
    repo = unique("mirror/app")
    blob = os.urandom(BLOB_SIZE)
    img = push_image(registry.url, repo, "v1", [blob])
    return {"repo": repo, "blob": blob, **img}


def _counter(peer, name: str, **labels) -> float:
    value = peer.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_manifests_pass_through_digest_checked(peer, http, registry, image):
    base = f"{peer.mirror_url}/v2/{image['repo']}/manifests"
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    for ref in ("v1", image["manifest_digest"]):
        async with http.get(f"{base}/{ref}?ns={registry.host}", headers=accept) as r:
            assert r.status == 200
            assert await r.read() == image["manifest"]
            assert r.headers["Docker-Content-Digest"] == image["manifest_digest"]
            assert r.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
        async with http.head(f"{base}/{ref}?ns={registry.host}", headers=accept) as r:
            assert r.status == 200 and r.headers["Docker-Content-Digest"] == image["manifest_digest"]
            assert int(r.headers["Content-Length"]) == len(image["manifest"])
    # The upstream can also come from the header, or the --upstream default (the fixture's peer has one).
    async with http.get(f"{base}/v1", headers={**accept, "X-Remora-Upstream": registry.host}) as r:
        assert r.status == 200
    async with http.get(f"{base}/v1", headers=accept) as r:
        assert r.status == 200


async def test_not_found_is_a_fast_clean_404(peer, http, registry, image):
    t0 = time.monotonic()
    missing = "sha256:" + "ab" * 32
    for url in (f"/v2/{image['repo']}/manifests/nope", f"/v2/{image['repo']}/blobs/{missing}",
                f"/v2/{unique('no/such/repo')}/manifests/v1"):
        async with http.get(f"{peer.mirror_url}{url}?ns={registry.host}") as r:
            assert r.status == 404, url
            body = await r.json()
            assert body["errors"][0]["code"] in ("MANIFEST_UNKNOWN", "BLOB_UNKNOWN")
    assert time.monotonic() - t0 < 5
    assert not peer.store.get(missing), "a missing blob must leave nothing in the store"


async def test_unreachable_upstream_is_a_5xx_never_a_200(tmp_path, http, image):
    from remora.procutil import free_port
    dead = f"127.0.0.1:{free_port()}"
    p = await start_peer(tmp_path, "nowhere", registries=[dead])
    try:
        async with http.get(f"{p.mirror_url}/v2/{image['repo']}/blobs/{image['layers'][0]}?ns={dead}") as r:
            assert r.status == 502
        async with http.get(f"{p.mirror_url}/v2/{image['repo']}/manifests/v1") as r:
            assert r.status == 502 and "no upstream registry" in (await r.text())
    finally:
        await p.stop()


async def test_blob_get_and_head(peer, http, registry, image):
    digest = image["layers"][0]
    url = f"{peer.mirror_url}/v2/{image['repo']}/blobs/{digest}?ns={registry.host}"
    async with http.head(url) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == BLOB_SIZE
        assert r.headers["Docker-Content-Digest"] == digest
    async with http.get(url) as r:
        assert r.status == 200
        body = await r.read()
    assert sha(body) == digest and len(body) == BLOB_SIZE
    assert peer.store.get(digest).verified
    assert _counter(peer, "remora_peer_download_bytes_total", source="registry") == BLOB_SIZE
    # Second time from the store: no more registry traffic.
    async with http.get(url) as r:
        assert sha(await r.read()) == digest
    assert _counter(peer, "remora_peer_download_bytes_total", source="registry") == BLOB_SIZE


async def test_range_reads_fetch_only_covering_pieces(peer, http, registry):
    repo = unique("mirror/lazy")
    blob = os.urandom(BLOB_SIZE)
    digest = push_blob(registry.url, repo, blob)
    url = f"{peer.mirror_url}/v2/{repo}/blobs/{digest}?ns={registry.host}"
    start = 2 * MIN_PIECE_SIZE + 10
    async with http.get(url, headers={"Range": f"bytes={start}-{start + 99}"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes {start}-{start + 99}/{BLOB_SIZE}"
        assert await r.read() == blob[start:start + 100]
    entry = peer.store.get(digest)
    assert entry.have == {2} and not entry.verified
    assert _counter(peer, "remora_peer_download_bytes_total", source="registry") == MIN_PIECE_SIZE
    # A range spanning pieces, a suffix range, and an unsatisfiable one.
    async with http.get(url, headers={"Range": f"bytes={MIN_PIECE_SIZE - 5}-{MIN_PIECE_SIZE + 4}"}) as r:
        assert r.status == 206 and await r.read() == blob[MIN_PIECE_SIZE - 5:MIN_PIECE_SIZE + 5]
    async with http.get(url, headers={"Range": "bytes=-1000"}) as r:
        assert r.status == 206 and await r.read() == blob[-1000:]
    async with http.get(url, headers={"Range": f"bytes={BLOB_SIZE}-"}) as r:
        assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{BLOB_SIZE}"
    assert entry.have == {0, 1, 2, 5}
    # Open-ended (containerd 2.1 resuming a blob): served only after the whole blob is verified.
    async with http.get(url, headers={"Range": f"bytes={BLOB_SIZE - 3000}-"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes {BLOB_SIZE - 3000}-{BLOB_SIZE - 1}/{BLOB_SIZE}"
        assert await r.read() == blob[-3000:]
    assert entry.verified and entry.have == set(range(entry.n_pieces))
    assert _counter(peer, "remora_peer_download_bytes_total", source="registry") == BLOB_SIZE


async def test_client_disconnecting_early_harms_nothing(peer, http, registry):
    repo = unique("mirror/disc")
    blob = os.urandom(BLOB_SIZE)
    digest = push_blob(registry.url, repo, blob)
    host, port = peer.mirror_url[len("http://"):].split(":")
    for _ in range(3):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /v2/{repo}/blobs/{digest}?ns={registry.host} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(1000)
        writer.transport.abort()  # RST mid-body
    for _ in range(200):  # the mirror noticed the clients going away
        if _counter(peer, "remora_peer_mirror_requests_total", kind="blob", status="aborted") >= 1:
            break
        await asyncio.sleep(0.01)
    async with http.get(f"{peer.mirror_url}/v2/{repo}/blobs/{digest}?ns={registry.host}") as r:
        assert r.status == 200 and await r.read() == blob
    assert _counter(peer, "remora_peer_mirror_requests_total", kind="blob", status="aborted") >= 1
    assert _counter(peer, "remora_peer_download_bytes_total", source="registry") == BLOB_SIZE


async def test_disconnect_while_downloading_does_not_cancel_the_download(peer, http, registry):
    repo = unique("mirror/disc2")
    blob = os.urandom(BLOB_SIZE)
    digest = push_blob(registry.url, repo, blob)
    host, port = peer.mirror_url[len("http://"):].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /v2/{repo}/blobs/{digest}?ns={registry.host} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    for _ in range(100):  # the request arrived and started a download...
        if digest in peer.tasks.tasks:
            break
        await asyncio.sleep(0.01)
    writer.transport.abort()  # ... and its client is gone before a byte of the answer
    entry = peer.store.open(digest)
    for _ in range(200):
        if entry.verified:
            break
        await asyncio.sleep(0.05)
    assert entry.verified, "the download must finish although its first client left"


@pytest.fixture
async def lying_registry(image):
    """A registry that serves wrong bytes under a blob's digest and a manifest not matching its digest."""
    async def blob(request):
        return web.Response(body=b"X" * BLOB_SIZE, headers={"Content-Type": "application/octet-stream"})

    async def manifest(request):
        return web.Response(body=image["manifest"] + b" ", content_type="application/vnd.oci.image.manifest.v1+json",
                            headers={"Docker-Content-Digest": image["manifest_digest"]})

    app = web.Application()
    app.router.add_route("*", "/v2/{name:.+}/blobs/{d}", blob)
    app.router.add_route("*", "/v2/{name:.+}/manifests/{r}", manifest)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


@pytest.fixture
async def truncating_registry():
    """A registry whose blob responses die halfway (a dropped connection, a crashed storage backend)."""
    async def blob(request):
        headers = {"Content-Length": str(BLOB_SIZE), "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        await resp.write(os.urandom(BLOB_SIZE // 2))
        request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_route("*", "/v2/{name:.+}/blobs/{d}", blob)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


async def test_truncated_registry_stream_is_a_502_and_resets_the_task(peer, http, image, truncating_registry):
    digest = image["layers"][0]
    peer.upstream.allow(truncating_registry)
    async with http.get(f"{peer.mirror_url}/v2/{image['repo']}/blobs/{digest}?ns={truncating_registry}") as r:
        assert r.status == 502
        assert "registry" in (await r.json())["errors"][0]["message"]
    entry = peer.store.open(digest)
    assert not entry.have and not entry.has_layout, "half a blob must not stay behind as if it were good"


async def test_lying_registry_is_never_served_as_200(peer, http, image, lying_registry):
    digest = image["layers"][0]
    peer.upstream.allow(lying_registry)
    url = f"{peer.mirror_url}/v2/{image['repo']}/blobs/{digest}?ns={lying_registry}"
    async with http.get(url) as r:
        assert r.status == 502
        assert "digest mismatch" in await r.text()
    entry = peer.store.open(digest)
    assert not entry.have and not entry.verified, "a failed back-to-source resets the task"
    async with http.get(f"{peer.mirror_url}/v2/{image['repo']}/manifests/v1?ns={lying_registry}") as r:
        assert r.status == 502 and "digest mismatch" in await r.text()


async def test_restart_serves_stored_blobs_without_the_registry(tmp_path, fresh_registry, http):
    repo = unique("mirror/restart")
    blob = os.urandom(BLOB_SIZE)
    digest = push_blob(fresh_registry.url, repo, blob)
    p = await start_peer(tmp_path, "restart")
    try:
        async with http.get(f"{p.mirror_url}/v2/{repo}/blobs/{digest}?ns={fresh_registry.host}") as r:
            assert r.status == 200 and await r.read() == blob
    finally:
        await p.stop()
    fresh_registry.stop()
    p = await start_peer(tmp_path, "restart")
    try:
        async with http.get(f"{p.mirror_url}/v2/{repo}/blobs/{digest}?ns={fresh_registry.host}",
                            headers={"Range": "bytes=10-19"}) as r:
            assert r.status == 206 and await r.read() == blob[10:20]
        async with http.get(f"{p.mirror_url}/v2/{repo}/blobs/{digest}?ns={fresh_registry.host}") as r:
            assert r.status == 200 and await r.read() == blob
        # Its upload API serves the stored pieces to other peers, and nothing else.
        upload = f"http://127.0.0.1:{p.upload_port}/pieces"
        proof = {"X-Remora-Source": f"{fresh_registry.host}/{repo}"}   # a public repository: no credentials
        async with http.get(f"{upload}/{digest}/1", headers=proof) as r:
            assert r.status == 200 and await r.read() == blob[MIN_PIECE_SIZE:2 * MIN_PIECE_SIZE]
        async with http.get(f"{upload}/{digest}/99", headers=proof) as r:
            assert r.status == 404
        async with http.get(f"{upload}/sha256:{'0' * 64}/0") as r:
            assert r.status == 404
        async with http.get(f"{upload}/md5:abc/0") as r:
            assert r.status == 400
    finally:
        await p.stop()
