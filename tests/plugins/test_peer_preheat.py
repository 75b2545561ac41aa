"""The peer's preheat task API (plugins/peer/preheat.py) against a real registry behind a counting proxy.

A remora image is pushed as the converter lays it out (bootstrap layer + data blobs, the hot blob
marked with ``remora.prefetch-bytes``); the proxy counts every blob GET the registry serves, so the
tests see what was fetched, in which order, and that a preheated node reads nothing more.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter

import aiohttp
import pytest
import requests
from aiohttp import web
from peer_util import RegistryProxy, make_layer, push_blob, push_image, sha, start_peer, unique

from remora.format import annotations as ann
from remora.plugins.peer.config import MIN_PIECE_SIZE

TOKEN = "preheat-test-token-0123456789"


class Proxy(RegistryProxy):
    """The registry as the peer sees it: counts blob GETs in order; can delay or corrupt one blob."""

    def __init__(self, target: str):
        super().__init__(target)
        self.gets: list[str] = []
        self.delay: dict[str, float] = {}
        self.flip: set[str] = set()
        self.released = asyncio.Event()

    async def stop(self) -> None:
        self.released.set()
        await super().stop()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        digest = request.path.rsplit("/", 1)[1] if "/blobs/sha256:" in request.path else ""
        if request.method == "GET" and digest:
            self.gets.append(digest)
            if digest in self.delay:
                try:   # released at stop(): a stalled answer must not hold the test's teardown
                    await asyncio.wait_for(self.released.wait(), self.delay[digest])
                except TimeoutError:
                    pass
        status, out, data, length = await self.forward(request)
        if digest in self.flip and data:
            data = bytearray(data)
            data[len(data) // 2] ^= 1
            data = bytes(data)
        return await self.respond(request, status, out, data, length)


def push_remora_image(registry_url: str, repo: str, tag: str) -> dict:
    """A remora-format manifest: bootstrap layer first, a hot data blob (prefetch-bytes) and a cold one."""
    bootstrap = os.urandom(MIN_PIECE_SIZE + 999)
    hot = os.urandom(2 * MIN_PIECE_SIZE + 17)
    cold = os.urandom(5 * MIN_PIECE_SIZE + 3)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    d = {name: push_blob(registry_url, repo, data) for name, data in
         (("bootstrap", bootstrap), ("hot", hot), ("cold", cold), ("config", config))}
    sizes = {"bootstrap": len(bootstrap), "hot": len(hot), "cold": len(cold), "config": len(config)}
    common = {"bootstrap_digest": d["bootstrap"], "bootstrap_size": len(bootstrap), "repository": repo}
    layers = [
        {"mediaType": ann.BLOB_MEDIA_TYPE, "digest": d["cold"], "size": len(cold),
         "annotations": ann.layer_annotations("blob", **common)},
        {"mediaType": ann.BLOB_MEDIA_TYPE, "digest": d["hot"], "size": len(hot),
         "annotations": ann.layer_annotations("blob", prefetch_bytes=len(hot), **common)},
        {"mediaType": ann.BOOTSTRAP_MEDIA_TYPE, "digest": d["bootstrap"], "size": len(bootstrap),
         "annotations": ann.layer_annotations("bootstrap", **common)},
    ]
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": d["config"], "size": len(config)},
                           "layers": layers}).encode()
    r = requests.put(f"{registry_url}/v2/{repo}/manifests/{tag}", data=manifest, timeout=10,
                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    r.raise_for_status()
    return {"digests": d, "sizes": sizes, "data": {"bootstrap": bootstrap, "hot": hot, "cold": cold, "config": config}}


@pytest.fixture
async def rig(tmp_path, fresh_registry):
    proxy = await Proxy(fresh_registry.host).start()
    token_file = tmp_path / "preheat-token"
    token_file.write_text(TOKEN + "\n")
    peer = await start_peer(tmp_path, "pre", registries=[proxy.host], preheat_token_file=token_file)
    repo = unique("preheat/app")
    image = push_remora_image(fresh_registry.url, repo, "v1")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        yield {"peer": peer, "proxy": proxy, "http": http, "ref": f"{proxy.host}/{repo}:v1", "repo": repo, **image}
    await peer.stop()
    await proxy.stop()


async def wait_state(http, peer, task_id: str, states=("succeeded", "failed", "cancelled"), timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(f"{peer.mirror_url}/api/v1/tasks/{task_id}") as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        if body["state"] in states:
            return body
        assert time.monotonic() < deadline, f"task {task_id} still {body}"
        await asyncio.sleep(0.02)


async def post(http, peer, body: dict) -> tuple[int, dict]:
    async with http.post(f"{peer.mirror_url}/api/v1/tasks", json=body) as r:
        return r.status, await r.json()


async def test_remora_image_bootstrap_and_hot_first_then_all(rig):
    peer, proxy, http, d = rig["peer"], rig["proxy"], rig["http"], rig["digests"]
    status, _ = await post(http, peer, {"id": "hot-only", "type": "preheat", "image": rig["ref"], "all": False})
    assert status == 201
    done = await wait_state(http, peer, "hot-only")
    assert done["state"] == "succeeded", done
    # the config too: a pull reads it before the start, which must not reach the registry after a preheat
    assert [b["digest"] for b in done["blobs"]] == [d["bootstrap"], d["hot"], d["config"]]
    assert all(b["verified"] and b["verified_bytes"] == b["size"] for b in done["blobs"])
    # nothing else was fetched; two blobs at a time, started in priority order
    assert set(proxy.gets[:2]) == {d["bootstrap"], d["hot"]} and proxy.gets[2:] == [d["config"]]
    assert peer.store.get(d["cold"]) is None or not peer.store.get(d["cold"]).verified

    status, _ = await post(http, peer, {"id": "everything", "image": rig["ref"], "all": True})
    assert status == 201
    done = await wait_state(http, peer, "everything")
    assert done["state"] == "succeeded", done
    roles = [b["role"] for b in done["blobs"]]
    assert roles[:3] == ["bootstrap", "hot", "config"] and sorted(roles[3:]) == ["layer"]
    assert Counter(proxy.gets) == Counter({d[k]: 1 for k in ("bootstrap", "hot", "cold", "config")})
    for name, digest in d.items():
        entry = peer.store.get(digest)
        assert entry is not None and entry.verified, name

    # A client reading the image through this peer's mirror: the registry serves no further blob.
    before = list(proxy.gets)
    async with aiohttp.ClientSession() as client:
        for digest in d.values():
            async with client.get(f"{peer.mirror_url}/v2/{rig['repo']}/blobs/{digest}?ns={proxy.host}") as r:
                assert r.status == 200
                assert sha(await r.read()) == digest
    assert proxy.gets == before

    # an id that exists is 409, the task list shows both
    status, _ = await post(http, peer, {"id": "everything", "image": rig["ref"]})
    assert status == 409


async def test_oci_image_blob_list_and_progress(rig):
    peer, http, d = rig["peer"], rig["http"], rig["digests"]
    blobs = [{"digest": d["cold"], "size": rig["sizes"]["cold"]}]
    status, _ = await post(http, peer,
                           {"id": "list", "repository": f"{rig['proxy'].host}/{rig['repo']}", "blobs": blobs})
    assert status == 201
    done = await wait_state(http, peer, "list")
    assert done["state"] == "succeeded"
    assert done["blobs"] == [{"digest": d["cold"], "size": rig["sizes"]["cold"], "role": "blob",
                              "done_bytes": rig["sizes"]["cold"], "verified_bytes": rig["sizes"]["cold"],
                              "verified": True}]
    # a wrong size is never success
    status, _ = await post(http, peer, {"id": "badsize", "repository": f"{rig['proxy'].host}/{rig['repo']}",
                                        "blobs": [{"digest": d["hot"], "size": 12}]})
    done = await wait_state(http, peer, "badsize")
    assert done["state"] == "failed" and "size" in done["error"]


async def test_cancel(rig):
    peer, proxy, http, d = rig["peer"], rig["proxy"], rig["http"], rig["digests"]
    proxy.delay[d["bootstrap"]] = proxy.delay[d["hot"]] = 30.0
    status, _ = await post(http, peer, {"id": "slow", "image": rig["ref"]})
    assert status == 201
    await wait_state(http, peer, "slow", states=("running",))
    deadline = time.monotonic() + 10
    while not {d["bootstrap"], d["hot"]} <= set(proxy.gets):   # two blobs at a time
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    async with http.delete(f"{peer.mirror_url}/api/v1/tasks/slow") as r:
        assert r.status == 204
    done = await wait_state(http, peer, "slow", timeout=5)
    assert done["state"] == "cancelled"
    assert not any(b["verified"] for b in done["blobs"])
    # the download it started is stopped too (nobody else waits for it), and nothing after it began
    for digest in (d["bootstrap"], d["hot"]):
        dl = peer.tasks.tasks.get(digest)
        assert dl is None or dl._driver is None or dl._driver.done()
    assert sorted(proxy.gets) == sorted([d["bootstrap"], d["hot"]])
    async with http.delete(f"{peer.mirror_url}/api/v1/tasks/nope") as r:
        assert r.status == 404


async def test_token_required(rig):
    peer = rig["peer"]
    async with aiohttp.ClientSession() as anon:
        async with anon.post(f"{peer.mirror_url}/api/v1/tasks", json={"id": "x", "image": rig["ref"]}) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        async with anon.get(f"{peer.mirror_url}/api/v1/tasks/x", headers={"Authorization": "Bearer wrong-token"}) as r:
            assert r.status == 401
    assert rig["proxy"].gets == []
    # a registry outside the allow-list is refused even with the token
    status, body = await post(rig["http"], peer, {"id": "evil", "image": "evil.example:5000/x/y:1"})
    assert status == 400 and "not one this peer fetches from" in body["error"]


async def test_disabled_without_token_file(tmp_path, registry):
    peer = await start_peer(tmp_path, "notoken")
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with http.post(f"{peer.mirror_url}/api/v1/tasks", json={"id": "x", "image": "a/b:c"}) as r:
                assert r.status == 403
    finally:
        await peer.stop()


async def test_blob_failing_verification_fails_the_task(rig):
    peer, proxy, http, d = rig["peer"], rig["proxy"], rig["http"], rig["digests"]
    proxy.flip.add(d["hot"])
    status, _ = await post(http, peer, {"id": "corrupt", "image": rig["ref"], "all": True})
    assert status == 201
    done = await wait_state(http, peer, "corrupt", timeout=60)
    assert done["state"] == "failed", done
    hot = [b for b in done["blobs"] if b["digest"] == d["hot"]][0]
    assert not hot["verified"] and hot["verified_bytes"] == 0
    entry = peer.store.get(d["hot"])
    assert entry is None or not entry.verified


async def test_manager_job_engine_against_a_real_peer(rig, tmp_path):
    """The manager's job engine (plugins/manager/jobs.py) drives a preheat job on this real peer."""
    from fastapi.testclient import TestClient

    from remora.plugins.manager.api import Settings, create_app
    from remora.plugins.manager.db import Clock, open_db
    from remora.plugins.manager.jobs import Engine, EngineSettings

    peer, d = rig["peer"], rig["digests"]
    db_url = f"sqlite:///{tmp_path}/manager.db"
    app = create_app(Settings(db_url=db_url, root_token_file=tmp_path / "root-token", run_jobs=False))
    _, sessions = open_db(db_url)
    token_file = tmp_path / "peer-token"
    token_file.write_text(TOKEN + "\n")
    # The manager presents the peers' preheat token from --peer-token-file.
    engine = Engine(sessions, Clock(), EngineSettings(tick=0.05, poll=0.05, backoff_base=0.1, backoff_max=0.2,
                                                      peer_token_file=str(token_file)))

    client = TestClient(app)
    await asyncio.to_thread(client.__enter__)

    def setup_and_create() -> int:
        c = client
        if True:
            root = {"Authorization": "Bearer " + (tmp_path / "root-token").read_text().strip()}
            cl = c.post("/api/v1/clusters", json={"name": "c1", "is_default": True}, headers=root).json()
            join = c.post("/api/v1/join-tokens", json={"name": "n", "cluster_id": cl["id"]},
                          headers=root).json()["token"]
            r = c.post("/api/v1/agent/register", headers={"Authorization": f"Bearer {join}"},
                       json={"type": "peer", "hostname": "real-peer", "ip": "127.0.0.1", "port": peer.upload_port,
                             "api_port": peer.mirror_port})
            assert r.status_code == 200, r.text
            r = c.post("/api/v1/jobs", headers=root, json={"type": "preheat", "image": rig["ref"],
                                                            "scope": {"kind": "nodes", "nodes": ["real-peer"]}})
            assert r.status_code < 300, r.text
            return r.json()["id"]

    root = {"Authorization": "Bearer " + (tmp_path / "root-token").read_text().strip()}
    job_id = await asyncio.to_thread(setup_and_create)
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            job = await asyncio.to_thread(lambda: client.get(f"/api/v1/jobs/{job_id}", headers=root).json())
            if job["state"] not in ("pending", "running"):
                break
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.1)
    finally:
        await asyncio.to_thread(engine.stop)
        await asyncio.to_thread(client.__exit__, None, None, None)
    assert job["state"] == "succeeded", job
    node = job["nodes"][0]
    assert node["state"] == "succeeded" and node["bytes_verified"] == sum(rig["sizes"].values())
    for digest in d.values():
        assert peer.store.get(digest).verified



async def test_cli_preheat_wait(rig, tmp_path):
    """`remora peer preheat IMAGE --all --wait --json` against the running peer: exit 0, every blob verified."""
    import sys

    token_file = tmp_path / "cli-token"
    token_file.write_text(TOKEN)
    argv = [sys.executable, "-m", "remora.cli", "peer", "preheat", rig["ref"], "--all", "--wait", "--json",
            "--address", rig["peer"].mirror_url, "--preheat-token-file", str(token_file)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    status = json.loads(out)
    assert status["state"] == "succeeded"
    assert {b["digest"] for b in status["blobs"]} == set(rig["digests"].values())
    assert all(b["verified"] for b in status["blobs"])
    # a wrong token: refused, exit 4 (AuthError), nothing fetched beyond the first run
    token_file.write_text("x" * 32)
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0 and b"refused" in err, (proc.returncode, err)


async def test_pull_requests_are_checked(tmp_path, fresh_registry):
    """``"pull"`` (docs/p2p.md "Preheat"): a boolean, for an image, on a peer with --runtime-pull-api; an OCI
    image's blobs are preheated and the pull is ``skipped`` with the reason (``remora pull`` is for remora
    images; containerd pulls an OCI image from the peer). The
    pull into containerd itself is tested with a real snapshotter and containerd in
    tests/snapshotter/test_mirror_first_bootstrap.py."""
    proxy = await Proxy(fresh_registry.host).start()
    token_file = tmp_path / "preheat-token"
    token_file.write_text(TOKEN + "\n")
    peer = await start_peer(tmp_path, "rt", registries=[proxy.host], preheat_token_file=token_file,
                            runtime_pull_api=tmp_path / "snap-api.sock")
    try:
        repo = unique("preheat/oci")
        oci = push_image(fresh_registry.url, repo, "v1", [make_layer({"a": b"z" * 5000})])
        ref = f"{proxy.host}/{repo}:v1"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            status, body = await post(http, peer, {"id": "p1", "image": ref, "pull": "yes"})
            assert status == 400 and "pull must be true or false" in body["error"]
            status, body = await post(http, peer, {"id": "p2", "repository": f"{proxy.host}/{repo}", "pull": True,
                                                   "blobs": [{"digest": oci["layers"][0], "size": 1}]})
            assert status == 400 and "pull needs an image reference" in body["error"]
            assert proxy.gets == []
            status, body = await post(http, peer, {"id": "p3", "image": ref, "pull": True})
            assert status == 201 and body["pull"] == {"state": "pending"}
            done = await wait_state(http, peer, "p3")
            # nothing for `remora pull` to do with an OCI image: preheated, the pull skipped and said so
            assert done["state"] == "succeeded", done
            assert done["pull"]["state"] == "skipped" and "not a remora image" in done["pull"]["reason"]
            assert all(b["verified"] for b in done["blobs"]) and len(done["blobs"]) == 2   # config + layer
            # without "pull" the same peer preheats as before, and the view has no "pull"
            status, body = await post(http, peer, {"id": "p4", "image": ref})
            done = await wait_state(http, peer, "p4")
            assert done["state"] == "succeeded" and "pull" not in done
    finally:
        await peer.stop()
        await proxy.stop()
