"""Reference parsing: Docker's normalisation rules and OCI layout references."""
import pytest

from remora.errors import UsageError
from remora.reference import ImageRef, LayoutRef, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("s, registry, repo, tag, digest", [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("user/app", "docker.io", "user/app", "latest", None),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
    ("index.docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/app:v1", "localhost:5000", "app", "v1", None),
    ("127.0.0.1:5000/a/b/c:v1.2-rc_3", "127.0.0.1:5000", "a/b/c", "v1.2-rc_3", None),
    (f"ghcr.io/o/app@{D}", "ghcr.io", "o/app", None, D),
    (f"ghcr.io/o/app:v1@{D}", "ghcr.io", "o/app", "v1", D),
    ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
    ("my-registry.example.com/a__b/c-d.e:t", "my-registry.example.com", "a__b/c-d.e", "t", None),
])
def test_registry_references(s, registry, repo, tag, digest):
    ref = parse_reference(s)
    assert ref == ImageRef(registry, repo, tag, digest)
    assert ref.reference == (digest or tag)


@pytest.mark.parametrize("s", [
    "", " busybox", "Busybox", "busybox:", "busybox:-bad", "busybox@sha256:short", "a//b",
    "http://localhost:5000/app", "localhost:5000/", "app:" + "x" * 129, "busy box", "a/b@md5:" + "0" * 32,
    "localhost:5000/App", "oci:", "oci::tag", f"oci:/x:t@{D}",
])
def test_garbage_is_a_usage_error(s):
    with pytest.raises(UsageError):
        parse_reference(s)


@pytest.mark.parametrize("s, path, tag, digest", [
    ("oci:/tmp/layout", "/tmp/layout", None, None),
    ("oci:/tmp/layout:v1", "/tmp/layout", "v1", None),
    ("oci:relative/dir:latest", "relative/dir", "latest", None),
    (f"oci:/tmp/layout@{D}", "/tmp/layout", None, D),
    ("oci:/tmp/a:b/layout", "/tmp/a:b/layout", None, None),  # a colon before the last slash is part of the path
])
def test_layout_references(s, path, tag, digest):
    assert parse_reference(s) == LayoutRef(path, tag, digest)


@pytest.mark.parametrize("s, loopback", [
    ("localhost:5000/a", True), ("127.0.0.1:5000/a", True), ("127.8.9.10/a", True), ("[::1]:5000/a", True),
    ("10.0.0.1:5000/a", False), ("busybox", False), ("ghcr.io/a/b", False), ("localhost.evil.com/a", False),
])
def test_is_loopback(s, loopback):
    assert parse_reference(s).is_loopback is loopback


def test_round_trip_and_host():
    ref = parse_reference(f"localhost:5000/app:v1@{D}")
    assert parse_reference(str(ref)) == ref
    assert parse_reference("busybox").host == "registry-1.docker.io"
    assert ref.host == "localhost:5000"
    assert ref.with_tag("v2") == ImageRef("localhost:5000", "app", "v2", None)
