"""RegistryClient against the real docker-registry (distribution 2.8) and a misbehaving fake on loopback."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import tracemalloc
import uuid

import pytest
from regclient_fakes import FakeRegistry

from remora.digest import VerifyingReader
from remora.errors import (
    DigestMismatch,
    InvalidInput,
    NotFound,
    RegistryError,
    StorageError,
    UnsupportedMediaType,
    UsageError,
)
from remora.registry import RegistryClient
from remora.registry import client as client_mod
from remora.registry.client import OCI_MANIFEST


def _repo(prefix: str = "t") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


def _blob(tmp_path, data: bytes) -> tuple[str, int, str]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp_path / digest.split(":")[1]
    path.write_bytes(data)
    return digest, len(data), str(path)


def _read_verified(stream, digest: str, chunk: int = 1 << 20) -> int:
    """What callers do with open_blob: wrap it in remora.digest's VerifyingReader and read to EOF."""
    with VerifyingReader(stream, digest, what=f"blob {digest}") as reader:
        n = 0
        while b := reader.read(chunk):
            n += len(b)
    return n


@pytest.fixture
def client(registry):
    with RegistryClient(registry.host) as c:
        yield c


def test_plain_http_is_automatic_only_for_loopback():
    assert RegistryClient("127.0.0.1:5000").base_url == "http://127.0.0.1:5000"
    assert RegistryClient("127.3.4.5:80").base_url == "http://127.3.4.5:80"
    assert RegistryClient("localhost:5000").base_url == "http://localhost:5000"
    assert RegistryClient("[::1]:5000").base_url == "http://[::1]:5000"
    assert RegistryClient("ghcr.io").base_url == "https://ghcr.io"
    assert RegistryClient("10.0.0.1:5000").base_url == "https://10.0.0.1:5000"
    assert RegistryClient("registry.example:5000", plain_http=True).base_url == "http://registry.example:5000"
    assert RegistryClient("127.0.0.1:5000", plain_http=False).base_url == "https://127.0.0.1:5000"
    with pytest.raises(UsageError):
        RegistryClient("http://127.0.0.1:5000")


def test_names_are_validated_before_any_request(client):
    with pytest.raises(UsageError):
        client.head_blob("Bad/Repo", "sha256:" + "0" * 64)
    with pytest.raises(InvalidInput):
        client.head_blob("ok/repo", "sha256:../../etc")
    with pytest.raises(UsageError):
        client.get_manifest("ok/repo", "tag with space")


def test_blob_push_head_open(client, tmp_path):
    repo = _repo()
    data = os.urandom(300_000)
    digest, size, path = _blob(tmp_path, data)
    assert client.head_blob(repo, digest) is None
    assert client.push_blob(repo, digest, size, path) is True
    assert client.push_blob(repo, digest, size, path) is False  # HEAD first: already there
    assert client.head_blob(repo, digest) == size
    stream = client.open_blob(repo, digest)
    assert stream.size == size
    assert _read_verified(stream, digest) == size


def test_push_blob_rejects_wrong_content_and_wrong_size(client, tmp_path):
    repo = _repo()
    path = tmp_path / "f"
    path.write_bytes(b"actual content")
    lying = "sha256:" + hashlib.sha256(b"other content").hexdigest()
    with pytest.raises(InvalidInput, match="does not match"):
        client.push_blob(repo, lying, path.stat().st_size, path)
    assert client.head_blob(repo, lying) is None
    with pytest.raises(InvalidInput, match="expected 99"):
        client.push_blob(repo, lying, 99, path)
    with pytest.raises(StorageError, match="cannot read"):
        client.push_blob(repo, lying, 1, tmp_path / "missing")


def test_manifest_push_get_head_tags(client, tmp_path):
    repo = _repo()
    cfg_digest, cfg_size, cfg_path = _blob(tmp_path, b'{"architecture":"amd64","os":"linux"}')
    layer_digest, layer_size, layer_path = _blob(tmp_path, os.urandom(1000))
    client.push_blob(repo, cfg_digest, cfg_size, cfg_path)
    client.push_blob(repo, layer_digest, layer_size, layer_path)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                    "size": layer_size}]}).encode()
    digest = client.push_manifest(repo, "v1", manifest, OCI_MANIFEST)
    assert digest == "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert client.push_manifest(repo, digest, manifest, OCI_MANIFEST) == digest
    client.push_manifest(repo, "v2", manifest, OCI_MANIFEST)

    assert client.get_manifest(repo, "v1") == (manifest, OCI_MANIFEST, digest)
    assert client.get_manifest(repo, digest) == (manifest, OCI_MANIFEST, digest)
    assert client.head_manifest(repo, "v1") == (digest, OCI_MANIFEST, len(manifest))
    assert client.head_manifest(repo, "nope") is None
    assert sorted(client.list_tags(repo)) == ["v1", "v2"]
    with pytest.raises(DigestMismatch):
        client.push_manifest(repo, "sha256:" + "1" * 64, manifest, OCI_MANIFEST)


def test_push_manifest_with_missing_blob_is_a_clear_error(client):
    repo = _repo()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "2" * 64,
                   "size": 2}, "layers": []}).encode()
    with pytest.raises(RegistryError, match="MANIFEST_BLOB_UNKNOWN"):
        client.push_manifest(repo, "v1", manifest, OCI_MANIFEST)


def test_range_reads(client, tmp_path):
    repo = _repo()
    data = os.urandom(100_001)
    digest, size, path = _blob(tmp_path, data)
    client.push_blob(repo, digest, size, path)
    assert client.get_blob_range(repo, digest, 0, 0) == data[:1]
    assert client.get_blob_range(repo, digest, 1000, 4999) == data[1000:5000]
    assert client.get_blob_range(repo, digest, size - 1, size - 1) == data[-1:]
    assert client.get_blob_range(repo, digest, 99_000, None) == data[99_000:]
    assert client.get_blob_range(repo, digest, 0, size - 1) == data
    assert client.get_blob_range(repo, digest, size - 10, size + 100) == data[-10:]  # clamped, like read()
    with pytest.raises(InvalidInput, match="range not satisfiable"):
        client.get_blob_range(repo, digest, size + 10, size + 20)
    with pytest.raises(UsageError):
        client.get_blob_range(repo, digest, 10, 5)


def test_concurrent_range_reads_share_one_client(client, tmp_path):
    """The lazy fetcher reads ranges from many threads through one client."""
    from concurrent.futures import ThreadPoolExecutor
    repo = _repo()
    data = os.urandom(1 << 20)
    digest, size, path = _blob(tmp_path, data)
    client.push_blob(repo, digest, size, path)
    ranges = [(i * 4096 + i % 5, i * 4096 + 4095 - (i % 7)) for i in range(0, 256, 3)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda r: client.get_blob_range(repo, digest, *r), ranges))
    assert got == [data[a:b + 1] for a, b in ranges]


def test_not_found_names_what_is_missing(client, tmp_path):
    repo = _repo()
    absent = "sha256:" + "3" * 64
    with pytest.raises(NotFound, match=r"manifest .*:latest not found"):
        client.get_manifest(repo, "latest")
    with pytest.raises(NotFound, match=f"blob {absent} in {repo} not found"):
        client.open_blob(repo, absent)
    with pytest.raises(NotFound, match="blob"):
        client.get_blob_range(repo, absent, 0, 10)
    with pytest.raises(NotFound, match=f"repository {repo} not found"):
        client.list_tags(repo)


def test_cross_repository_mount(client, tmp_path):
    src, dst = _repo("src"), _repo("dst")
    digest, size, path = _blob(tmp_path, os.urandom(50_000))
    client.push_blob(src, digest, size, path)
    assert client.mount_blob(dst, digest, src) is True
    assert client.head_blob(dst, digest) == size
    assert _read_verified(client.open_blob(dst, digest), digest) == size
    # Not in the source repository: distribution opens an upload session instead (202), we cancel it.
    absent = "sha256:" + "4" * 64
    assert client.mount_blob(_repo("dst"), absent, src) is False


def test_large_upload_is_streamed_in_constant_memory(fresh_registry, tmp_path):
    """200 MB through the chunked PATCH path; Python allocations stay far below the blob size."""
    size = 200 * 1024 * 1024
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:  # sparse, with real bytes at chunk boundaries and the ends
        f.truncate(size)
        for off in (0, client_mod.CHUNK_SIZE - 3, 3 * client_mod.CHUNK_SIZE + 7, size - 4096):
            f.seek(off)
            f.write(os.urandom(4096))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    digest = "sha256:" + h.hexdigest()
    repo = _repo("big")
    c = RegistryClient(fresh_registry.host)
    try:
        tracemalloc.start()
        assert c.push_blob(repo, digest, size, path) is True
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert size > client_mod.MONOLITHIC_LIMIT
        assert peak < 8 * 1024 * 1024, f"upload peaked at {peak} bytes of Python memory"
        assert c.head_blob(repo, digest) == size
        with open(path, "rb") as f:
            f.seek(size - 4096)
            tail = f.read()
        assert c.get_blob_range(repo, digest, size - 4096, None) == tail
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        path.unlink()
        shutil.rmtree(fresh_registry.root / "storage", ignore_errors=True)


def test_stopped_registry_is_a_quick_registry_error(fresh_registry):
    c = RegistryClient(fresh_registry.host)  # default retries and backoff
    fresh_registry.stop()
    t0 = time.monotonic()
    with pytest.raises(RegistryError, match=f"registry {fresh_registry.host} unreachable"):
        c.get_manifest("some/repo", "latest")
    assert time.monotonic() - t0 < 5


def test_https_to_a_plain_http_registry_hints_at_plain_http(registry):
    c = RegistryClient(registry.host, plain_http=False, retries=3)
    t0 = time.monotonic()
    with pytest.raises(RegistryError, match="TLS failed.*--plain-http"):
        c.head_blob("x/y", "sha256:" + "c" * 64)
    assert time.monotonic() - t0 < 2  # not retried: TLS failures do not pass


# ---------------------------------------------------------------- misbehaving registry

def test_5xx_is_retried_then_succeeds():
    with FakeRegistry() as fake:
        data = b'{"schemaVersion":2}'
        fake.manifests["v1"] = (data, OCI_MANIFEST)
        fake.fail_next = 2
        c = RegistryClient(fake.host, retries=3, backoff=0.01)
        assert c.get_manifest("x/y", "v1")[0] == data
        assert fake.hits == 3


def test_persistent_5xx_gives_up_with_registry_error():
    with FakeRegistry() as fake:
        fake.fail_next = 100
        c = RegistryClient(fake.host, retries=2, backoff=0.01)
        with pytest.raises(RegistryError, match="HTTP 500 after 3 attempts; UNKNOWN: injected failure"):
            c.get_manifest("x/y", "v1")
        assert fake.hits == 3
        fake.fail_next, fake.hits = 100, 0
        with pytest.raises(RegistryError, match="HTTP 500 after 3 attempts"):
            c.head_blob("x/y", "sha256:" + "5" * 64)
        assert fake.hits == 3


def test_wrong_blob_bytes_are_caught_by_the_verifying_reader():
    with FakeRegistry() as fake:
        digest = fake.add_blob(os.urandom(10_000))
        fake.corrupt = True
        c = RegistryClient(fake.host)
        with pytest.raises(DigestMismatch):
            _read_verified(c.open_blob("x/y", digest), digest)


def test_wrong_manifest_bytes_raise_digest_mismatch():
    with FakeRegistry() as fake:
        data = b'{"schemaVersion":2}'
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        fake.manifests[digest] = (data, OCI_MANIFEST)
        fake.corrupt = True
        with pytest.raises(DigestMismatch, match=digest):
            RegistryClient(fake.host).get_manifest("x/y", digest)


def test_oversized_manifest_is_invalid_input():
    with FakeRegistry() as fake:
        fake.manifests["big"] = (b"{" + b" " * (5 * 1024 * 1024) + b"}", OCI_MANIFEST)
        with pytest.raises(InvalidInput, match="byte limit"):
            RegistryClient(fake.host).get_manifest("x/y", "big")


def test_schema1_manifest_is_unsupported_not_a_digest_mismatch():
    with FakeRegistry() as fake:
        fake.manifests["old"] = (b'{"schemaVersion":1,"signatures":[]}',
                                 "application/vnd.docker.distribution.manifest.v1+prettyjws")
        with pytest.raises(UnsupportedMediaType, match="schema 1"):
            RegistryClient(fake.host).get_manifest("x/y", "old")


def test_truncated_blob_body_is_an_error_not_a_short_read():
    with FakeRegistry() as fake:
        digest = fake.add_blob(os.urandom(200_000))
        fake.truncate = True
        stream = RegistryClient(fake.host).open_blob("x/y", digest)
        with pytest.raises(RegistryError, match="bytes"):
            _read_verified(stream, digest, chunk=4096)


def test_stalled_registry_times_out():
    with FakeRegistry() as fake:
        fake.delay = 3.0
        c = RegistryClient(fake.host, timeout=0.3, retries=0)
        t0 = time.monotonic()
        with pytest.raises(RegistryError, match="timed out"):
            c.head_blob("x/y", "sha256:" + "6" * 64)
        assert time.monotonic() - t0 < 2


def test_registry_ignoring_range_is_sliced_or_refused(monkeypatch):
    with FakeRegistry() as fake:
        data = os.urandom(50_000)
        digest = fake.add_blob(data)
        fake.ignore_range = True
        c = RegistryClient(fake.host)
        assert c.get_blob_range("x/y", digest, 100, 199) == data[100:200]
        assert c.get_blob_range("x/y", digest, 49_000, None) == data[49_000:]
        monkeypatch.setattr(client_mod, "MAX_RANGE_FALLBACK", 10_000)
        with pytest.raises(RegistryError, match="ignores HTTP Range"):
            c.get_blob_range("x/y", digest, 20_000, 20_010)


def test_wrong_content_range_is_refused():
    with FakeRegistry() as fake:
        digest = fake.add_blob(os.urandom(5_000))
        fake.wrong_range = True
        with pytest.raises(RegistryError, match="Content-Range"):
            RegistryClient(fake.host).get_blob_range("x/y", digest, 10, 20)


def test_blob_redirects_are_followed_for_streams_and_ranges():
    with FakeRegistry() as fake:
        data = os.urandom(20_000)
        digest = fake.add_blob(data)
        fake.redirect = True
        c = RegistryClient(fake.host)
        assert _read_verified(c.open_blob("x/y", digest), digest) == len(data)
        assert c.get_blob_range("x/y", digest, 5, 9) == data[5:10]
        assert fake.storage_hits == 2


@pytest.mark.parametrize("storage_host", ["127.0.0.1", "localhost"])
def test_cross_host_redirect_drops_authorization(storage_host):
    """A blob GET redirected to another host:port (a CDN, S3) must not carry the registry's
    credentials there; a redirect within the registry keeps them (it needs them)."""
    import base64

    basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    with FakeRegistry() as registry, FakeRegistry() as storage:
        data = os.urandom(50_000)
        digest = registry.add_blob(data)
        storage.add_blob(data)
        registry.require_basic = basic
        registry.redirect = True
        registry.redirect_to = f"http://{storage_host}:{storage.host.rsplit(':', 1)[1]}"
        c = RegistryClient(registry.host, credentials=("alice", "s3cret"))
        assert _read_verified(c.open_blob("x/y", digest), digest) == len(data)
        assert c.get_blob_range("x/y", digest, 100, 199) == data[100:200]
        # the registry got the credentials (after its challenge), the storage host never did
        assert any(a == basic for p, a in registry.auth_seen if p.startswith("/v2/x/y/blobs/"))
        assert storage.storage_hits == 2
        assert [a for _, a in storage.auth_seen] == [None, None], storage.auth_seen

        # same host: the redirect keeps working and keeps the credentials
        registry.redirect_to = ""
        registry.auth_seen.clear()
        assert _read_verified(c.open_blob("x/y", digest), digest) == len(data)
        assert registry.storage_hits == 1
        assert [a for p, a in registry.auth_seen if p.startswith("/storage/")] == [basic]


def test_docker_hub_name_maps_to_its_api_host():
    assert RegistryClient("docker.io").base_url == "https://registry-1.docker.io"
    assert RegistryClient("docker.io").host == "docker.io"


def test_failed_upload_restarts_in_a_new_session(tmp_path):
    with FakeRegistry() as fake:
        digest, size, path = _blob(tmp_path, os.urandom(5000))
        fake.fail_puts = 1
        c = RegistryClient(fake.host, backoff=0.01)
        assert c.push_blob("x/y", digest, size, path) is True
        assert len(fake.sessions) == 2 and fake.cancelled == fake.sessions[:1]
        assert fake.blobs[digest] == open(path, "rb").read()


def test_registry_reporting_another_digest_after_upload_is_caught(tmp_path):
    with FakeRegistry() as fake:
        digest, size, path = _blob(tmp_path, os.urandom(5000))
        fake.lie_digest = True
        with pytest.raises(DigestMismatch, match=digest):
            RegistryClient(fake.host).push_blob("x/y", digest, size, path)


def test_mount_refused_by_the_registry_cancels_its_upload_session():
    with FakeRegistry() as fake:
        assert RegistryClient(fake.host).mount_blob("x/y", "sha256:" + "b" * 64, "x/z") is False
        assert len(fake.sessions) == 1 and fake.cancelled == fake.sessions
