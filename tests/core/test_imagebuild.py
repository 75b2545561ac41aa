"""Image building: real content, reproducible digests, faithful directory tars."""
import io
import os
import socket
import subprocess
import tarfile

import pytest

from remora.compression import open_layer_stream
from remora.digest import sha256_digest
from remora.errors import UsageError
from remora.imagestore import open_store
from remora.layout import OCILayout
from remora.oci import (
    MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_LAYER,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
    ImageConfig,
    parse_index,
    parse_manifest,
    select_platform,
)
from remora_testing.imagebuild import (
    Dir,
    File,
    Hardlink,
    OpaqueDir,
    Whiteout,
    busybox_image,
    busybox_layer,
    debian_rootfs,
    dir_to_tar,
    python_app_layers,
    tar_of_files,
    write_image,
    write_index,
)


def _members(tar_bytes):
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as t:
        return {m.name: m for m in t.getmembers()}


def test_busybox_image_runs_in_a_chroot(tmp_path):
    built = busybox_image(f"oci:{tmp_path}/l:v1")
    store = open_store(f"oci:{tmp_path}/l:v1")
    root = tmp_path / "root"
    root.mkdir()
    with store.open_blob(built.layers[0]) as f, open_layer_stream(f, built.layers[0].media_type) as tar_stream:
        with tarfile.open(fileobj=tar_stream, mode="r|") as t:
            # PEP 706 filters exist from 3.11.4 (Debian 12's python3 is 3.11.2 without them): trusted
            # content, so the pre-filter behaviour, asked for explicitly where the argument exists.
            t.extractall(root, **({"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}))
    out = subprocess.run(["chroot", str(root), "/bin/sh", "-c", "echo hello from $(basename $(readlink /bin/ls))"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello from busybox"
    cfg = ImageConfig.from_bytes(built.config)
    assert cfg.config["Cmd"] == ["sh"] and len(cfg.diff_ids) == 1


def test_write_image_is_reproducible(tmp_path):
    layers = [tar_of_files({"a/b": b"1"}), tar_of_files({"c": b"2", "a/b": Whiteout()})]
    d1 = write_image(f"oci:{tmp_path}/x:v1", None, layers, {"Cmd": ["x"]})
    d2 = write_image(f"oci:{tmp_path}/y:v1", None, layers, {"Cmd": ["x"]})
    assert d1.descriptor.digest == d2.descriptor.digest
    assert d1.manifest == d2.manifest and d1.config == d2.config
    d3 = write_image(f"oci:{tmp_path}/z:v1", None, layers, {"Cmd": ["x"]}, created="2025-01-01T00:00:00Z")
    assert d3.descriptor.digest != d1.descriptor.digest
    assert d3.layers == d1.layers  # only the config changed


def test_write_image_diff_ids_and_media_types(tmp_path):
    tars = [tar_of_files({"f": b"x" * 1000}), tar_of_files({"g": b"y"})]
    built = write_image(OCILayout.init(tmp_path / "l"), "t", tars, compression="zstd")
    assert built.diff_ids == [sha256_digest(t) for t in tars]
    assert all(desc.media_type == MEDIA_TYPE_OCI_LAYER_ZSTD for desc in built.layers)
    assert ImageConfig.from_bytes(built.config).diff_ids == built.diff_ids
    plain = write_image(f"oci:{tmp_path}/p:t", None, tars, compression="none")
    assert plain.layers[0].media_type == MEDIA_TYPE_OCI_LAYER and plain.layers[0].digest == built.diff_ids[0]
    docker = write_image(f"oci:{tmp_path}/d:t", None, tars, media_types="docker")
    m = parse_manifest(docker.manifest)
    assert m.media_type == MEDIA_TYPE_DOCKER_MANIFEST and m.layers[0].media_type == MEDIA_TYPE_DOCKER_LAYER_GZIP
    with pytest.raises(UsageError):
        write_image(f"oci:{tmp_path}/e:t", None, tars, media_types="appc")


def test_write_index_multi_platform(tmp_path):
    ref = f"oci:{tmp_path}/m:multi"
    amd = write_image(f"oci:{tmp_path}/m:amd", None, [tar_of_files({"arch": b"amd64"})])
    arm = write_image(f"oci:{tmp_path}/m:arm", None, [tar_of_files({"arch": b"arm64"})], platform="linux/arm64/v8")
    desc, data = write_index(ref, None, [amd, arm])
    store = open_store(ref)
    got, raw = store.resolve()
    assert got.digest == desc.digest and raw == data
    assert select_platform(parse_index(raw), "linux/arm64").digest == arm.descriptor.digest


def test_tar_of_files_entries():
    tar = tar_of_files({"usr/bin/tool": File(b"#!/bin/sh\n", mode=0o755, uid=1000, gid=1000,
                                             xattrs={"user.k": b"v\xff"}),
                        "usr/bin/alias": Hardlink("usr/bin/tool"), "usr/lib": "../lib", "etc": OpaqueDir(),
                        "var/gone": Whiteout(), "opt": Dir(mode=0o700)})
    m = _members(tar)
    order = list(m)
    for name in order:  # parents precede children, implicit parents were added
        parent = name.rpartition("/")[0]
        assert not parent or order.index(parent) < order.index(name)
    assert m["usr"].isdir() and m["usr/bin/tool"].mode == 0o755 and m["usr/bin/tool"].uid == 1000
    assert m["usr/bin/tool"].pax_headers["SCHILY.xattr.user.k"].encode("utf-8", "surrogateescape") == b"v\xff"
    assert m["usr/bin/alias"].islnk() and m["usr/bin/alias"].linkname == "usr/bin/tool"
    assert m["usr/lib"].issym() and m["usr/lib"].linkname == "../lib"
    assert "etc/.wh..wh..opq" in m and "var/.wh.gone" in m and m["opt"].mode == 0o700
    with pytest.raises(UsageError):
        tar_of_files({"../escape": b"x"})


def test_dir_to_tar_keeps_links_devices_owners_xattrs(tmp_path):
    root = tmp_path / "root"
    (root / "b").mkdir(parents=True)
    (root / "b" / "file").write_bytes(b"content")
    os.link(root / "b" / "file", root / "a-link")
    os.symlink("b/file", root / "sym")
    os.chown(root / "b" / "file", 1234, 5678)
    os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))
    os.mkfifo(root / "fifo")
    os.setxattr(root / "b" / "file", "user.remora", b"\x00\x01binary")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))  # sockets cannot be archived: skipped, not an error
    sock.close()
    data = dir_to_tar(root)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        names = t.getnames()
        m = {x.name: x for x in t.getmembers()}
    assert names == ["a-link", "b", "b/file", "fifo", "null", "sym"]  # sorted, depth-first
    # the first path seen is the file, the second a hard link to it
    assert m["a-link"].isreg() and m["b/file"].islnk() and m["b/file"].linkname == "a-link"
    assert (m["a-link"].uid, m["a-link"].gid, m["a-link"].uname, m["a-link"].gname) == (1234, 5678, "", "")
    assert m["null"].ischr() and (m["null"].devmajor, m["null"].devminor) == (1, 3)
    assert m["fifo"].isfifo() and m["sym"].issym()
    assert m["a-link"].pax_headers["SCHILY.xattr.user.remora"].encode("utf-8", "surrogateescape") == b"\x00\x01binary"
    assert dir_to_tar(root) == data  # deterministic


def test_busybox_layer_content():
    layer = busybox_layer()
    m = _members(layer)
    assert m["bin/busybox"].isreg() and m["bin/busybox"].mode & 0o111
    assert m["bin/sh"].issym() and m["bin/sh"].linkname == "busybox"
    assert m["usr/bin/env"].linkname == "../../bin/busybox"
    assert m["tmp"].mode == 0o1777
    assert busybox_layer() == layer


def test_python_app_layers_series(cache_dir):
    versions = python_app_layers(cache_dir)
    assert len(versions) == 3
    deps = [_members(p.read_bytes()) for p, _ in versions]
    digests = {sha256_digest(p.read_bytes()) for p, _ in versions}
    assert len(digests) == 3  # every version re-emits a different deps layer
    site = "usr/local/lib/python3.11/dist-packages"
    assert f"{site}/requests/__init__.py" in deps[0] and f"{site}/pygments/__init__.py" in deps[0]
    # ... but most of its files are unchanged: only pygments moved
    with tarfile.open(versions[0][0]) as a, tarfile.open(versions[1][0]) as b:
        fa = {m.name: a.extractfile(m).read() for m in a if m.isreg()}
        fb = {m.name: b.extractfile(m).read() for m in b if m.isreg()}
    same = sum(1 for n in fa if fb.get(n) == fa[n])
    changed = [n for n in fa if n in fb and fb[n] != fa[n]]
    assert same > 0.5 * len(fa) and changed
    assert all(n.startswith(f"{site}/pygments") for n in changed)
    app = _members(versions[2][1].read_bytes())
    assert "app/main.py" in app


@pytest.mark.slow
def test_debian_rootfs_is_a_real_cleaned_debian(cache_dir):
    path = debian_rootfs(cache_dir)  # debootstraps on the first run on a machine (~90 s), cached after
    assert debian_rootfs(cache_dir) == path
    with tarfile.open(path) as t:
        names = set(t.getnames())
        release = t.extractfile("etc/debian_version").read().decode()
    assert {"usr/bin/python3", "usr/bin/sh", "usr/bin/apt-get", "etc/os-release"} <= names
    assert release.startswith("12")
    assert not [n for n in names if n.startswith("var/lib/apt/lists/") and n.endswith("_Packages")]
    assert not [n for n in names if n.startswith("var/cache/apt/") and n.endswith(".bin")]
