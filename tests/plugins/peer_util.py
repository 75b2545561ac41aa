"""Helpers for the peer tests: push real blobs/images to the registry, start schedulers and peers.

Everything is real: the registry is Debian's docker-registry, the scheduler is remora's, peers are
:class:`remora.plugins.peer.daemon.PeerDaemon` instances in the test's event loop on 127.0.0.1 ports.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import requests

from remora.plugins.peer.config import PeerConfig, Watermark
from remora.plugins.peer.daemon import PeerDaemon


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(registry_url: str, repo: str, data: bytes, auth: tuple[str, str] | None = None) -> str:
    digest = sha(data)
    r = requests.post(f"{registry_url}/v2/{repo}/blobs/uploads/", timeout=10, auth=auth)
    r.raise_for_status()
    location = r.headers["Location"]
    if location.startswith("/"):
        location = registry_url + location
    sep = "&" if "?" in location else "?"
    r = requests.put(f"{location}{sep}digest={digest}", data=data, timeout=60, auth=auth,
                     headers={"Content-Type": "application/octet-stream"})
    r.raise_for_status()
    return digest


def make_layer(files: dict[str, bytes]) -> bytes:
    """A gzip'ed tar layer with the given files (deterministic)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0)


def push_image(registry_url: str, repo: str, tag: str, layers: list[bytes]) -> dict:
    """Push an OCI image (config + gzip layers); returns digests and the manifest bytes."""
    layer_descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": push_blob(registry_url, repo, blob), "size": len(blob)} for blob in layers]
    diff_ids = [sha(gzip.decompress(blob)) if blob[:2] == b"\x1f\x8b" else sha(blob) for blob in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_digest = push_blob(registry_url, repo, config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": config_digest, "size": len(config)},
                           "layers": layer_descs}).encode()
    r = requests.put(f"{registry_url}/v2/{repo}/manifests/{tag}", data=manifest, timeout=10,
                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    r.raise_for_status()
    return {"manifest": manifest, "manifest_digest": sha(manifest), "config_digest": config_digest,
            "layers": [d["digest"] for d in layer_descs]}


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{os.urandom(3).hex()}"


#: registries every test peer may fetch from; the ``registry`` fixture's host is added by
#: tests/plugins/conftest.py, tests that run a registry of their own pass ``registries=[...]``.
REGISTRIES: list[str] = []


def peer_config(tmp: Path, name: str, schedulers: list[str] | None = None, **kw) -> PeerConfig:
    kw.setdefault("piece_timeout", 2.0)
    kw.setdefault("gc_interval", 3600.0)
    # Watermarks in bytes, not the default % of the filesystem: on a nearly full test disk the
    # startup GC would otherwise evict the blobs a test just stored.
    kw.setdefault("gc_high", Watermark(bytes=64 << 30))
    kw.setdefault("gc_low", Watermark(bytes=48 << 30))
    kw.setdefault("host_id", f"host-{name}")
    # The mesh tests of this file set run plain (in-process, 127.0.0.1); tests/plugins/test_mesh_tls.py
    # and the lab mesh (remora_testing.netlab.mesh) run with certificates of a test CA.
    if kw.get("tls_dir") is None:
        kw.setdefault("insecure_plain_mesh", True)
    # The registries the mirror may fetch from (?ns=): the test registry by default.
    kw.setdefault("registries", list(REGISTRIES))
    kw.setdefault("listen", ("127.0.0.1", 0))
    kw.setdefault("upload_listen", ("127.0.0.1", 0))
    return PeerConfig(data_dir=tmp / name, schedulers=list(schedulers or []), peer_id=f"peer-{name}", **kw)


async def start_peer(tmp: Path, name: str, schedulers: list[str] | None = None, **kw) -> PeerDaemon:
    return await PeerDaemon(peer_config(tmp, name, schedulers, **kw)).start()


class RegistryProxy:
    """The registry as the peers see it: an aiohttp server on loopback that passes every request on to
    ``target`` (host:port, plain HTTP) and its answer back. Tests that count, delay, refuse or corrupt
    what goes by subclass it and override :meth:`handle`, built from :meth:`forward` and :meth:`respond`."""

    def __init__(self, target: str):
        self.target = target
        self.host = ""

    async def start(self):
        import aiohttp
        from aiohttp import web

        self.session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.host = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if not self.session.closed:
            await self.runner.cleanup()
            await self.session.close()

    async def forward(self, request) -> tuple[int, dict[str, str], bytes, str | None]:
        """Ask the registry what ``request`` asks: (status, headers to send back, body, its Content-Length)."""
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding")}
        body = await request.read()
        async with self.session.request(request.method, f"http://{self.target}{request.path_qs}", headers=headers,
                                        data=body or None, allow_redirects=False) as r:
            data = await r.read()
            out = {k: v for k, v in r.headers.items()
                   if k.lower() not in ("transfer-encoding", "connection", "content-length")}
            return r.status, out, data, r.headers.get("Content-Length")

    @staticmethod
    async def respond(request, status: int, headers: dict[str, str], data: bytes, length: str | None):
        from aiohttp import web

        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = (int(length) if length else None) if request.method == "HEAD" else len(data)
        await resp.prepare(request)
        if request.method != "HEAD":
            await resp.write(data)
        await resp.write_eof()
        return resp

    async def handle(self, request):
        return await self.respond(request, *await self.forward(request))
