"""Test content for the lab registry: big random blobs and small real (runnable) images.

Content is pushed to a registry on 127.0.0.1 in the ROOT namespace whose storage directory the lab's
registry then serves from inside its namespace (see :mod:`remora_testing.netlab.services`): pushing never
needs a client in the root namespace to talk to a lab address.

Images are real: layer 1 is a busybox-static root filesystem (``/bin/sh``, ``sha256sum``, ...) so
``ctr run`` works; further layers carry real files copied from this machine (``extra_paths``) to give
an image the size and compressibility of a real one. Layers are built once per content and cached.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from remora.digest import hash_file
from remora.errors import InvalidInput, RegistryError
from remora.oci import MEDIA_TYPE_OCI_CONFIG as OCI_CONFIG
from remora.oci import MEDIA_TYPE_OCI_LAYER_GZIP as OCI_LAYER_GZIP
from remora.oci import MEDIA_TYPE_OCI_MANIFEST as OCI_MANIFEST

BUSYBOX = "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "ls", "cat", "sha256sum", "sleep", "echo", "true", "wc", "find")


def sha256_file(path: Path) -> str:
    return hash_file(path)[0]


def random_blob(path: Path, size: int, seed: int = 0) -> str:
    """A file of ``size`` incompressible bytes derived from ``seed`` (same seed, same bytes); its digest.

    Kept if it already exists with the right size (the digest is recomputed, never trusted).
    """
    path = Path(path)
    if not (path.exists() and path.stat().st_size == size):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        block = hashlib.sha256(f"remora-netlab-{seed}".encode()).digest()
        with open(tmp, "wb") as f:
            left, counter = size, 0
            while left > 0:
                # SHAKE-256 stream: fast enough (hundreds of MB/s) and incompressible
                chunk = hashlib.shake_256(block + counter.to_bytes(8, "big")).digest(min(left, 1 << 20))
                f.write(chunk)
                left -= len(chunk)
                counter += 1
        tmp.replace(path)
    return sha256_file(path)


@dataclass
class Layer:
    path: Path
    digest: str           # of the compressed blob
    diff_id: str          # of the uncompressed tar
    size: int


def _tar_gz(path: Path, add) -> Layer:
    """Build a reproducible gzip'd tar with ``add(tarfile)``; digest of both forms."""
    raw = path.with_suffix(".tar")
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar)
    diff_id = sha256_file(raw)
    with open(raw, "rb") as src, open(path, "wb") as dst:
        # mtime=0: same input, same digest
        with gzip.GzipFile(fileobj=dst, mode="wb", mtime=0, compresslevel=6) as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
    raw.unlink()
    return Layer(path=path, digest=sha256_file(path), diff_id=diff_id, size=path.stat().st_size)


def _dir_info(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
    return ti


def busybox_layer(path: Path) -> Layer:
    if not os.path.exists(BUSYBOX):
        raise InvalidInput(f"{BUSYBOX} missing: apt-get install busybox-static")

    def add(tar: tarfile.TarFile) -> None:
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev"):
            tar.addfile(_dir_info(d))
        ti = tar.gettarinfo(BUSYBOX, "bin/busybox")
        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
        with open(BUSYBOX, "rb") as f:
            tar.addfile(ti, f)
        for applet in BUSYBOX_APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode, link.mtime = tarfile.SYMTYPE, "busybox", 0o777, 0
            tar.addfile(link)
        data = b"root:x:0:0:root:/:/bin/sh\n"
        ti = tarfile.TarInfo("etc/passwd")
        ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
        tar.addfile(ti, io.BytesIO(data))

    return _tar_gz(path, add)


def files_layer(path: Path, sources: Sequence[str], prefix: str = "data") -> Layer:
    """A layer of real files: each source directory under ``/<prefix>/<its path>``, symlinks kept."""

    def add(tar: tarfile.TarFile) -> None:
        def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
            if not (ti.isfile() or ti.isdir() or ti.issym()):
                return None
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
            return ti
        tar.addfile(_dir_info(prefix))
        for src in sources:
            tar.add(src, arcname=f"{prefix}/{src.strip('/')}", filter=clean)

    return _tar_gz(path, add)


@dataclass
class Image:
    repo: str
    tag: str
    layers: list[Layer]
    config: bytes
    manifest: bytes

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers) + len(self.config)


def build_image(repo: str, tag: str, layers: list[Layer], cmd: Sequence[str] = ("/bin/sh",)) -> Image:
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                   "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size} for layer in layers],
    }, sort_keys=True).encode()
    return Image(repo=repo, tag=tag, layers=layers, config=config, manifest=manifest)


def cached_image(cache: Path, repo: str, tag: str, extra_paths: Sequence[str] = ()) -> Image:
    """busybox (+ one layer of ``extra_paths``) image, layers built once into ``cache``."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps([BUSYBOX, list(extra_paths)]).encode()).hexdigest()[:12]
    layers = []
    for name, build in (("busybox", lambda p: busybox_layer(p)),
                        ("files", (lambda p: files_layer(p, extra_paths)) if extra_paths else None)):
        if build is None:
            continue
        path = cache / f"{name}-{key}.tar.gz"
        meta = path.with_suffix(".json")
        if path.exists() and meta.exists():
            info = json.loads(meta.read_text())
            if sha256_file(path) == info["digest"]:
                layers.append(Layer(path=path, digest=info["digest"], diff_id=info["diff_id"], size=info["size"]))
                continue
        layer = build(path)
        meta.write_text(json.dumps({"digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size}))
        layers.append(layer)
    return build_image(repo, tag, layers)


# --------------------------------------------------------------------------------------------- pushing

def push_blob(base_url: str, repo: str, path: Path | None = None, data: bytes | None = None,
              digest: str | None = None) -> str:
    """Monolithic blob upload (POST then PUT ?digest=); returns the digest."""
    if digest is None:
        digest = sha256_file(path) if path is not None else "sha256:" + hashlib.sha256(data).hexdigest()
    s = requests.Session()
    if s.head(f"{base_url}/v2/{repo}/blobs/{digest}", timeout=30).status_code == 200:
        return digest
    r = s.post(f"{base_url}/v2/{repo}/blobs/uploads/", timeout=30)
    if r.status_code != 202:
        raise RegistryError(f"upload start for {repo}: HTTP {r.status_code} {r.text[:200]}")
    loc = r.headers["Location"]
    if loc.startswith("/"):
        loc = base_url + loc
    sep = "&" if "?" in loc else "?"
    if path is not None:
        with open(path, "rb") as f:
            r = s.put(f"{loc}{sep}digest={digest}", data=f,
                      headers={"Content-Type": "application/octet-stream",
                               "Content-Length": str(Path(path).stat().st_size)}, timeout=600)
    else:
        r = s.put(f"{loc}{sep}digest={digest}", data=data, headers={"Content-Type": "application/octet-stream"},
                  timeout=600)
    if r.status_code != 201:
        raise RegistryError(f"upload of {digest} to {repo}: HTTP {r.status_code} {r.text[:200]}")
    return digest


def push_image(base_url: str, image: Image) -> str:
    for layer in image.layers:
        push_blob(base_url, image.repo, path=layer.path, digest=layer.digest)
    push_blob(base_url, image.repo, data=image.config)
    r = requests.put(f"{base_url}/v2/{image.repo}/manifests/{image.tag}", data=image.manifest,
                     headers={"Content-Type": OCI_MANIFEST}, timeout=60)
    if r.status_code != 201:
        raise RegistryError(f"manifest push {image.repo}:{image.tag}: HTTP {r.status_code} {r.text[:200]}")
    return image.manifest_digest

