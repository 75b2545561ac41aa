"""The images and workloads of ``bench_cold_start.py``, and how each is built, traced and converted.

Four images, so that no single case decides the result: a minimal Debian whose workload reads one
file (fixed costs dominate), Debian + python3 (the historical case), Debian + Debian's nodejs (a big
shared library that is mostly needed), and a minimal Debian carrying a 100 MiB incompressible file of
which the workload reads 4 MiB (lazy fetch should win big; overlayfs has to move 100 MiB). Each image
has two workloads: ``traced`` (the one remora's prefetch list and eStargz's optimisation were recorded
from) and ``other`` (a different program in the same image: what a prefetch list trained on one entry
point does for another).

Every workload prints a line containing :data:`MARKER`; the harness stops the clock when that line
arrives. Each image is stored three ways in one registry directory: ``1`` (OCI, gzip),
``1-remora`` (``remora convert --prefetch-list``) and ``1-esgz`` (``ctr-remote images optimize --oci``,
which runs the traced workload in a container to order the layer and mark its prioritized files).
Everything is cached under ``<cache>/bench-images`` keyed by the recipe; ``ready.json`` is written last.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from remora_testing.imagebuild import File, LayerSpec, debian_rootfs, tar_of_files, write_image

BUILD_VERSION = "cold-start/5"  # bump when a recipe changes (invalidates the cache)
MARKER = "remora-bench:"
OCI_TAG, REMORA_TAG, ESGZ_TAG = "1", "1-remora", "1-esgz"
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]


def remora_command() -> list[str]:
    """The remora CLI of this interpreter's environment (``remora`` on PATH may belong to another checkout)."""
    script = Path(sys.executable).parent / "remora"
    return [str(script)] if script.exists() else ["remora"]


@dataclass(frozen=True)
class Recipe:
    name: str
    include: tuple[str, ...]                 # Debian packages on top of minbase
    files: Callable[[], dict[str, File]]     # the app layer
    workloads: dict                          # "traced" / "other" -> argv list

    @property
    def repo(self) -> str:
        return f"bench/{self.name}"


PY_MAIN = (b"import json, decimal, email.parser, http.client, argparse, logging, pathlib\n"
           b"print('" + MARKER.encode() + b" python', json.dumps({'decimal': str(decimal.Decimal('1.1'))}))\n")
PY_OTHER = (b"import csv, io, sqlite3, xml.dom.minidom, zipfile, unittest\n"
            b"db = sqlite3.connect(':memory:'); db.execute('create table t(x)');"
            b" db.execute('insert into t values (42)')\n"
            b"print('" + MARKER.encode() + b" python-other', db.execute('select x from t').fetchone()[0])\n")
NODE_OTHER = (b"const crypto = require('crypto'), zlib = require('zlib'), util = require('util');\n"
              b"const z = zlib.gzipSync(Buffer.alloc(1 << 16, 7));\n"
              b"console.log('" + MARKER.encode() + b" node-other',"
              b" crypto.createHash('sha256').update(z).digest('hex').slice(0, 12));\n")
BLOB_MIB = 100


def _blob() -> dict[str, File]:
    """100 MiB of seeded pseudo-random bytes: incompressible, identical on every machine."""
    return {"data/blob.bin": File(random.Random(20261207).randbytes(BLOB_MIB << 20))}


def _read_blob(skip_mib: int, label: str) -> list[str]:
    script = f"dd if=/data/blob.bin bs=1M skip={skip_mib} count=4 status=none | cksum && echo '{MARKER} {label}'"
    return ["sh", "-c", script]


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("minimal", (), dict,
           {"traced": ["sh", "-c", f"read -r v < /etc/debian_version && echo \"{MARKER} minimal $v\""],
            "other": ["sh", "-c", f"wc -l < /usr/share/common-licenses/GPL-3 && echo '{MARKER} minimal-other'"]}),
    Recipe("python", ("python3",), lambda: {"app/main.py": File(PY_MAIN), "app/other.py": File(PY_OTHER)},
           {"traced": ["python3", "/app/main.py"], "other": ["python3", "/app/other.py"]}),
    Recipe("nodejs", ("nodejs",), lambda: {"app/other.js": File(NODE_OTHER)},
           {"traced": ["node", "-e", f"console.log('{MARKER} node', process.version)"],
            "other": ["node", "/app/other.js"]}),
    Recipe("bigblob", (), _blob,
           {"traced": _read_blob(16, "blob"), "other": _read_blob(80, "blob-other")}),
]}
SMOKE_RECIPES = ("minimal",)


@dataclass
class PreparedImage:
    """A registry storage directory holding one recipe's image in its three forms."""

    name: str
    registry_root: Path
    repo: str
    prefetch_files: int
    oci_bytes: int      # compressed layers of the OCI image
    remora_bytes: int   # all blobs of the remora image (bootstrap included)
    esgz_bytes: int     # compressed layers of the eStargz-optimized image (0: not built)

    def tag(self, side: str) -> str:
        return {"overlayfs": OCI_TAG, "remora": REMORA_TAG, "estargz": ESGZ_TAG}[side]


def _cache_dir(cache: Path, recipe: Recipe, base: Path, files: dict[str, File]) -> Path:
    h = hashlib.sha256()
    for k, v in sorted(files.items()):
        h.update(k.encode() + b"\0" + hashlib.sha256(v.data).digest())
    key = hashlib.sha256(json.dumps([BUILD_VERSION, recipe.name, base.name, h.hexdigest(),
                                     recipe.workloads]).encode()).hexdigest()[:12]
    return cache / "bench-images" / f"{recipe.name}-{key}"


def prepare(cache: Path, recipe: Recipe, *, estargz: bool = True, rebuild: bool = False,
            log=print) -> PreparedImage:
    """Build, trace, convert and (if ``estargz``) optimize one recipe's image; cached."""
    from remora_testing.registry import LocalRegistry

    base = debian_rootfs(cache, include=recipe.include)
    files = recipe.files()
    d = _cache_dir(cache, recipe, base, files)
    ready = d / "ready.json"
    if ready.exists() and not rebuild:
        info = json.loads(ready.read_text())
        if info.get("esgz_bytes") or not estargz:
            return PreparedImage(**{**info, "registry_root": d / "registry"})
    else:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        info = None
    hot = d / "hot.txt"
    traced = recipe.workloads["traced"]
    with LocalRegistry(root=d / "registry") as reg:
        src = f"{reg.host}/{recipe.repo}:{OCI_TAG}"
        if info is None:
            t0 = time.monotonic()
            layers = [LayerSpec(base, created_by=f"debootstrap minbase {' '.join(recipe.include)}")]
            if files:
                layers.append(LayerSpec(tar_of_files(files), created_by="COPY app"))
            built = write_image(src, None, layers, config={"Cmd": traced, "WorkingDir": "/", "Env": ENV})
            log(f"{recipe.name}: built in {time.monotonic() - t0:.1f}s")
            _check([*remora_command(), "trace", "-o", str(hot), src, "--", *traced], "remora trace")
            report = json.loads(_check([*remora_command(), "convert", "--json", "--no-progress", "--prefetch-list",
                                        str(hot), src, f"{reg.host}/{recipe.repo}:{REMORA_TAG}"], "remora convert"))
            log(f"{recipe.name}: traced {len(hot.read_text().splitlines())} files and converted")
            info = {"name": recipe.name, "repo": recipe.repo, "prefetch_files": len(hot.read_text().splitlines()),
                    "oci_bytes": sum(layer.size for layer in built.layers),
                    "remora_bytes": int(report["output_bytes"]), "esgz_bytes": 0}
        if estargz:
            t0 = time.monotonic()
            info["esgz_bytes"] = _optimize_estargz(d, reg.host, recipe)
            log(f"{recipe.name}: eStargz-optimized in {time.monotonic() - t0:.1f}s")
    ready.write_text(json.dumps(info))
    return PreparedImage(**info, registry_root=d / "registry")


def _optimize_estargz(d: Path, host: str, recipe: Recipe, src_tag: str = OCI_TAG, dst_tag: str = ESGZ_TAG) -> int:
    """``ctr-remote images optimize --oci`` with the traced workload, pushed as ``dst_tag``."""
    from remora_testing.containerd import PrivateContainerd

    src, dst = f"{host}/{recipe.repo}:{src_tag}", f"{host}/{recipe.repo}:{dst_tag}"
    work = Path(tempfile.mkdtemp(prefix="esgz-", dir=d))
    try:
        with PrivateContainerd(work / "ctd", None) as ctd:
            ctd.ctr("images", "pull", "--plain-http", src, timeout=900)
            argv = recipe.workloads["traced"]
            _check(["ctr-remote", "-a", str(ctd.address), "-n", ctd.namespace, "images", "optimize", "--oci",
                    "--period", "20", "--entrypoint", json.dumps(argv[:1]), "--args", json.dumps(argv[1:]),
                    src, dst], "ctr-remote images optimize")
            ctd.ctr("images", "push", "--plain-http", dst, timeout=900)
            manifest = json.loads(ctd.ctr("content", "get", _manifest_digest(ctd, dst)).stdout)
            return sum(int(layer["size"]) for layer in manifest["layers"])
    finally:
        from remora.snapshotter.storage import detach_mount, mountpoints_under

        for mp in mountpoints_under(work):
            detach_mount(mp)
        shutil.rmtree(work, ignore_errors=True)


def _manifest_digest(ctd, ref: str) -> str:
    for line in ctd.ctr("images", "ls").stdout.splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == ref:
            return cols[2]
    raise RuntimeError(f"{ref} not in ctr images ls")


def _check(argv: list[str], what: str, timeout: float = 900) -> str:
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}{proc.stdout[-2000:]}")
    return proc.stdout


def describe(img: PreparedImage) -> dict:
    d = asdict(img)
    d["registry_root"] = str(d["registry_root"])
    return d


# ------------------------------------------------------------------------------------------ updates

#: The update scenario's v2 of an image, per arm: OCI (overlayfs pulls the changed layer), remora as
#: ``remora convert`` does by default, remora with v1 as chunk dictionary, eStargz-optimized.
UPDATE_TAGS = {"overlayfs": "2", "remora": "2-remora", "remora-dict": "2-remora-dict", "estargz": "2-esgz"}
UPDATE_VERSION = "update/1"  # bump when v2's recipe changes


def v2_files(recipe: Recipe) -> dict[str, File]:
    """v2's app layer: v1's with the traced program changed (a new release of the app); the base
    layer is byte-identical, so the OCI image shares it and only this small layer is new."""
    files = recipe.files()
    if "app/main.py" not in files:
        raise ValueError(f"{recipe.name}: the update scenario needs an app layer with app/main.py")
    main = files["app/main.py"].data.replace(b" python'", b" python-v2'")
    return {**files, "app/main.py": File(main), "app/VERSION": File(b"2.0.0\n")}


@dataclass
class UpdateImage:
    """v1 (``v1``, the PreparedImage) and v2 of one recipe in the same registry directory."""

    v1: PreparedImage
    oci_bytes: int          # v2's OCI layers
    changed_oci_bytes: int  # v2's OCI layers v1 does not have (what overlayfs pulls)
    remora_bytes: int       # v2 converted by default
    remora_dict_bytes: int  # v2 converted with v1 as chunk dictionary (new blobs + bootstrap)
    esgz_bytes: int
    convert_report: dict    # the default conversion's report (what the converter reuses by itself)
    dict_report: dict

    def tag(self, side: str) -> str:
        return UPDATE_TAGS[side]


def prepare_update(cache: Path, recipe: Recipe, v1: PreparedImage, *, estargz: bool = True,
                   log=print) -> UpdateImage:
    """Build v2 (same base layer, :func:`v2_files` as app layer) beside v1 and convert it both ways;
    the prefetch list is v1's (the same program's paths). Cached (``ready-update.json``, written last)."""
    import requests

    from remora_testing.registry import LocalRegistry

    d = v1.registry_root.parent
    ready = d / "ready-update.json"
    files = v2_files(recipe)
    key = hashlib.sha256(json.dumps([UPDATE_VERSION, estargz] + [
        [k, hashlib.sha256(v.data).hexdigest()] for k, v in sorted(files.items())]).encode()).hexdigest()[:12]
    if ready.exists():
        info = json.loads(ready.read_text())
        if info.pop("key", None) == key:
            return UpdateImage(v1=v1, **info)
    hot = d / "hot.txt"
    base = debian_rootfs(cache, include=recipe.include)
    with LocalRegistry(root=d / "registry") as reg:
        ref = f"{reg.host}/{recipe.repo}"
        t0 = time.monotonic()
        built = write_image(f"{ref}:{UPDATE_TAGS['overlayfs']}", None,
                            [LayerSpec(base, created_by=f"debootstrap minbase {' '.join(recipe.include)}"),
                             LayerSpec(tar_of_files(files), created_by="COPY app")],
                            config={"Cmd": recipe.workloads["traced"], "WorkingDir": "/", "Env": ENV})
        v1_manifest = requests.get(f"http://{reg.host}/v2/{recipe.repo}/manifests/{OCI_TAG}", timeout=30,
                                   headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
        v1_layers = {layer["digest"] for layer in v1_manifest["layers"]}
        changed = sum(layer.size for layer in built.layers if layer.digest not in v1_layers)
        log(f"{recipe.name} v2: built in {time.monotonic() - t0:.1f}s, {changed} bytes of changed layers")
        common = [*remora_command(), "convert", "--json", "--no-progress", "--prefetch-list", str(hot)]
        report = json.loads(_check([*common, f"{ref}:{UPDATE_TAGS['overlayfs']}", f"{ref}:{UPDATE_TAGS['remora']}"],
                                   "remora convert v2"))
        dict_report = json.loads(_check([*common, "--chunk-dict", f"{ref}:{REMORA_TAG}",
                                         f"{ref}:{UPDATE_TAGS['overlayfs']}", f"{ref}:{UPDATE_TAGS['remora-dict']}"],
                                        "remora convert v2 --chunk-dict v1"))
        esgz = 0
        if estargz:
            esgz = _optimize_estargz(d, reg.host, recipe, UPDATE_TAGS["overlayfs"], UPDATE_TAGS["estargz"])
        log(f"{recipe.name} v2: converted and optimized in {time.monotonic() - t0:.1f}s")
    info = {"oci_bytes": sum(layer.size for layer in built.layers), "changed_oci_bytes": changed,
            "remora_bytes": int(report["output_bytes"]), "remora_dict_bytes": int(dict_report["output_bytes"]),
            "esgz_bytes": esgz, "convert_report": report, "dict_report": dict_report}
    ready.write_text(json.dumps({**info, "key": key}))
    return UpdateImage(v1=v1, **info)
