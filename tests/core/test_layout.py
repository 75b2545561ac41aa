"""OCI image layouts: index.json round trips, tag resolution, atomic verified blob writes."""
import io
import json
import multiprocessing
import os

import pytest

from remora.digest import sha256_digest
from remora.errors import DigestMismatch, InvalidInput, NotFound, UsageError
from remora.layout import OCILayout
from remora.oci import ANNOTATION_REF_NAME, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST, Descriptor, Manifest


def _store_manifest(layout: OCILayout, tag: str | None, payload: bytes = b"{}") -> Descriptor:
    cd, cs = layout.write_blob_bytes(payload)
    data = Manifest(Descriptor(MEDIA_TYPE_OCI_CONFIG, cd, cs), []).to_bytes()
    d, s = layout.write_blob_bytes(data)
    return layout.add_manifest(Descriptor(MEDIA_TYPE_OCI_MANIFEST, d, s), tag)


def test_init_creates_spec_files(tmp_path):
    layout = OCILayout.init(tmp_path / "l")
    assert json.loads((tmp_path / "l" / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    idx = json.loads((tmp_path / "l" / "index.json").read_text())
    assert idx["schemaVersion"] == 2 and idx["manifests"] == []
    assert (tmp_path / "l" / "blobs" / "sha256").is_dir()
    assert OCILayout.init(tmp_path / "l").path == layout.path  # idempotent


def test_init_refuses_non_empty_foreign_dir(tmp_path):
    (tmp_path / "junk").write_text("x")
    with pytest.raises(UsageError):
        OCILayout.init(tmp_path)


def test_open_missing_or_bad(tmp_path):
    with pytest.raises(NotFound):
        OCILayout.open(tmp_path)
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(InvalidInput):
        OCILayout.open(tmp_path)


def test_blob_write_and_verified_read(tmp_path):
    layout = OCILayout.init(tmp_path)
    data = os.urandom(3 << 20)
    digest, size = layout.write_blob(io.BytesIO(data), sha256_digest(data), len(data))
    assert (digest, size) == (sha256_digest(data), len(data))
    assert layout.blob_path(digest).read_bytes() == data
    assert layout.read_blob(digest, size) == data
    assert list(layout.blobs()) == [digest]


def test_blob_write_with_wrong_digest_leaves_nothing(tmp_path):
    layout = OCILayout.init(tmp_path)
    wrong = sha256_digest(b"other")
    with pytest.raises(DigestMismatch):
        layout.write_blob(io.BytesIO(b"data"), wrong)
    with pytest.raises(InvalidInput, match="truncated"):
        layout.write_blob(io.BytesIO(b"data"), sha256_digest(b"data!"), 5)
    assert not layout.has_blob(wrong)
    assert list(layout.blobs()) == []
    assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []


def test_corrupt_blob_on_disk_raises_digest_mismatch(tmp_path):
    layout = OCILayout.init(tmp_path)
    digest, size = layout.write_blob_bytes(b"precious bytes")
    layout.blob_path(digest).write_bytes(b"precious bytez")  # bit rot, same size
    with pytest.raises(DigestMismatch):
        layout.read_blob(digest, size)
    with pytest.raises(DigestMismatch):
        with layout.open_blob(digest, size) as f:
            f.read()
    layout.blob_path(digest).write_bytes(b"precious")  # truncated
    with pytest.raises(InvalidInput, match="truncated"):
        layout.read_blob(digest, size)


def test_index_round_trip_and_tag_replacement(tmp_path):
    layout = OCILayout.init(tmp_path)
    v1 = _store_manifest(layout, "v1", b'{"n":1}')
    v2 = _store_manifest(layout, "v2", b'{"n":2}')
    assert layout.resolve("v1").digest == v1.digest and layout.resolve("v2").digest == v2.digest
    v1b = _store_manifest(layout, "v1", b'{"n":3}')  # retag v1
    tags = layout.tags()
    assert set(tags) == {"v1", "v2"} and tags["v1"].digest == v1b.digest
    assert len(layout.read_index().manifests) == 2
    # the raw file is a valid OCI index with the ref.name annotation
    raw = json.loads((tmp_path / "index.json").read_text())
    assert {m["annotations"][ANNOTATION_REF_NAME] for m in raw["manifests"]} == {"v1", "v2"}
    # resolve by digest and by a blob that is not in index.json (old v1)
    assert layout.resolve(digest=v2.digest).digest == v2.digest
    assert layout.resolve(digest=v1.digest).media_type == MEDIA_TYPE_OCI_MANIFEST


def test_resolve_errors_and_single_image(tmp_path):
    layout = OCILayout.init(tmp_path)
    with pytest.raises(NotFound, match="empty"):
        layout.resolve()
    only = _store_manifest(layout, None)
    assert layout.resolve().digest == only.digest
    _store_manifest(layout, "x", b'{"x":1}')
    with pytest.raises(UsageError, match="holds 2 images"):
        layout.resolve()
    with pytest.raises(NotFound, match="tags: x"):
        layout.resolve("nope")
    with pytest.raises(NotFound):
        layout.resolve(digest=sha256_digest(b"nothing"))


def test_add_manifest_requires_blob(tmp_path):
    layout = OCILayout.init(tmp_path)
    with pytest.raises(NotFound):
        layout.add_manifest(Descriptor(MEDIA_TYPE_OCI_MANIFEST, sha256_digest(b"x"), 1), "t")


def _tag_many(path, start):
    layout = OCILayout.open(path)
    for i in range(start, start + 10):
        _store_manifest(layout, f"t{i}", json.dumps({"i": i}).encode())


def test_concurrent_writers_keep_all_tags(tmp_path):
    OCILayout.init(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_tag_many, args=(tmp_path, s)) for s in (0, 10, 20)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert set(OCILayout.open(tmp_path).tags()) == {f"t{i}" for i in range(30)}


def test_copy_blob_between_layouts(tmp_path):
    a = OCILayout.init(tmp_path / "a")
    b = OCILayout.init(tmp_path / "b")
    d, s = a.write_blob_bytes(b"shared")
    assert b.copy_blob_from(a, d, s)
    assert b.read_blob(d) == b"shared"
    assert not b.copy_blob_from(a, sha256_digest(b"missing"))


def _init_and_tag(path, i):
    _store_manifest(OCILayout.init(path), f"p{i}", json.dumps({"p": i}).encode())


def test_concurrent_init_of_a_new_layout(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_init_and_tag, args=(tmp_path / "new", i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert set(OCILayout.open(tmp_path / "new").tags()) == {"p0", "p1", "p2", "p3"}


def test_index_json_without_media_type_is_read(tmp_path):
    """Layouts written before image-spec 1.1 (and by some tools) omit mediaType in index.json."""
    layout = OCILayout.init(tmp_path)
    desc = _store_manifest(layout, "v1")
    raw = json.loads((tmp_path / "index.json").read_text())
    del raw["mediaType"]
    (tmp_path / "index.json").write_text(json.dumps(raw))
    assert layout.resolve("v1").digest == desc.digest
    _store_manifest(layout, "v2", b'{"v":2}')  # and it can be updated
    assert set(layout.tags()) == {"v1", "v2"}
