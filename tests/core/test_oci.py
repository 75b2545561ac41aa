"""OCI data model: strict parsing, canonical JSON, platform selection."""
import json

import pytest

from remora.digest import sha256_digest
from remora.errors import InvalidInput, NotFound, UnsupportedMediaType
from remora.oci import (
    ANNOTATION_REF_NAME,
    MAX_MANIFEST_SIZE,
    MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_LAYER,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_LAYER_NONDIST_ZSTD,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
    MEDIA_TYPE_OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    canonical_json,
    layer_compression,
    parse_manifest,
    parse_manifest_or_index,
    select_platform,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def manifest_dict(mt=MEDIA_TYPE_OCI_MANIFEST):
    return {"schemaVersion": 2, "mediaType": mt,
            "config": {"mediaType": MEDIA_TYPE_OCI_CONFIG, "digest": D1, "size": 10},
            "layers": [{"mediaType": MEDIA_TYPE_OCI_LAYER_GZIP, "digest": D2, "size": 20,
                        "annotations": {"a": "b"}, "urls": ["https://example/x"]}]}


def test_manifest_round_trip_keeps_annotations_and_urls():
    data = json.dumps(manifest_dict()).encode()
    m = parse_manifest_or_index(data, MEDIA_TYPE_OCI_MANIFEST)
    assert isinstance(m, Manifest)
    assert m.layers[0].annotations == {"a": "b"} and m.layers[0].urls == ("https://example/x",)
    assert parse_manifest(m.to_bytes()) == m


def test_docker_manifest_and_list():
    m = manifest_dict(MEDIA_TYPE_DOCKER_MANIFEST)
    m["layers"][0]["mediaType"] = MEDIA_TYPE_DOCKER_LAYER_GZIP
    parsed = parse_manifest_or_index(json.dumps(m).encode(), MEDIA_TYPE_DOCKER_MANIFEST)
    assert parsed.media_type == MEDIA_TYPE_DOCKER_MANIFEST
    lst = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_DOCKER_MANIFEST_LIST,
           "manifests": [{"mediaType": MEDIA_TYPE_DOCKER_MANIFEST, "digest": D3, "size": 5,
                          "platform": {"os": "linux", "architecture": "amd64"}}]}
    idx = parse_manifest_or_index(json.dumps(lst).encode())
    assert isinstance(idx, Index) and idx.manifests[0].platform == Platform("linux", "amd64")


def test_media_type_from_shape_when_absent():
    m = manifest_dict()
    del m["mediaType"]
    assert isinstance(parse_manifest_or_index(json.dumps(m).encode()), Manifest)
    assert isinstance(parse_manifest_or_index(b'{"schemaVersion":2,"manifests":[]}'), Index)


@pytest.mark.parametrize("mutate, exc", [
    (lambda m: m.pop("config"), InvalidInput),
    (lambda m: m.pop("layers"), InvalidInput),
    (lambda m: m["layers"][0].pop("digest"), InvalidInput),
    (lambda m: m["layers"][0].update(size=-1), InvalidInput),
    (lambda m: m["layers"][0].update(size="20"), InvalidInput),
    (lambda m: m["layers"][0].update(size=True), InvalidInput),
    (lambda m: m["layers"][0].update(digest="sha256:nothex"), InvalidInput),
    (lambda m: m["config"].update(annotations={"a": 1}), InvalidInput),
    (lambda m: m.update(schemaVersion=1), UnsupportedMediaType),
    (lambda m: m.update(schemaVersion=3), InvalidInput),
    (lambda m: m.update(mediaType="application/vnd.example+json"), UnsupportedMediaType),
])
def test_invalid_manifests(mutate, exc):
    m = manifest_dict()
    mutate(m)
    with pytest.raises(exc):
        parse_manifest_or_index(json.dumps(m).encode())


def test_not_json_and_not_object():
    with pytest.raises(InvalidInput, match="JSON"):
        parse_manifest_or_index(b"{not json")
    with pytest.raises(InvalidInput):
        parse_manifest_or_index(b"[1,2]")
    with pytest.raises(InvalidInput):
        parse_manifest_or_index(b"\xff\xfe")


def test_media_type_claim_must_match_body():
    with pytest.raises(InvalidInput, match="does not match"):
        parse_manifest_or_index(json.dumps(manifest_dict()).encode(), MEDIA_TYPE_OCI_INDEX)


def test_unknown_transport_media_type():
    m = manifest_dict()
    del m["mediaType"]
    with pytest.raises(UnsupportedMediaType):
        parse_manifest_or_index(json.dumps(m).encode(), "text/plain")


def test_oversized_manifest_rejected():
    m = manifest_dict()
    m["annotations"] = {"pad": "x" * MAX_MANIFEST_SIZE}
    with pytest.raises(InvalidInput, match="limit"):
        parse_manifest_or_index(json.dumps(m).encode())


def test_canonical_json_is_deterministic():
    a = {"b": 1, "a": [3, {"z": "é", "y": None}]}
    b = {"a": [3, {"y": None, "z": "é"}], "b": 1}
    assert canonical_json(a) == canonical_json(b) == '{"a":[3,{"y":null,"z":"é"}],"b":1}'.encode()
    # Descriptor/Manifest serialisation is canonical too: same object -> same digest
    m1 = parse_manifest(json.dumps(manifest_dict(), indent=4).encode())
    m2 = parse_manifest(json.dumps(manifest_dict()).encode())
    assert sha256_digest(m1.to_bytes()) == sha256_digest(m2.to_bytes())


@pytest.mark.parametrize("mt, comp", [
    (MEDIA_TYPE_OCI_LAYER, "none"), (MEDIA_TYPE_OCI_LAYER_GZIP, "gzip"), (MEDIA_TYPE_OCI_LAYER_ZSTD, "zstd"),
    (MEDIA_TYPE_DOCKER_LAYER_GZIP, "gzip"), (MEDIA_TYPE_OCI_LAYER_NONDIST_ZSTD, "zstd"),
])
def test_layer_compression(mt, comp):
    assert layer_compression(mt) == comp


def test_layer_compression_unknown():
    with pytest.raises(UnsupportedMediaType):
        layer_compression("application/vnd.oci.image.layer.v1.tar+gzip+encrypted")


def _index():
    def entry(d, os_, arch, variant=None):
        return Descriptor(MEDIA_TYPE_OCI_MANIFEST, d, 1, platform=Platform(os_, arch, variant))
    return Index([entry(D1, "unknown", "unknown"), entry(D2, "linux", "arm64", "v8"), entry(D3, "linux", "amd64")])


def test_select_platform():
    idx = _index()
    assert select_platform(idx, "linux/amd64").digest == D3
    assert select_platform(idx, "linux/arm64").digest == D2
    assert select_platform(idx, "linux/arm64/v8").digest == D2
    with pytest.raises(NotFound, match="linux/amd64"):
        select_platform(idx, "linux/s390x")


def test_descriptor_to_from_dict():
    d = Descriptor(MEDIA_TYPE_OCI_MANIFEST, D1, 42, {ANNOTATION_REF_NAME: "v1"}, Platform("linux", "arm", "v7"))
    assert Descriptor.from_dict(d.to_dict()) == d
    with pytest.raises(InvalidInput):
        Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:bad", 1)


def test_image_config_accessors():
    raw = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
           "rootfs": {"type": "layers", "diff_ids": [D1, D2]}, "history": [{"created_by": "x"}]}
    cfg = ImageConfig.from_bytes(json.dumps(raw).encode())
    assert cfg.diff_ids == [D1, D2] and cfg.config == {"Cmd": ["sh"]} and cfg.history[0]["created_by"] == "x"
    cfg.diff_ids = [D3]
    assert json.loads(cfg.to_bytes())["rootfs"]["diff_ids"] == [D3]
    with pytest.raises(InvalidInput, match="diff_ids"):
        ImageConfig.from_bytes(b'{"os":"linux"}')
