"""ImageStore: one interface over OCI layouts and real registries (Debian's docker-registry)."""
import json
import os
import subprocess
import uuid

import pytest

from remora.digest import sha256_digest
from remora.errors import AuthError, DigestMismatch, InvalidInput, NotFound
from remora.imagestore import LayoutStore, RegistryStore, copy_blob, open_store
from remora.oci import MEDIA_TYPE_OCI_LAYER_GZIP, Descriptor, parse_index, parse_manifest, select_platform
from remora_testing.imagebuild import LayerSpec, busybox_image, tar_of_files, write_image, write_index


def _repo(prefix="core"):
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}/img"


def _copy(src, dst, tag):
    """Copy an image between stores using only the ImageStore API (as the converter does)."""
    desc, data = src.resolve()
    m = parse_manifest(data, desc.media_type)
    how = [copy_blob(src, dst, blob) for blob in [m.config, *m.layers]]
    dst.push_manifest(desc, data, tag)
    return desc, how


def test_layout_store_resolve_and_blobs(tmp_path):
    built = busybox_image(f"oci:{tmp_path}/l:v1")
    store = open_store(f"oci:{tmp_path}/l:v1")
    assert isinstance(store, LayoutStore)
    desc, data = store.resolve()
    assert desc.digest == built.descriptor.digest == sha256_digest(data)
    assert store.get_manifest(desc.digest) == data
    m = parse_manifest(data)
    assert store.read_blob(m.config) == built.config
    with store.open_blob(m.layers[0]) as f:
        assert sha256_digest(f.read()) == m.layers[0].digest
    assert store.blob_exists(m.layers[0])
    assert not store.blob_exists(Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, sha256_digest(b"no"), 2))
    # by digest, without a tag
    d2, _ = open_store(f"oci:{tmp_path}/l@{desc.digest}").resolve()
    assert d2.digest == desc.digest


def test_layout_store_missing_things(tmp_path):
    with pytest.raises(NotFound):
        open_store(f"oci:{tmp_path}/nothing:v1").resolve()
    busybox_image(f"oci:{tmp_path}/l:v1")
    with pytest.raises(NotFound):
        open_store(f"oci:{tmp_path}/l:v2").resolve()


def test_layout_store_detects_corrupt_layer(tmp_path):
    built = busybox_image(f"oci:{tmp_path}/l:v1")
    store = open_store(f"oci:{tmp_path}/l:v1")
    layer = built.layers[0]
    path = store.layout.blob_path(layer.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch):
        with store.open_blob(layer) as f:
            f.read()


def test_push_manifest_rejects_mismatched_descriptor(tmp_path):
    store = open_store(f"oci:{tmp_path}/l:v1")
    built = busybox_image(store)
    bad = Descriptor(built.descriptor.media_type, sha256_digest(b"x"), built.descriptor.size)
    with pytest.raises(DigestMismatch):
        store.push_manifest(bad, built.manifest, "v2")


def test_layout_mount_copies_from_other_layout(tmp_path):
    built = busybox_image(f"oci:{tmp_path}/a:v1")
    dst = open_store(f"oci:{tmp_path}/b:v1")
    assert dst.mount_blob(built.layers[0], f"oci:{tmp_path}/a")
    assert dst.blob_exists(built.layers[0])
    assert not dst.mount_blob(Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, sha256_digest(b"z"), 1), str(tmp_path / "a"))


def test_registry_store_round_trip(registry, tmp_path):
    repo = _repo()
    ref = f"{registry.host}/{repo}:v1"
    built = busybox_image(ref)
    with open_store(ref) as store:
        assert isinstance(store, RegistryStore)
        desc, data = store.resolve()
        # the same image built into a layout has the same digest: builds are reproducible
        assert desc.digest == built.descriptor.digest == busybox_image(f"oci:{tmp_path}/l:v1").descriptor.digest
        m = parse_manifest(data, desc.media_type)
        assert json.loads(store.read_blob(m.config))["config"]["Cmd"] == ["sh"]
        with store.open_blob(m.layers[0]) as f:
            assert sha256_digest(f.read()) == m.layers[0].digest
        assert store.blob_exists(m.layers[0])
        assert store.get_manifest(desc) == data
    with open_store(f"{registry.host}/{repo}@{desc.digest}") as by_digest:
        assert by_digest.resolve()[0].digest == desc.digest


def test_registry_store_mount_and_copy_to_layout_and_back(registry, tmp_path):
    src_repo, dst_repo = _repo("src"), _repo("dst")
    built = write_image(f"{registry.host}/{src_repo}:v1",
                        None, [LayerSpec(tar_of_files({"etc/hello": b"hi\n"}), created_by="hello")],
                        {"Cmd": ["cat", "/etc/hello"]}, compression="zstd")
    dst = open_store(f"{registry.host}/{dst_repo}:v1")
    layer = built.layers[0]
    assert not dst.blob_exists(layer)
    assert dst.mount_blob(layer, src_repo)
    assert dst.blob_exists(layer)
    # registry -> layout -> another registry repo, through the generic API only
    layout = open_store(f"oci:{tmp_path}/copy:v1")
    assert _copy(open_store(f"{registry.host}/{src_repo}:v1"), layout, "v1")[1] == ["copied", "copied"]
    back = open_store(f"{registry.host}/{_repo('back')}:v2")
    d, how = _copy(layout, back, "v2")
    assert how == ["copied", "copied"]
    assert back.resolve()[0].digest == d.digest == built.descriptor.digest
    # registry -> same registry: mounted, and a second copy finds everything present
    again = open_store(f"{registry.host}/{_repo('again')}:v1")
    assert _copy(back, again, "v1")[1] == ["mounted", "mounted"]
    assert _copy(back, again, "v1")[1] == ["exists", "exists"]


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))


def test_copy_blob_refuses_corrupt_layout_source(tmp_path):
    built = busybox_image(f"oci:{tmp_path}/src:v1")
    src = open_store(f"oci:{tmp_path}/src:v1")
    _corrupt(src.layout.blob_path(built.layers[0].digest))
    dst = open_store(f"oci:{tmp_path}/dst:v1")
    with pytest.raises(DigestMismatch):
        copy_blob(src, dst, built.layers[0])
    assert not dst.blob_exists(built.layers[0])
    assert copy_blob(src, dst, built.config_descriptor) == "mounted"  # the intact blob still links


def test_registry_serving_corrupt_blob_is_caught(fresh_registry, tmp_path):
    """A registry whose storage rotted (or that lies) cannot slip bad bytes past us."""
    ref = f"{fresh_registry.host}/{_repo()}:v1"
    built = busybox_image(ref)
    hexd = built.layers[0].digest.split(":")[1]
    data_files = list(fresh_registry.root.rglob(f"blobs/sha256/{hexd[:2]}/{hexd}/data"))
    assert len(data_files) == 1
    _corrupt(data_files[0])
    src = open_store(ref)
    dst = open_store(f"oci:{tmp_path}/dst:v1")
    with pytest.raises(DigestMismatch):
        copy_blob(src, dst, built.layers[0])
    assert not dst.blob_exists(built.layers[0])


def test_registry_store_missing_tag(registry):
    with pytest.raises(NotFound):
        open_store(f"{registry.host}/{_repo()}:nope").resolve()


def test_registry_push_blob_with_wrong_digest_is_refused(registry, tmp_path):
    store = open_store(f"{registry.host}/{_repo()}:v1")
    p = tmp_path / "blob"
    p.write_bytes(b"real content")
    bad = Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, sha256_digest(b"other content"), len(b"real content"))
    with pytest.raises(InvalidInput):
        store.push_blob(bad, p)
    assert not store.blob_exists(bad)


def test_auth_registry(auth_registry):
    ((AUTH_USER, AUTH_PASSWORD),) = auth_registry.users.items()
    ref = f"{auth_registry.host}/{_repo()}:v1"
    with pytest.raises(AuthError):
        busybox_image(ref)
    built = busybox_image(open_store(ref, credentials=(AUTH_USER, AUTH_PASSWORD)))
    with open_store(ref, credentials=(AUTH_USER, AUTH_PASSWORD)) as store:
        assert store.resolve()[0].digest == built.descriptor.digest


def test_layouts_interoperate_with_skopeo(tmp_path):
    """skopeo (containers/image) reads our layouts and we read the ones it writes."""
    built = busybox_image(f"oci:{tmp_path}/ours:v1")
    proc = subprocess.run(["skopeo", "copy", "--quiet", f"oci:{tmp_path}/ours:v1", f"oci:{tmp_path}/theirs:copied"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    theirs = open_store(f"oci:{tmp_path}/theirs:copied")
    desc, data = theirs.resolve()
    m = parse_manifest(data, desc.media_type)
    assert [desc.digest for desc in m.layers] == [desc.digest for desc in built.layers]
    with theirs.open_blob(m.layers[0]) as f:
        assert sha256_digest(f.read()) == m.layers[0].digest


def test_registry_index_and_platform_manifest(registry):
    ref = f"{registry.host}/{_repo('multi')}:v1"
    amd = write_image(ref, "amd", [tar_of_files({"arch": b"amd64"})])
    arm = write_image(ref, "arm", [tar_of_files({"arch": b"arm64"})], platform="linux/arm64")
    idx_desc, _ = write_index(ref, None, [amd, arm])
    store = open_store(ref)
    desc, data = store.resolve()
    assert desc.digest == idx_desc.digest
    chosen = select_platform(parse_index(data, desc.media_type), "linux/arm64")
    assert store.get_manifest(chosen) == arm.manifest
    assert select_platform(parse_index(data), "linux/amd64").digest == amd.descriptor.digest


def test_registry_mount_accepts_prefixed_repo_and_refuses_other_registries(registry):
    src_repo = _repo("msrc")
    built = busybox_image(f"{registry.host}/{src_repo}:v1")
    dst = open_store(f"{registry.host}/{_repo()}:v1")
    assert not dst.mount_blob(built.layers[0], "ghcr.io/some/repo")
    assert not dst.mount_blob(built.layers[0], f"{registry.host}/{_repo('empty')}")  # source lacks it
    assert not dst.blob_exists(built.layers[0])
    assert dst.mount_blob(built.layers[0], f"{registry.host}/{src_repo}")
    assert dst.blob_exists(built.layers[0])
