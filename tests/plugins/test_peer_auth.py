"""Registry credentials stay on the node that has them: the mesh serves peers that have none."""
from __future__ import annotations

import base64
import json
import os

import aiohttp
import pytest
from peer_util import push_blob, start_peer, unique

from remora.plugins.scheduler.server import SchedulerConfig, SchedulerServer

AUTH = ("remora", "s3cret-pass")  # tests/conftest.py's auth_registry user


@pytest.fixture(autouse=True)
def no_env_credentials(monkeypatch):
    monkeypatch.delenv("REMORA_USERNAME", raising=False)
    monkeypatch.delenv("REMORA_PASSWORD", raising=False)


def docker_config(path, registry_host: str | None) -> str:
    auths = {registry_host: {"auth": base64.b64encode(":".join(AUTH).encode()).decode()}} if registry_host else {}
    path.write_text(json.dumps({"auths": auths}))
    return path


async def get(peer, host, repo, digest, auth=AUTH):
    # the client's own credentials: the mirror checks them against the registry (test_mirror_authz.py)
    async with aiohttp.ClientSession(auth=aiohttp.BasicAuth(*auth) if auth else None) as s:
        async with s.get(f"{peer.mirror_url}/v2/{repo}/blobs/{digest}?ns={host}") as r:
            return r.status, await r.read()


async def test_only_the_node_with_credentials_talks_to_the_registry(tmp_path, auth_registry):
    repo = unique("auth/app")
    data = os.urandom(1_500_000)
    digest = push_blob(auth_registry.url, repo, data, auth=AUTH)
    sched = await SchedulerServer(SchedulerConfig(), "127.0.0.1:0", insecure_plain=True).start()
    started = []
    try:
        lonely = await start_peer(tmp_path, "lonely", registry_config=docker_config(tmp_path / "none.json", None))
        started.append(lonely)
        status, body = await get(lonely, auth_registry.host, repo, digest)
        assert status == 502 and b"credentials" in body, "no credentials: a clean 5xx, never a 401 or a 200"

        seed = await start_peer(tmp_path, "seed", [sched.address],
                                registry_config=docker_config(tmp_path / "seed.json", auth_registry.host))
        started.append(seed)
        assert await get(seed, auth_registry.host, repo, digest) == (200, data)

        child = await start_peer(tmp_path, "child", [sched.address],
                                 registry_config=docker_config(tmp_path / "child.json", None))
        started.append(child)
        assert await get(child, auth_registry.host, repo, digest) == (200, data)
        m = child.metrics.registry.get_sample_value
        assert m("remora_peer_download_bytes_total", {"source": "peer"}) == len(data)
        assert (m("remora_peer_download_bytes_total", {"source": "registry"}) or 0) == 0
    finally:
        for p in started:
            await p.stop()
        await sched.stop(0)


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    """distribution with ``auth: token`` and a real JWT token server (the core's test helper)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "core"))
    from regclient_tokenserver import TokenAuthRegistry, TokenServer

    work = tmp_path_factory.mktemp("peer-token-auth")
    server = TokenServer({"alice": ("alice-pw", {"team/peer"})}, work).start()
    reg = TokenAuthRegistry(work / "registry", server)
    try:
        reg.start()
        yield reg, server
    finally:
        reg.stop()
        server.stop()


async def test_bearer_token_auth_with_the_nodes_credentials(tmp_path, token_registry):
    from remora.registry.client import RegistryClient
    reg, server = token_registry
    data = os.urandom(700_000)
    (tmp_path / "blob").write_bytes(data)
    digest = "sha256:" + __import__("hashlib").sha256(data).hexdigest()
    RegistryClient(reg.host, credentials=("alice", "alice-pw")).push_blob("team/peer", digest, len(data),
                                                                         tmp_path / "blob")
    cfg = tmp_path / "alice.json"
    cfg.write_text(json.dumps({"auths": {reg.host: {"auth": base64.b64encode(b"alice:alice-pw").decode()}}}))
    server.requests.clear()
    p = await start_peer(tmp_path, "bearer", registry_config=cfg, registries=[reg.host])
    try:
        assert await get(p, reg.host, "team/peer", digest, ("alice", "alice-pw")) == (200, data)
        assert {"user": "alice", "scopes": ["repository:team/peer:pull"], "service": "remora-test-registry",
                "method": "GET"} in server.requests
        # The token is cached per repository: another request there asks the token server nothing.
        n = len(server.requests)
        async with aiohttp.ClientSession(auth=aiohttp.BasicAuth("alice", "alice-pw")) as s:
            async with s.head(f"{p.mirror_url}/v2/team/peer/blobs/{'sha256:' + '1' * 64}?ns={reg.host}") as r:
                assert r.status == 404
        assert len(server.requests) == n
    finally:
        await p.stop()
