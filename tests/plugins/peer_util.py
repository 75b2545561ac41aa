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
