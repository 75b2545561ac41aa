"""remora convert / check / unpack end to end against a real registry and OCI layouts.

The reference for "the flattened rootfs" is GNU tar (remora_testing.rootfs), not remora's own
merge, so a bug in the merge shows up as a difference.
"""
from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from remora import oci
from remora.converter.check import check
from remora.converter.convert import ConvertOptions, convert
from remora.converter.image import LocalBlobs, RemoraImage
from remora.converter.unpack import unpack
from remora.errors import DigestMismatch, InvalidInput, NotFound, StorageError
from remora.format import annotations as ann
from remora.format.chunker import ChunkingSpec
from remora.imagestore import open_store
from remora_testing.imagebuild import LayerSpec, write_image
from remora_testing.rootfs import compare_trees, flatten_with_gnu_tar
from remora_testing.tarbuild import LayerBuilder

CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
LONG_DIR = "d" * 120 + "/" + "e" * 120
T = 1_700_000_000
SHARED = __import__("random").Random(7).randbytes(3 * 1024 * 1024 + 123)  # incompressible, deterministic


def layer_one() -> bytes:
    b = LayerBuilder()
    b.add_dir("etc", mtime=T).add_dir("usr", mtime=T).add_dir("usr/bin", mtime=T)
    b.add_dir("data", mode=0o750, uid=5, gid=6, mtime=T)
    b.add_file("etc/hello", b"hello v1\n", mtime=T)
    b.add_file("usr/bin/su", b"\x7fELF-su" * 100, mode=0o4755, mtime=T)
    b.add_file("usr/bin/wall", b"\x7fELF-wall" * 50, mode=0o2755, gid=5, mtime=T)
    b.add_file("usr/bin/ping", b"\x7fELF-ping" * 70, mode=0o755, xattrs={"security.capability": CAP}, mtime=T)
    b.add_dir("tmp", mode=0o1777, mtime=T)
    b.add_file("data/owned", b"owned by 1000\n", uid=1000, gid=1000, mode=0o600,
               xattrs={"user.note": b"\x00binary\xff"}, mtime=T + 1)
    b.add_file("data/a", b"A" * 5000, mtime=T)
    b.add_hardlink("data/hl", "data/a")
    b.add_file("data/empty", b"", mtime=T)
    b.add_file("data/gone", b"deleted later\n", mtime=T)
    b.add_symlink("etc/alt", "../data/a", mtime=T)
    b.add_symlink("etc/abs", "/etc/hello", mtime=T)
    b.add_dir("dev", mtime=T).add_char("dev/null", 1, 3, mtime=T).add_block("dev/loop0", 7, 0, mtime=T)
    b.add_dir("run", mtime=T).add_fifo("run/fifo", mtime=T)
    b.add_file(LONG_DIR + "/" + "f" * 200, b"long name\n", mtime=T)
    b.add_file("données/naïve.txt", "non-ascii ✓\n".encode(), mtime=T)
    b.add_file(b"data/raw\xff\xfename", b"non-utf8 name\n", mtime=T)
    b.add_dir("opq", mtime=T).add_file("opq/lower1", b"1", mtime=T).add_file("opq/lower2", b"2", mtime=T)
    b.add_file("rep", b"file that becomes a dir\n", mtime=T)
    b.add_dir("rep2", mtime=T).add_file("rep2/child", b"c", mtime=T)
    b.add_file("shared/big1", SHARED, mtime=T)
    return b.build("none")


def layer_two() -> bytes:
    b = LayerBuilder()
    b.whiteout("data/gone")
    b.add_dir("opq", mode=0o700, mtime=T + 5)
    b.add_file("opq/new", b"new in layer 2\n", mtime=T + 5)
    b.opaque("opq")                                   # marker after the same-layer child
    b.add_hardlink("data/hl2", "data/a", mtime=T)     # link to a file from the lower layer
    b.add_dir("rep", mtime=T + 5).add_file("rep/x", b"x", mtime=T + 5)
    b.add_file("rep2", b"dir became a file\n", mtime=T + 5)
    b.add_file("etc/hello", b"hello v2\n", mtime=T + 5)
    b.add_sparse("data/sparse", 64 * 1024 * 1024, {0: b"head", 40 * 1024 * 1024: b"middle" * 1000}, mtime=T)
    return b.build("none")


def layer_three() -> bytes:
    b = LayerBuilder()
    b.add_dir("app", mtime=T + 9)
    b.add_file("app/main.py", b"print('hi')\n" * 100, mtime=T + 9)
    # same content as shared/big1 in layer 1: must be stored once
    b.add_file("app/big-copy", SHARED, mtime=T + 9)
    return b.build("none")


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, registry):
    """The crafted image pushed to the registry (gzip, plain and zstd layers) and its reference rootfs."""
    tmp = tmp_path_factory.mktemp("crafted")
    layers = [layer_one(), layer_two(), layer_three()]
    paths = []
    for i, data in enumerate(layers):
        p = tmp / f"layer{i}.tar"
        p.write_bytes(data)
        paths.append(p)
    ref = f"{registry.host}/crafted/app:1"
    write_image(ref, None, [LayerSpec(layers[0], compression="gzip"), LayerSpec(layers[1], compression="none"),
                            LayerSpec(layers[2], compression="zstd")], config={"Cmd": ["/app/main.py"]})
    reference = tmp / "reference"
    declared = flatten_with_gnu_tar(paths, reference)
    return {"ref": ref, "reference": reference, "declared": declared, "layers": paths, "tmp": tmp}


def _open(ref: str, tmp: Path) -> tuple[RemoraImage, LocalBlobs]:
    image = RemoraImage.open(open_store(ref), tmp / "meta")
    return image, LocalBlobs(image, tmp / "blobs")


def test_roundtrip_equals_reference_flatten(crafted, registry, tmp_path):
    dst = f"{registry.host}/crafted/app:1-remora"
    report = convert(crafted["ref"], dst, ConvertOptions(progress=False))
    assert report.layers == 3
    image, blobs = _open(dst, tmp_path)
    try:
        res = check(image, blobs)
        assert res.ok, res.problems
        stats = unpack(image, tmp_path / "rootfs", blobs)
    finally:
        image.close()
    assert stats.warnings == []
    problems = compare_trees(crafted["reference"], tmp_path / "rootfs", declared_dirs=crafted["declared"])
    assert problems == []
    # spot checks that would catch a comparator that compares nothing
    root = tmp_path / "rootfs"
    assert os.getxattr(root / "usr/bin/ping", "security.capability") == CAP
    assert os.stat(root / "usr/bin/su").st_mode & 0o7777 == 0o4755
    assert not (root / "data/gone").exists() and not (root / "opq/lower1").exists()
    assert (root / "opq/new").read_bytes() == b"new in layer 2\n"
    assert os.stat(root / "data/hl2").st_ino == os.stat(root / "data/a").st_ino == os.stat(root / "data/hl").st_ino
    assert os.path.getsize(root / "data/sparse") == 64 * 1024 * 1024
    assert os.stat(root / "data/sparse").st_blocks * 512 < 8 * 1024 * 1024, "holes must stay holes"
    assert (root / os.fsdecode(b"data/raw\xff\xfename")).read_bytes() == b"non-utf8 name\n"


def test_dedup_across_layers_and_annotations(crafted, registry):
    dst = f"{registry.host}/crafted/app:1-dedup"
    report = convert(crafted["ref"], dst, ConvertOptions(progress=False))
    # shared/big1 (layer 1) and app/big-copy (layer 3) are the same 3 MiB: stored once
    assert report.bytes_deduped >= 3 * 1024 * 1024
    assert 0 < report.dedup_ratio < 1
    store = open_store(dst)
    desc, data = store.resolve()
    manifest = oci.parse_manifest(data, desc.media_type)
    roles = [desc.annotations[ann.ROLE] for desc in manifest.layers]
    assert roles[-1] == "bootstrap" and set(roles[:-1]) == {"blob"}
    boot = manifest.layers[-1]
    for layer in manifest.layers:
        assert layer.annotations[ann.VERSION] == "1"
        assert layer.annotations[ann.BOOTSTRAP] == boot.digest
        assert layer.media_type in (ann.BLOB_MEDIA_TYPE, ann.BOOTSTRAP_MEDIA_TYPE)
    cfg = oci.ImageConfig.from_bytes(store.open_blob(manifest.config).read())
    assert len(cfg.diff_ids) == len(manifest.layers)
    assert cfg.config["Cmd"] == ["/app/main.py"]
    # data blobs are valid tar layers (a runtime without remora can apply them)
    blob = store.open_blob(manifest.layers[0]).read()
    with tarfile.open(fileobj=__import__("io").BytesIO(blob)) as tf:
        assert [m.name for m in tf.getmembers()] == ["remora.blob"]


def test_reproducible_whatever_the_threads(crafted, registry):
    a = convert(crafted["ref"], f"{registry.host}/crafted/app:repro-a", ConvertOptions(progress=False, workers=1))
    b = convert(crafted["ref"], f"{registry.host}/crafted/app:repro-b", ConvertOptions(progress=False, workers=4))
    assert a.manifest_digest == b.manifest_digest
    c = convert(crafted["ref"], f"{registry.host}/crafted/app:repro-c",
                ConvertOptions(progress=False, chunking=ChunkingSpec("cdc", 256 * 1024)))
    assert c.manifest_digest != a.manifest_digest  # options change the output


def test_prefetch_files_first_and_in_order(crafted, registry, tmp_path):
    order = ["/app/main.py", "/etc/hello", "/usr/bin/su", "/not/there"]
    dst = f"{registry.host}/crafted/app:1-prefetch"
    report = convert(crafted["ref"], dst, ConvertOptions(progress=False, prefetch_list=order))
    assert report.prefetch_files == 3
    image, _ = _open(dst, tmp_path)
    try:
        bs = image.bootstrap
        inos = bs.prefetch_inodes()
        assert inos == [bs.lookup_path(p).ino for p in order[:3]]
        assert bs.paths_of(inos + [10**9]) == {ino: p.encode() for ino, p in zip(inos, order)}, \
            "a path per inode, through the directory entries; an unknown inode has none"
        first_blob = image.manifest.layers[0].digest
        offsets = []
        for ino in inos:
            for ext in bs.read_plan(ino, 0, bs.getattr(ino).size):
                assert ext.blob == first_blob, "prefetch files must live in the first blob"
                offsets.append((ext.frame.offset, ext.chunk.frame_offset))
        assert offsets == sorted(offsets), "prefetch files must be laid out in access order"
        # The hot blob says so, with its size, so a snapshotter can fetch it before the bootstrap.
        layers = image.manifest.layers
        assert ann.prefetch_bytes(layers[0].annotations) == layers[0].size
        assert all(ann.PREFETCH_BYTES not in desc.annotations for desc in layers[1:])
    finally:
        image.close()


def test_oci_fallback_index(crafted, registry, tmp_path):
    dst = f"{registry.host}/crafted/app:1-fallback"
    report = convert(crafted["ref"], dst, ConvertOptions(progress=False, with_oci_fallback=True))
    store = open_store(dst)
    desc, data = store.resolve()
    index = oci.parse_index(data, desc.media_type)
    assert desc.digest == report.tagged_digest
    assert len(index.manifests) == 2
    original, remora_m = index.manifests
    src_desc, _ = open_store(crafted["ref"]).resolve()
    assert original.digest == src_desc.digest and ann.MANIFEST_MARKER not in original.annotations
    assert remora_m.digest == report.manifest_digest and remora_m.annotations[ann.MANIFEST_MARKER] == "1"
    assert original.platform.os == "linux" and remora_m.platform.architecture == "amd64"
    image, blobs = _open(dst, tmp_path)  # remora's tools pick the remora entry
    try:
        assert image.manifest_desc.digest == report.manifest_digest
    finally:
        image.close()


def test_chunk_dict_reuses_registry_blobs(crafted, registry, tmp_path):
    base = f"{registry.host}/crafted/app:dict-base"
    convert(crafted["ref"], base, ConvertOptions(progress=False))
    # version 2: same layers plus one new small layer
    v2 = f"{registry.host}/crafted/app:2"
    extra = LayerBuilder().add_file("app/new.txt", b"version 2\n").build("none")
    write_image(v2, None,
                [LayerSpec(p.read_bytes(), compression="gzip") for p in crafted["layers"]] + [LayerSpec(extra)])
    without = convert(v2, f"{registry.host}/other/app:2-nodict", ConvertOptions(progress=False))
    dict_file = tmp_path / "app.dict"
    rc = subprocess.run(["remora", "dict", "build", str(dict_file), base], capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    dst = f"{registry.host}/other/app:2-remora"
    with_dict = convert(v2, dst, ConvertOptions(progress=False, chunk_dict=str(dict_file)))
    assert with_dict.bytes_reused > 3 * 1024 * 1024
    assert with_dict.uploaded_bytes < without.uploaded_bytes / 5
    assert with_dict.mounted_blobs >= 1          # mounted from crafted/app into other/app
    image, blobs = _open(dst, tmp_path)
    try:
        assert check(image, blobs).ok
        unpack(image, tmp_path / "rootfs", blobs)
    finally:
        image.close()
    assert (tmp_path / "rootfs/app/new.txt").read_bytes() == b"version 2\n"
    assert (tmp_path / "rootfs/etc/hello").read_bytes() == b"hello v2\n"
    # an image reference works as a dictionary too
    by_ref = convert(v2, f"{registry.host}/crafted/app:2-byref", ConvertOptions(progress=False, chunk_dict=base))
    assert by_ref.bytes_reused == with_dict.bytes_reused


def test_layout_to_layout_and_cli_json(crafted, registry, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["remora", "convert", crafted["ref"], f"oci:{out}:v1", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["manifest_digest"].startswith("sha256:") and report["files"] > 10
    assert report["uploaded_bytes"] == report["new_blob_bytes"] + len(open_store(f"oci:{out}:v1").open_blob(
        oci.parse_manifest(open_store(f"oci:{out}:v1").resolve()[1]).config).read())
    proc = subprocess.run(["remora", "check", f"oci:{out}:v1"], capture_output=True, text=True)
    assert proc.returncode == 0 and "OK" in proc.stdout
    # second conversion uploads nothing new
    again = convert(crafted["ref"], f"oci:{out}:v1", ConvertOptions(progress=False))
    assert again.uploaded_bytes == 0


def test_check_detects_corrupted_blob(crafted, registry, tmp_path):
    out = tmp_path / "layout"
    convert(crafted["ref"], f"oci:{out}:v1", ConvertOptions(progress=False))
    manifest = oci.parse_manifest(open_store(f"oci:{out}:v1").resolve()[1])
    blob = out / "blobs" / "sha256" / manifest.layers[0].digest[7:]
    data = bytearray(blob.read_bytes())
    data[600] ^= 0xFF
    blob.write_bytes(bytes(data))
    proc = subprocess.run(["remora", "check", f"oci:{out}:v1"], capture_output=True, text=True)
    assert proc.returncode == 3
    assert "digest" in (proc.stdout + proc.stderr).lower()


# -- bad input: a clear error, nothing pushed ----------------------------------------------------

def _tag_exists(ref: str) -> bool:
    try:
        open_store(ref).resolve()
        return True
    except NotFound:
        return False


def test_truncated_gzip_layer(registry, tmp_path):
    import gzip

    raw = gzip.compress(LayerBuilder().add_file("a", os.urandom(300_000)).build("none"))
    layout = tmp_path / "src"
    img = write_image(f"oci:{layout}:1", None, [LayerSpec(b"placeholder-replaced-below", compression="none")])
    _replace_layer(layout, img, raw[: len(raw) // 2], oci.MEDIA_TYPE_OCI_LAYER_GZIP, diff_id=None)
    dst = f"{registry.host}/bad/gzip:1"
    with pytest.raises(InvalidInput, match="(?i)truncated|corrupt|gzip"):
        convert(f"oci:{layout}:1", dst, ConvertOptions(progress=False))
    assert not _tag_exists(dst)


def test_corrupt_zstd_layer(registry, tmp_path):
    import zstandard

    layer = LayerBuilder().add_file("a", os.urandom(100_000)).build("none")
    raw = bytearray(zstandard.ZstdCompressor().compress(layer))
    raw[len(raw) // 2] ^= 0xFF
    layout = tmp_path / "src"
    img = write_image(f"oci:{layout}:1", None, [LayerSpec(b"x", compression="none")])
    _replace_layer(layout, img, bytes(raw), oci.MEDIA_TYPE_OCI_LAYER_ZSTD, diff_id=None)
    with pytest.raises(InvalidInput):
        convert(f"oci:{layout}:1", f"{registry.host}/bad/zstd:1", ConvertOptions(progress=False))


def test_tar_that_lies_about_sizes(registry, tmp_path):
    good = LayerBuilder().add_file("a", b"x" * 10000).build("none")
    lying = good[:512 + 4000]  # header says 10000 bytes, stream ends after 4000
    layout = tmp_path / "src"
    img = write_image(f"oci:{layout}:1", None, [LayerSpec(b"x", compression="none")])
    _replace_layer(layout, img, lying, oci.MEDIA_TYPE_OCI_LAYER,
                   diff_id="sha256:" + __import__("hashlib").sha256(lying).hexdigest())
    with pytest.raises(InvalidInput, match="(?i)truncated"):
        convert(f"oci:{layout}:1", f"{registry.host}/bad/tar:1", ConvertOptions(progress=False))


def test_diff_id_mismatch(registry, tmp_path):
    layout = tmp_path / "src"
    layer = LayerBuilder().add_file("a", b"content").build("none")
    img = write_image(f"oci:{layout}:1", None, [LayerSpec(layer, compression="gzip")])
    import gzip
    _replace_layer(layout, img, gzip.compress(layer), oci.MEDIA_TYPE_OCI_LAYER_GZIP, diff_id="sha256:" + "0" * 64)
    with pytest.raises(DigestMismatch):
        convert(f"oci:{layout}:1", f"{registry.host}/bad/diffid:1", ConvertOptions(progress=False))


def test_blob_digest_mismatch_in_layout(registry, tmp_path):
    layout = tmp_path / "src"
    img = write_image(f"oci:{layout}:1", None, [LayerSpec(LayerBuilder().add_file("a", b"abc" * 1000).build("none"))])
    blob = layout / "blobs" / "sha256" / img.layers[0].digest[7:]
    data = bytearray(blob.read_bytes())
    data[-5] ^= 1
    blob.write_bytes(bytes(data))
    dst = f"{registry.host}/bad/digest:1"
    with pytest.raises((DigestMismatch, InvalidInput)):
        convert(f"oci:{layout}:1", dst, ConvertOptions(progress=False))
    assert not _tag_exists(dst)


def test_unknown_media_type(registry, tmp_path):
    layout = tmp_path / "src"
    img = write_image(f"oci:{layout}:1", None, [LayerSpec(LayerBuilder().add_file("a", b"abc").build("none"))])
    _replace_layer(layout, img, None, "application/vnd.example.encrypted+tar", diff_id=None)
    proc = subprocess.run(["remora", "convert", f"oci:{layout}:1", f"{registry.host}/bad/mt:1"],
                          capture_output=True, text=True)
    assert proc.returncode == 3
    assert "unsupported layer media type" in proc.stderr


def test_registry_errors_have_exit_codes(auth_registry, registry, tmp_path):
    # 401 without credentials
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "no-docker-config")}
    proc = subprocess.run(["remora", "convert", f"{auth_registry.host}/x/y:1", f"oci:{tmp_path}/o:1"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 4, proc.stderr
    # 404
    proc = subprocess.run(["remora", "convert", f"{registry.host}/does/not-exist:1", f"oci:{tmp_path}/o:1"],
                          capture_output=True, text=True)
    assert proc.returncode == 5, proc.stderr
    # nothing listening
    from remora.procutil import free_port
    proc = subprocess.run(["remora", "convert", f"127.0.0.1:{free_port()}/x/y:1", f"oci:{tmp_path}/o:1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 6, proc.stderr


def test_disk_full_is_storage_error(crafted, registry, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        dst = f"{registry.host}/bad/full:1"
        with pytest.raises(StorageError, match="disk full"):
            convert(crafted["ref"], dst, ConvertOptions(progress=False, workdir=small / "work"))
        assert not _tag_exists(dst)
    finally:
        # a worker may still be closing a file there: retry until it is done, else detach lazily
        deadline = time.monotonic() + 5
        while subprocess.run(["umount", str(small)], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                subprocess.run(["umount", "-l", str(small)], check=True)
                break
            os.sched_yield()


def _replace_layer(layout: Path, img, blob: bytes | None, media_type: str, diff_id: str | None) -> None:
    """Rewrite a layout image's only layer (and config/manifest) to craft bad input with valid digests."""
    import hashlib

    from remora.layout import OCILayout

    lay = OCILayout.open(layout)
    manifest = oci.parse_manifest(img.manifest)
    cfg = json.loads(img.config)
    if blob is not None:
        digest, size = lay.write_blob_bytes(blob)
    else:
        digest, size = manifest.layers[0].digest, manifest.layers[0].size
    if diff_id is None and blob is not None:
        diff_id = cfg["rootfs"]["diff_ids"][0]
    if diff_id is not None:
        cfg["rootfs"]["diff_ids"] = [diff_id]
    cfg_bytes = oci.canonical_json(cfg)
    cdigest, csize = lay.write_blob_bytes(cfg_bytes)
    new = oci.Manifest(config=oci.Descriptor(oci.MEDIA_TYPE_OCI_CONFIG, cdigest, csize),
                       layers=[oci.Descriptor(media_type, digest, size)])
    data = new.to_bytes()
    store = open_store(f"oci:{layout}:1")
    desc = oci.Descriptor(oci.MEDIA_TYPE_OCI_MANIFEST, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    store.push_manifest(desc, data, "1")


@pytest.mark.slow
def test_real_debian_python_image_roundtrip(registry, cache_dir, tmp_path):
    """A real image (debootstrap minbase + python3, ~175 MB) converts, checks and unpacks to exactly
    what GNU tar extracts from the same layer."""
    from remora_testing.imagebuild import debian_rootfs

    tar = debian_rootfs(cache_dir)
    src = f"{registry.host}/real/debian-python:12"
    write_image(src, None, [LayerSpec(tar)], config={"Cmd": ["python3"]})
    dst = f"{registry.host}/real/debian-python:12-remora"
    report = convert(src, dst, ConvertOptions(progress=False))
    assert report.files > 5000
    assert report.output_bytes < report.input_compressed_bytes, "no larger than the gzip image"
    assert report.bootstrap_bytes < 0.02 * report.input_compressed_bytes
    image, blobs = _open(dst, tmp_path)
    try:
        res = check(image, blobs)
        assert res.ok, res.problems[:5]
        unpack(image, tmp_path / "rootfs", blobs)
    finally:
        image.close()
    reference = tmp_path / "reference"
    declared = flatten_with_gnu_tar([Path(tar)], reference)
    assert compare_trees(reference, tmp_path / "rootfs", declared_dirs=declared) == []
    python = tmp_path / "rootfs" / "usr/bin/python3.11"
    assert python.stat().st_size > 1_000_000 and os.access(python, os.X_OK)


def test_oversized_manifest_is_rejected(registry, tmp_path):
    layout = tmp_path / "src"
    img = write_image(f"oci:{layout}:1", None, [LayerSpec(LayerBuilder().add_file("a", b"abc").build("none"))])
    manifest = json.loads(img.manifest)
    manifest["annotations"] = {"padding": "x" * (5 * 1024 * 1024)}
    data = json.dumps(manifest).encode()
    from remora.layout import OCILayout
    lay = OCILayout.open(layout)
    digest, size = lay.write_blob_bytes(data)
    lay.add_manifest(oci.Descriptor(oci.MEDIA_TYPE_OCI_MANIFEST, digest, size), "big")
    with pytest.raises(InvalidInput, match="limit"):
        convert(f"oci:{layout}:big", f"{registry.host}/bad/big:1", ConvertOptions(progress=False))
