"""Build real OCI images from real content, for tests, benchmarks and ``remora demo``.

No Dockerfile, no daemon: layers are tar streams (built from directories or from a mapping of
paths), compressed with :mod:`remora.compression`, and pushed with a proper config (diff_ids,
history) and manifest through an :class:`~remora.imagestore.ImageStore`, so the same helper fills
a registry or an OCI layout. Output is reproducible: the same input gives the same manifest digest
(fixed ``created`` time, sorted tar entries, clamped mtimes, deterministic compression headers).

Real-content builders, each cached on disk so they run once per machine:

- :func:`busybox_rootfs` - /bin/busybox (busybox-static) plus applet symlinks; < 1 s.
- :func:`debian_rootfs` - ``debootstrap --variant=minbase`` of bookworm (needs root and the Debian
  archive); cached as an uncompressed layer tar keyed by its arguments.
- :func:`python_app_layers` - a three-version "deps + app" series built from pinned PyPI wheels,
  where each version upgrades one package but re-emits the whole deps layer (what most Dockerfiles
  do), the case chunk-level dedup is meant to win.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from remora.compression import compress_stream
from remora.errors import InvalidInput, StorageError, UsageError
from remora.mounts import unmount_below
from remora.oci import (
    MEDIA_TYPE_DOCKER_CONFIG,
    MEDIA_TYPE_DOCKER_LAYER,
    MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_DOCKER_LAYER_ZSTD,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    OCI_LAYER_MEDIA_TYPE_FOR,
    Descriptor,
    Index,
    Manifest,
    Platform,
    canonical_json,
)

#: The default image creation time: fixed so builds are reproducible.
FIXED_CREATED = "2024-01-01T00:00:00Z"
#: mtime (seconds) given to entries of synthetic tars and clamped into directory tars by default.
FIXED_MTIME = 1704067200
_DOCKER_LAYER_FOR = {"gzip": MEDIA_TYPE_DOCKER_LAYER_GZIP, "zstd": MEDIA_TYPE_DOCKER_LAYER_ZSTD,
                     "none": MEDIA_TYPE_DOCKER_LAYER}

# --- tar construction ------------------------------------------------------------------------------


@dataclass(frozen=True)
class File:
    data: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Hardlink:
    target: str  # path inside the archive of an earlier regular file


@dataclass(frozen=True)
class Whiteout:
    """Deletes ``path`` from lower layers (an ``.wh.<name>`` entry)."""


@dataclass(frozen=True)
class OpaqueDir:
    """Hides the lower layers' contents of this directory (``.wh..wh..opq``)."""


Entry = File | Dir | Symlink | Hardlink | Whiteout | OpaqueDir | bytes | str


def _add_xattrs(ti: tarfile.TarInfo, xattrs: Mapping[str, bytes]) -> None:
    for name, value in sorted(xattrs.items()):
        ti.pax_headers["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")


def tar_of_files(entries: Mapping[str, Entry], mtime: int = FIXED_MTIME) -> bytes:
    """An uncompressed layer tar from ``{path: entry}``, entries written in path order.

    ``bytes`` means a regular file, a ``str`` value a symlink target. Parent directories are
    added automatically (0755 root) when not listed, as real layer tars have them.
    """
    items: dict[str, Entry] = {}
    for path, entry in entries.items():
        p = path.strip("/")
        if not p or ".." in p.split("/"):
            raise UsageError(f"bad path in layer: {path!r}")
        parts = p.split("/")
        for i in range(1, len(parts)):
            items.setdefault("/".join(parts[:i]), Dir())
        items[p] = entry
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(items):
            entry = items[path]
            if isinstance(entry, bytes):
                entry = File(entry)
            elif isinstance(entry, str):
                entry = Symlink(entry)
            name = path
            if isinstance(entry, Whiteout):
                head, _, base = path.rpartition("/")
                name = f"{head}/.wh.{base}" if head else f".wh.{base}"
                entry = File(b"")
            elif isinstance(entry, OpaqueDir):
                tar.addfile(_tarinfo(path, tarfile.DIRTYPE, 0o755, mtime))
                name, entry = f"{path}/.wh..wh..opq", File(b"")
            if isinstance(entry, File):
                ti = _tarinfo(name, tarfile.REGTYPE, entry.mode, mtime, entry.uid, entry.gid)
                ti.size = len(entry.data)
                _add_xattrs(ti, entry.xattrs)
                tar.addfile(ti, io.BytesIO(entry.data))
            elif isinstance(entry, Dir):
                tar.addfile(_tarinfo(name, tarfile.DIRTYPE, entry.mode, mtime, entry.uid, entry.gid))
            elif isinstance(entry, Symlink):
                ti = _tarinfo(name, tarfile.SYMTYPE, 0o777, mtime)
                ti.linkname = entry.target
                tar.addfile(ti)
            elif isinstance(entry, Hardlink):
                ti = _tarinfo(name, tarfile.LNKTYPE, 0o644, mtime)
                ti.linkname = entry.target.strip("/")
                tar.addfile(ti)
    return buf.getvalue()


def _tarinfo(name: str, typ: bytes, mode: int, mtime: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = typ, mode, mtime, uid, gid
    ti.uname = ti.gname = ""
    return ti


def dir_to_tar(path: str | Path, dest: str | Path | BinaryIO | None = None, *,
               clamp_mtime: int | None = None) -> bytes | None:
    """Pack a real root file system directory into a layer tar.

    Entries are sorted, owners numeric (no user names), hard links kept as links, devices, fifos
    and extended attributes (``security.capability`` ...) preserved. ``clamp_mtime`` caps mtimes
    (SOURCE_DATE_EPOCH semantics) for reproducible output. Returns the bytes when ``dest`` is None,
    else writes to ``dest`` (a path or a binary file) and returns None.
    """
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    if dest is None:
        buf = io.BytesIO()
        _write_dir_tar(root, buf, clamp_mtime)
        return buf.getvalue()
    if isinstance(dest, (str, Path)):
        with open(dest, "wb") as f:
            _write_dir_tar(root, f, clamp_mtime)
    else:
        _write_dir_tar(root, dest, clamp_mtime)
    return None


def _walk_sorted(root: Path, rel: str = "") -> Iterable[str]:
    """Relative paths under ``root`` depth-first in sorted order (parents before children)."""
    for n in sorted(os.listdir(root / rel if rel else root)):
        r = f"{rel}/{n}" if rel else n
        yield r
        if stat.S_ISDIR(os.lstat(root / r).st_mode):
            yield from _walk_sorted(root, r)


def _write_dir_tar(root: Path, out: BinaryIO, clamp_mtime: int | None) -> None:
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in _walk_sorted(root):
            full = root / rel
            ti = tar.gettarinfo(str(full), arcname=rel)  # tracks inodes: later links become LNKTYPE
            if ti is None:  # sockets cannot be archived
                continue
            ti.uname = ti.gname = ""
            if clamp_mtime is not None and ti.mtime > clamp_mtime:
                ti.mtime = clamp_mtime
            try:
                names = os.listxattr(full, follow_symlinks=False)
            except OSError:
                names = []
            _add_xattrs(ti, {n: os.getxattr(full, n, follow_symlinks=False) for n in names})
            if ti.isreg():
                with open(full, "rb") as f:
                    tar.addfile(ti, f)
            else:
                tar.addfile(ti)


# --- images ----------------------------------------------------------------------------------------


@dataclass
class LayerSpec:
    """One layer: uncompressed tar bytes, a path to a tar file, or a directory to pack."""

    source: bytes | str | Path
    created_by: str = ""
    compression: str | None = None  # override write_image's compression for this layer
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class BuiltImage:
    """What :func:`write_image` stored."""

    descriptor: Descriptor  # of the manifest
    manifest: bytes
    config: bytes
    config_descriptor: Descriptor
    layers: list[Descriptor]
    diff_ids: list[str]


def _as_store(target):
    from remora.imagestore import ImageStore, LayoutStore, open_store
    from remora.layout import OCILayout
    from remora.reference import LayoutRef
    if isinstance(target, ImageStore):
        return target, False
    if isinstance(target, OCILayout):
        return LayoutStore(LayoutRef(str(target.path))), True
    if isinstance(target, (str, Path)):
        return open_store(str(target)), True
    raise UsageError(f"cannot write an image to {target!r}")


def _layer_source(spec: LayerSpec, tmpdir: str) -> Path:
    if isinstance(spec.source, bytes):
        p = Path(tempfile.mkstemp(dir=tmpdir, suffix=".tar")[1])
        p.write_bytes(spec.source)
        return p
    src = Path(spec.source)
    if src.is_dir():
        p = Path(tempfile.mkstemp(dir=tmpdir, suffix=".tar")[1])
        dir_to_tar(src, p, clamp_mtime=FIXED_MTIME)
        return p
    if not src.is_file():
        raise UsageError(f"layer source {src} is neither a tar file nor a directory")
    return src


def write_image(target, tag: str | None, layers: list[LayerSpec | bytes | str | Path], config: dict | None = None,
                compression: str = "gzip", *, created: str = FIXED_CREATED, platform: str = "linux/amd64",
                media_types: str = "oci", annotations: dict[str, str] | None = None,
                level: int | None = None) -> BuiltImage:
    """Build and store an image; returns what was written.

    ``target`` is an :class:`~remora.imagestore.ImageStore`, an :class:`~remora.layout.OCILayout`
    or a reference string; ``tag=None`` uses the reference's tag, if any. ``config`` is the runtime
    section (``{"Cmd": ["sh"], "Env": [...]}``).
    ``media_types`` is ``"oci"`` or ``"docker"`` (schema2). Layers that are already present in the
    destination are not uploaded again.
    """
    if media_types not in ("oci", "docker"):
        raise UsageError(f"media_types must be 'oci' or 'docker', not {media_types!r}")
    plat = Platform.parse(platform)
    store, owned = _as_store(target)
    tag = tag or getattr(store.ref, "tag", None)
    try:
        layer_descs, diff_ids, history = [], [], []
        with tempfile.TemporaryDirectory(prefix="remora-build-") as tmpdir:
            for i, spec in enumerate(layers):
                if not isinstance(spec, LayerSpec):
                    spec = LayerSpec(spec)
                comp = spec.compression or compression
                src = _layer_source(spec, tmpdir)
                blob = Path(tmpdir) / f"layer-{i}.blob"
                with open(src, "rb") as fin, open(blob, "wb") as fout:
                    res = compress_stream(fin, fout, comp, level)
                mt = (_DOCKER_LAYER_FOR if media_types == "docker" else OCI_LAYER_MEDIA_TYPE_FOR)[comp]
                desc = Descriptor(mt, res.digest, res.size, annotations=dict(spec.annotations))
                if not store.blob_exists(desc):
                    store.push_blob(desc, blob)
                layer_descs.append(desc)
                diff_ids.append(res.diff_id)
                history.append({"created": created, "created_by": spec.created_by or f"layer {i}"})
        cfg = {"architecture": plat.architecture, "os": plat.os, "created": created,
               "config": dict(config or {}), "rootfs": {"type": "layers", "diff_ids": diff_ids},
               "history": history}
        if plat.variant:
            cfg["variant"] = plat.variant
        config_bytes = canonical_json(cfg)
        config_desc = store.push_bytes(config_bytes, MEDIA_TYPE_DOCKER_CONFIG if media_types == "docker"
                                       else MEDIA_TYPE_OCI_CONFIG)
        manifest = Manifest(config=config_desc, layers=layer_descs,
                            media_type=(MEDIA_TYPE_DOCKER_MANIFEST if media_types == "docker"
                                        else MEDIA_TYPE_OCI_MANIFEST),
                            annotations=dict(annotations or {}))
        data = manifest.to_bytes()
        mdesc = Descriptor(manifest.media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data),
                           platform=plat)
        store.push_manifest(mdesc, data, tag)
        return BuiltImage(mdesc, data, config_bytes, config_desc, layer_descs, diff_ids)
    finally:
        if owned:
            store.close()


def write_index(target, tag: str | None, images: list[BuiltImage | Descriptor], *,
                media_types: str = "oci") -> tuple[Descriptor, bytes]:
    """Store an index (multi-platform image) over already written manifests."""
    store, owned = _as_store(target)
    tag = tag or getattr(store.ref, "tag", None)
    try:
        descs = [i.descriptor if isinstance(i, BuiltImage) else i for i in images]
        if any(d.platform is None for d in descs):
            raise UsageError("every manifest in an index needs a platform")
        index = Index(manifests=descs, media_type=MEDIA_TYPE_DOCKER_MANIFEST_LIST if media_types == "docker"
                      else MEDIA_TYPE_OCI_INDEX)
        data = index.to_bytes()
        desc = Descriptor(index.media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
        store.push_manifest(desc, data, tag)
        return desc, data
    finally:
        if owned:
            store.close()


# --- real-content builders -------------------------------------------------------------------------

BUSYBOX_PATH = "/bin/busybox"


def busybox_rootfs(dest: str | Path, busybox: str = BUSYBOX_PATH) -> Path:
    """Populate ``dest`` with a minimal busybox system (static binary, applet links, /etc basics)."""
    dest = Path(dest)
    if not os.path.isfile(busybox):
        raise UsageError(f"{busybox} not found: install busybox-static")
    applets = subprocess.run([busybox, "--list-full"], check=True, capture_output=True, text=True).stdout.split()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "proc", "sys", "dev", "root", "var"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    for applet in applets:
        link = dest / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath("/bin/busybox", "/" + os.path.dirname(applet)), link)
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (dest / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return dest


def busybox_layer() -> bytes:
    """The busybox rootfs as an uncompressed, reproducible layer tar (~2 MB)."""
    with tempfile.TemporaryDirectory(prefix="remora-busybox-") as tmp:
        root = busybox_rootfs(Path(tmp) / "rootfs")
        return dir_to_tar(root, clamp_mtime=FIXED_MTIME)


def busybox_image(target, tag: str | None = None, compression: str = "gzip", **kw) -> BuiltImage:
    """A runnable one-layer busybox image (``Cmd ["sh"]``); builds in well under a second."""
    return write_image(target, tag, [LayerSpec(busybox_layer(), created_by="busybox rootfs")],
                       {"Cmd": ["sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}, compression, **kw)


@dataclass
class _CacheLock:
    path: Path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def debian_rootfs(cache_dir: str | Path, include: Iterable[str] = ("python3",), *, suite: str = "bookworm",
                  mirror: str = "http://deb.debian.org/debian", arch: str = "amd64") -> Path:
    """A debootstrapped Debian rootfs as an uncompressed layer tar (cached; returns its path).

    Runs ``debootstrap --variant=minbase --include=...`` once per argument set and machine (a file
    lock serialises concurrent callers), then removes apt caches/lists so the image is realistic
    but not bloated. Needs root and the Debian archive.
    """
    include = sorted(set(include))
    cache = Path(cache_dir) / "debian-rootfs"
    key = _cache_key("debian-rootfs/1", suite, mirror, arch, include)
    final = cache / f"{suite}-{arch}-{key}.tar"
    if final.is_file():
        return final
    if os.geteuid() != 0:
        raise UsageError("debian_rootfs needs root (debootstrap creates device nodes and chowns files)")
    with _CacheLock(cache / f".{key}.lock"):
        if final.is_file():
            return final
        work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache))
        try:
            root = work / "rootfs"
            cmd = ["debootstrap", "--variant=minbase", f"--arch={arch}"]
            if include:
                cmd.append("--include=" + ",".join(include))
            cmd += [suite, str(root), mirror]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                log = (root / "debootstrap" / "debootstrap.log")
                detail = log.read_text(errors="replace")[-2000:] if log.exists() else proc.stderr[-2000:]
                raise StorageError(f"debootstrap failed ({proc.returncode}): {detail}")
            for d in ("var/cache/apt", "var/lib/apt/lists"):
                for p in (root / d).glob("*"):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                        if d == "var/lib/apt/lists" and p.name == "partial":
                            p.mkdir()
                    elif p.name != "lock":
                        p.unlink()
            shutil.rmtree(root / "var" / "log" / "apt", ignore_errors=True)
            tmp_tar = work / "rootfs.tar"
            dir_to_tar(root, tmp_tar)
            os.rename(tmp_tar, final)
        finally:
            _umount_below(work)
            shutil.rmtree(work, ignore_errors=True)
    return final


def _umount_below(path: Path) -> None:
    """Unmount anything debootstrap left mounted under ``path`` (it mounts proc/sys while
    installing and may not unmount them when it fails), deepest first, before deleting."""
    unmount_below(path)


#: Pinned pure-python wheels for the deps layer (resolved from PyPI once, then cached).
PYTHON_DEPS = ("requests==2.31.0", "urllib3==2.0.7", "idna==3.6", "certifi==2023.11.17",
               "rich==13.7.0", "markdown-it-py==3.0.0", "mdurl==0.1.2", "attrs==23.2.0",
               "packaging==23.2", "six==1.16.0", "jinja2==3.1.2", "click==8.1.7",
               # a data app's typical heavy dependencies: the layer is then the bulk of the image,
               # as in real python services, which is where cross-version dedup pays
               "numpy==1.26.4", "pandas==2.1.4", "python-dateutil==2.8.2", "pytz==2023.3.post1",
               "tzdata==2023.4")
#: The package each new app version upgrades (one per version after the first).
PYTHON_UPGRADES = ("pygments==2.15.1", "pygments==2.16.1", "pygments==2.17.2")
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"

_APP_MAIN = '''"""Tiny service used by remora benchmarks: imports its deps like a real app would."""
import sys
import requests, rich, pygments, jinja2, click, attrs

VERSION = {version!r}


def main():
    print(f"app {{VERSION}} pygments {{pygments.__version__}} requests {{requests.__version__}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def _fetch_wheels(cache: Path, specs: Iterable[str]) -> dict[str, Path]:
    """``{spec: wheel path}``, downloading missing ones with ``pip download`` (PyPI only)."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    index = wheels / "index.json"
    known = json.loads(index.read_text()) if index.exists() else {}
    missing = [s for s in specs if s not in known or not (wheels / known[s]).is_file()]
    # pip resolves one version per name per call: download in batches with distinct names.
    batches: list[list[str]] = []
    for spec in missing:
        name = spec.partition("==")[0].lower()
        for batch in batches:
            if all(s.partition("==")[0].lower() != name for s in batch):
                batch.append(spec)
                break
        else:
            batches.append([spec])
    for batch in batches:
        with tempfile.TemporaryDirectory(dir=wheels) as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "--python-version", "3.11", "-d", tmp, *batch],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise StorageError(f"pip download {' '.join(batch)} failed: {proc.stderr[-1500:]}")
            got = {p.name: p for p in Path(tmp).glob("*.whl")}
            for spec in batch:
                name, _, version = spec.partition("==")
                norm = name.replace("-", "_").lower()
                match = [n for n in got if n.lower().startswith(f"{norm}-{version}-")]
                if len(match) != 1:
                    raise InvalidInput(f"pip download did not produce one wheel for {spec}: {sorted(got)}")
                os.replace(got[match[0]], wheels / match[0])
                known[spec] = match[0]
            index.write_text(json.dumps(known, indent=1, sort_keys=True))
    return {s: wheels / known[s] for s in specs}


def _wheel_entries(path: Path) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            mode = (info.external_attr >> 16) & 0o777 or 0o644
            out[f"{SITE_PACKAGES}/{info.filename}"] = File(z.read(info), mode=mode)
    return out


def python_app_layers(cache_dir: str | Path, versions: int = 3) -> list[list[Path]]:
    """``versions`` releases of a Python app, each as ``[deps_layer.tar, app_layer.tar]`` paths.

    Stack them on :func:`debian_rootfs` (python3 3.11 reads ``/usr/local/lib/python3.11/
    dist-packages``). Version N+1 upgrades pygments and re-emits the whole deps layer, so most of
    its files are byte-identical to version N's while the layer digest differs: the realistic
    workload for chunk dedup. Tars are cached under ``cache_dir/python-app``.
    """
    if not 1 <= versions <= len(PYTHON_UPGRADES):
        raise UsageError(f"versions must be 1..{len(PYTHON_UPGRADES)}")
    cache = Path(cache_dir) / "python-app"
    key = _cache_key("python-app/1", PYTHON_DEPS, PYTHON_UPGRADES)
    out_dir = cache / key
    result = [[out_dir / f"v{v + 1}-deps.tar", out_dir / f"v{v + 1}-app.tar"] for v in range(versions)]
    if all(p.is_file() for pair in result for p in pair):
        return result
    with _CacheLock(cache / f".{key}.lock"):
        out_dir.mkdir(parents=True, exist_ok=True)
        wheels = _fetch_wheels(cache, PYTHON_DEPS + PYTHON_UPGRADES[:versions])
        base: dict[str, Entry] = {}
        for spec in PYTHON_DEPS:
            base.update(_wheel_entries(wheels[spec]))
        for v, (deps_path, app_path) in enumerate(result):
            if deps_path.is_file() and app_path.is_file():
                continue
            entries = dict(base)
            entries.update(_wheel_entries(wheels[PYTHON_UPGRADES[v]]))
            app = {"app/main.py": File(_APP_MAIN.format(version=f"1.{v}.0").encode()),
                   "app/VERSION": f"1.{v}.0\n".encode()}
            for path, data in ((deps_path, tar_of_files(entries)), (app_path, tar_of_files(app))):
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
    return result
