"""Fuzz the OCI parsers (remora/oci.py): manifests, indexes, configs and descriptors from arbitrary
bytes, arbitrary JSON and mutations of valid documents. Every input gives a parsed object or a clean
RemoraError (InvalidInput, UnsupportedMediaType...), never another exception, within the
address-space cap of tests/fuzz/conftest.py."""
from __future__ import annotations

import json
import time

from hypothesis import given
from hypothesis import strategies as st

from remora import oci
from remora.errors import RemoraError

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64
MANIFEST = {"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": oci.MEDIA_TYPE_OCI_CONFIG, "digest": D1, "size": 10},
            "layers": [{"mediaType": oci.MEDIA_TYPE_OCI_LAYER_GZIP, "digest": D2, "size": 20,
                        "annotations": {"k": "v"}, "urls": ["http://x"]}],
            "annotations": {"a": "b"}, "subject": {"mediaType": oci.MEDIA_TYPE_OCI_MANIFEST, "digest": D1, "size": 1}}
INDEX = {"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_INDEX,
         "manifests": [{"mediaType": oci.MEDIA_TYPE_OCI_MANIFEST, "digest": D1, "size": 10,
                        "platform": {"os": "linux", "architecture": "arm64", "variant": "v8",
                                     "os.features": ["x"], "os.version": "1"}}]}
CONFIG = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
          "rootfs": {"type": "layers", "diff_ids": [D1, D2]}, "history": [{"created_by": "x"}]}
SEEDS = [MANIFEST, INDEX, CONFIG]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=True) | st.text(max_size=30)
    | st.sampled_from([D1, "sha256:", "sha512:" + "c" * 128, "md5:x", oci.MEDIA_TYPE_OCI_MANIFEST,
                       oci.MEDIA_TYPE_OCI_INDEX, oci.MEDIA_TYPE_DOCKER_MANIFEST_LIST, "linux", 2]),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests", "digest", "size",
                         "annotations", "platform", "os", "architecture", "variant", "os.features",
                         "rootfs", "diff_ids", "type", "subject", "urls", "artifactType", "x"]) | st.text(max_size=8),
        children, max_size=6),
    max_leaves=30)


def _parse_all(data: bytes) -> None:
    started = time.monotonic()
    for parse in (oci.parse_manifest_or_index, oci.parse_manifest, oci.parse_index):
        for media_type in (None, oci.MEDIA_TYPE_OCI_MANIFEST, oci.MEDIA_TYPE_OCI_INDEX, "text/plain"):
            try:
                parsed = parse(data, media_type)
            except RemoraError:
                continue
            parsed.to_bytes()                       # what parsed also serialises
            if isinstance(parsed, oci.Index):
                try:
                    oci.select_platform(parsed, "linux/arm64")
                except RemoraError:
                    pass
    try:
        cfg = oci.ImageConfig.from_bytes(data)
        cfg.to_bytes(), cfg.diff_ids, cfg.history, cfg.config, cfg.platform
    except RemoraError:
        pass
    assert time.monotonic() - started < 10


@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data):
    _parse_all(data)


@given(json_values)
def test_arbitrary_json(value):
    _parse_all(json.dumps(value).encode())


@st.composite
def mutated_docs(draw):
    doc = json.loads(json.dumps(draw(st.sampled_from(SEEDS))))
    for _ in range(draw(st.integers(1, 5))):
        node, path = doc, []
        # walk to a random place in the document and replace or delete what is there
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
            path.append((node, key))
            node = node[key]
        if not path:
            continue
        parent, key = path[-1]
        if draw(st.booleans()):
            parent[key] = draw(json_values)
        elif isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    return doc


@given(mutated_docs())
def test_mutated_documents(doc):
    _parse_all(json.dumps(doc).encode())


@given(json_values)
def test_descriptor_and_platform_from_dict(value):
    for parse in (lambda v: oci.Descriptor.from_dict(v), oci.Platform.from_dict):
        try:
            parse(value)
        except RemoraError:
            pass


@given(st.integers(1, 20_000), st.sampled_from([b"[", b"{\"a\":"]))
def test_deep_nesting_is_invalid_input(depth, opener):
    closer = b"]" if opener == b"[" else b"}"
    data = b'{"x":' + opener * depth + b"1" + closer * depth + b"}"
    try:
        oci.ImageConfig.from_bytes(data)
    except RemoraError:
        return
    assert depth <= oci.MAX_JSON_DEPTH


@given(st.binary(max_size=64), st.integers(0, 100))
def test_read_limited(data, limit):
    import io

    try:
        got = oci.read_limited(io.BytesIO(data), limit, "x")
    except RemoraError:
        assert len(data) > limit
        return
    assert got == data and len(data) <= limit
