"""Issue 13: preheat an image, then start it with the registry unreachable (plugins/peer/offline.py).

Real registries (Debian's docker-registry, one public, one with htpasswd users) that the tests stop;
real peers (in-process :class:`PeerDaemon`) with the preheat API; clients are plain HTTP clients of the
mirror, as containerd is. What is proved:

* after a preheat, the mirror answers the image's index, platform manifest, config and layers with the
  registry stopped: by tag from the kept record (marked stale-while-offline), by digest always, bytes
  checked against their digests; a tag older than the max age, or never kept, is not answered (5xx);
* while the registry answers, its answer decides (a deleted tag is a 404, not the kept copy);
* a private image is never served to a client with no, wrong, or never-confirmed credentials, registry up
  or down; a client whose credentials the registry accepted is served while it is down.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time

import aiohttp
import pytest
import requests
from peer_util import RegistryProxy, make_layer, start_peer, unique

from remora_testing.registry import LocalRegistry

TOKEN = "offline-test-token-0123456789"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(autouse=True)
def no_env_credentials(monkeypatch):
    monkeypatch.delenv("REMORA_USERNAME", raising=False)
    monkeypatch.delenv("REMORA_PASSWORD", raising=False)


def push_indexed_image(registry: LocalRegistry, repo: str, tag: str, auth=None) -> dict:
    """An OCI index (tag ``tag``) -> one linux/amd64 manifest -> config + two gzip layers; returns the
    bytes of everything by digest and the index and manifest digests."""
    layers = [make_layer({"etc/hello": b"hello offline\n", "bin/data": os.urandom(600_000)}),
              make_layer({"srv/big": os.urandom(1_300_000)})]
    diff_ids = [sha(__import__("gzip").decompress(blob)) for blob in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    blobs = {sha(b): b for b in [*layers, config]}
    for digest, data in blobs.items():
        r = requests.post(f"{registry.url}/v2/{repo}/blobs/uploads/", timeout=10, auth=auth)
        r.raise_for_status()
        loc = r.headers["Location"]
        loc = registry.url + loc if loc.startswith("/") else loc
        r = requests.put(f"{loc}{'&' if '?' in loc else '?'}digest={digest}", data=data, timeout=60, auth=auth,
                         headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       "digest": sha(b), "size": len(b)} for b in layers]}).encode()
    r = requests.put(f"{registry.url}/v2/{repo}/manifests/{sha(manifest)}", data=manifest, timeout=10, auth=auth,
                     headers={"Content-Type": OCI_MANIFEST})
    r.raise_for_status()
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha(manifest), "size": len(manifest),
         "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    r = requests.put(f"{registry.url}/v2/{repo}/manifests/{tag}", data=index, timeout=10, auth=auth,
                     headers={"Content-Type": OCI_INDEX})
    r.raise_for_status()
    return {"repo": repo, "tag": tag, "index": index, "index_digest": sha(index), "manifest": manifest,
            "manifest_digest": sha(manifest), "config_digest": sha(config), "layers": [sha(b) for b in layers],
            "blobs": blobs}


def docker_config(path, host: str, user: str, password: str):
    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    return path


async def preheat(peer, image: str) -> dict:
    """Through the peer's preheat API (what ``remora peer preheat`` and the manager's jobs use)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    task_id = unique("offline")
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{peer.mirror_url}/api/v1/tasks", json={"id": task_id, "image": image}) as r:
            assert r.status == 201, await r.text()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            async with http.get(f"{peer.mirror_url}/api/v1/tasks/{task_id}") as r:
                task = await r.json()
            if task["state"] not in ("queued", "running"):
                return task
            await asyncio.sleep(0.1)
    raise AssertionError(f"preheat {task_id} did not finish: {task}")


async def fetch(peer, host: str, repo: str, kind: str, ref: str, authorization: str | None = None,
                method: str = "GET") -> tuple[int, bytes, dict]:
    headers = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
    if authorization:
        headers["Authorization"] = authorization
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"{peer.mirror_url}/v2/{repo}/{kind}/{ref}?ns={host}",
                                headers=headers) as r:
            return r.status, await r.read(), dict(r.headers)


def metric(peer, name: str, labels: dict) -> float:
    return peer.metrics.registry.get_sample_value(name, labels) or 0.0


def _registry(tmp_path, name: str, users=None) -> LocalRegistry:
    return LocalRegistry(root=tmp_path / name, users=users).start()


async def test_preheated_public_image_is_served_with_the_registry_stopped(tmp_path):
    reg = _registry(tmp_path, "public-registry")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    peer = None
    try:
        img = push_indexed_image(reg, unique("offline/app"), "v1")
        peer = await start_peer(tmp_path, "node", registries=[reg.host], preheat_token_file=token)
        task = await preheat(peer, f"{reg.host}/{img['repo']}:v1")
        assert task["state"] == "succeeded", json.dumps(task)
        assert {b["digest"] for b in task["blobs"]} == {img["config_digest"], *img["layers"]}
        kept = peer.tasks.kept
        assert kept.tags[f"{reg.host} {img['repo']} v1"]["digest"] == img["index_digest"]
        assert {img["index_digest"], img["manifest_digest"]} <= set(kept.manifests)
        assert time.time() - kept.tags[f"{reg.host} {img['repo']} v1"]["seen"] < 60
        assert peer.status()["offline"] == {"kept_manifests": 2, "tags": 1, "tag_max_age": 24 * 3600.0}

        reg.stop()
        host, repo = reg.host, img["repo"]
        # by tag: the kept index, marked stale-while-offline (HEAD and GET, as containerd resolves)
        status, body, headers = await fetch(peer, host, repo, "manifests", "v1", method="HEAD")
        assert status == 200 and headers["Docker-Content-Digest"] == img["index_digest"], (status, body)
        assert int(headers["Content-Length"]) == len(img["index"])
        status, body, headers = await fetch(peer, host, repo, "manifests", "v1")
        assert status == 200 and body == img["index"], (status, body)
        assert headers["Content-Type"] == OCI_INDEX
        assert headers["X-Remora-Offline"].startswith("stale-while-offline; age=")
        # by digest: the platform manifest, always
        status, body, headers = await fetch(peer, host, repo, "manifests", img["manifest_digest"])
        assert status == 200 and body == img["manifest"] and sha(body) == img["manifest_digest"]
        assert headers["X-Remora-Offline"] == "kept; by-digest"
        # config and layers from the store, byte for byte
        for digest in [img["config_digest"], *img["layers"]]:
            status, body, _ = await fetch(peer, host, repo, "blobs", digest)
            assert status == 200 and sha(body) == digest and body == img["blobs"][digest]
        # not kept: never a 200 (5xx, so containerd moves on to the next host)
        status, _, _ = await fetch(peer, host, repo, "manifests", "v2")
        assert status in (502, 504)
        status, _, _ = await fetch(peer, host, "offline/other", "manifests", img["manifest_digest"])
        assert status >= 400, "a manifest is served offline only under a repository it was fetched from"
        assert metric(peer, "remora_peer_offline_manifests_total", {"ref": "tag", "result": "served"}) == 2
        assert metric(peer, "remora_peer_offline_manifests_total", {"ref": "digest", "result": "served"}) == 1
        # v2 was never kept: the access checker cannot confirm it (counted), the other repository neither
        assert metric(peer, "remora_peer_offline_manifests_total",
                      {"ref": "tag", "result": "access_unconfirmed"}) == 1

        # the max age (dynamic: what the manager's config sets): a tag record older is not answered,
        # a digest still is
        kept.set_tag_max_age(0.0)
        await asyncio.sleep(0.01)
        status, _, _ = await fetch(peer, host, repo, "manifests", "v1")
        assert status in (502, 504)
        assert metric(peer, "remora_peer_offline_manifests_total", {"ref": "tag", "result": "too_old"}) == 1
        status, body, _ = await fetch(peer, host, repo, "manifests", img["index_digest"])
        assert status == 200 and body == img["index"]
    finally:
        if peer is not None:
            await peer.stop()
        reg.stop()


async def test_a_registry_that_answers_decides(tmp_path):
    """Registry up: a tag it no longer has is its 404, not the kept copy; a changed tag refreshes the
    record (pass-through), and that refreshed answer is what is kept for when it goes down."""
    reg = _registry(tmp_path, "answering-registry")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    peer = None
    try:
        img = push_indexed_image(reg, unique("offline/answers"), "v1")
        peer = await start_peer(tmp_path, "node", registries=[reg.host], preheat_token_file=token)
        assert (await preheat(peer, f"{reg.host}/{img['repo']}:v1"))["state"] == "succeeded"
        host, repo = reg.host, img["repo"]
        # move v1 to the platform manifest itself: the mirror passes the registry's answer through
        r = requests.put(f"{reg.url}/v2/{repo}/manifests/v1", data=img["manifest"], timeout=10,
                         headers={"Content-Type": OCI_MANIFEST})
        r.raise_for_status()
        status, body, headers = await fetch(peer, host, repo, "manifests", "v1")
        assert status == 200 and body == img["manifest"] and "X-Remora-Offline" not in headers
        assert peer.tasks.kept.tags[f"{host} {repo} v1"]["digest"] == img["manifest_digest"]
        # the registry deletes it: its 404 is the answer (the kept copy is not used while it answers)
        requests.delete(f"{reg.url}/v2/{repo}/manifests/{img['manifest_digest']}", timeout=10).raise_for_status()
        for ref in ("v1", img["manifest_digest"]):
            status, _, headers = await fetch(peer, host, repo, "manifests", ref)
            assert status == 404 and "X-Remora-Offline" not in headers
        reg.stop()
        status, body, headers = await fetch(peer, host, repo, "manifests", img["index_digest"])
        assert status == 200 and body == img["index"]
    finally:
        if peer is not None:
            await peer.stop()
        reg.stop()


async def test_private_image_only_to_clients_the_registry_accepted(tmp_path):
    reg = _registry(tmp_path, "private-registry", users=USERS)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    peer = None
    alice, bob = basic("alice", "alice-pw"), basic("bob", "bob-pw")
    wrong = basic("alice", "not-her-password")
    try:
        img = push_indexed_image(reg, unique("offline/private"), "v1", auth=("alice", "alice-pw"))
        # the node fetches with its own credentials (alice's, in its docker config)
        peer = await start_peer(tmp_path, "node", registries=[reg.host], preheat_token_file=token,
                                registry_config=docker_config(tmp_path / "node.json", reg.host, "alice", "alice-pw"))
        assert (await preheat(peer, f"{reg.host}/{img['repo']}:v1"))["state"] == "succeeded"
        host, repo = reg.host, img["repo"]
        objects = [("manifests", "v1"), ("manifests", img["manifest_digest"]),
                   *[("blobs", d) for d in [img["config_digest"], *img["layers"]]]]

        async def refused(who: str | None, up: bool) -> None:
            for kind, ref in objects:
                for method in ("GET", "HEAD"):
                    status, body, headers = await fetch(peer, host, repo, kind, ref, who, method)
                    assert status >= 400, f"{kind} {ref} served to {who and who[:12]} ({'up' if up else 'down'})"
                    assert img["blobs"].get(ref, b"\0") not in body and img["manifest"] not in body

        # registry up: no credentials and wrong ones are refused (the registry's 401)
        await refused(None, True)
        await refused(wrong, True)
        status, _, headers = await fetch(peer, host, repo, "manifests", "v1")
        assert status == 401 and "Basic" in headers.get("WWW-Authenticate", "")
        # alice reads it (the peer sees the registry accept her credentials for the repository)
        status, body, _ = await fetch(peer, host, repo, "manifests", "v1", alice)
        assert status == 200 and body == img["index"]

        reg.stop()
        # registry down: no credentials -> the registry's challenge, so a client with some presents them
        status, _, headers = await fetch(peer, host, repo, "manifests", "v1")
        assert status == 401 and "Basic" in headers.get("WWW-Authenticate", "")
        await refused(None, False)
        await refused(wrong, False)
        # bob's credentials are valid at the registry, but the peer never saw it accept them: refused
        await refused(bob, False)
        # alice: the whole image from the kept copy and the store
        status, body, headers = await fetch(peer, host, repo, "manifests", "v1", alice)
        assert status == 200 and body == img["index"] and headers["X-Remora-Offline"].startswith("stale")
        status, body, _ = await fetch(peer, host, repo, "manifests", img["manifest_digest"], alice)
        assert status == 200 and body == img["manifest"]
        for digest in [img["config_digest"], *img["layers"]]:
            status, body, _ = await fetch(peer, host, repo, "blobs", digest, alice)
            assert status == 200 and body == img["blobs"][digest]
        # and still nobody else, after alice was served
        await refused(None, False)
        await refused(wrong, False)
    finally:
        if peer is not None:
            await peer.stop()
        reg.stop()


class Gate(RegistryProxy):
    """The registry as the peer sees it: passes requests through, or answers every one with ``status``."""

    def __init__(self, target: str):
        super().__init__(target)
        self.status = 0

    async def handle(self, request):
        from aiohttp import web

        if self.status:
            return web.Response(status=self.status, text='{"errors": []}', content_type="application/json")
        return await super().handle(request)


async def test_5xx_is_unreachable_but_403_decides(tmp_path):
    reg = _registry(tmp_path, "gated-registry")
    gate = await Gate(reg.host).start()
    token = tmp_path / "token"
    token.write_text(TOKEN)
    peer = None
    try:
        img = push_indexed_image(reg, unique("offline/gated"), "v1")
        peer = await start_peer(tmp_path, "node", registries=[gate.host], preheat_token_file=token)
        peer.tasks.access.allow_ttl = 0.0   # every request is checked with the registry (no cached yes)
        task = await preheat(peer, f"{gate.host}/{img['repo']}:v1")
        assert task["state"] == "succeeded", json.dumps(task)
        host, repo = gate.host, img["repo"]
        gate.status = 503     # no answer that decides: the kept copy
        status, body, headers = await fetch(peer, host, repo, "manifests", "v1")
        assert status == 200 and body == img["index"] and headers["X-Remora-Offline"].startswith("stale")
        status, body, _ = await fetch(peer, host, repo, "blobs", img["layers"][0])
        assert status == 200 and body == img["blobs"][img["layers"][0]]
        gate.status = 403     # the registry answers: it decides, the kept copy is not used
        for kind, ref in (("manifests", "v1"), ("manifests", img["manifest_digest"]), ("blobs", img["layers"][0])):
            status, body, headers = await fetch(peer, host, repo, kind, ref)
            assert status == 403 and "X-Remora-Offline" not in headers, (kind, ref, status)
            assert body != img["blobs"].get(ref) and img["manifest"] not in body
    finally:
        if peer is not None:
            await peer.stop()
        await gate.stop()
        reg.stop()
