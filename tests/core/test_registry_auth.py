"""Credentials discovery and registry authentication: htpasswd Basic auth on the real registry, and the
Docker token (Bearer/JWT) flow on a real registry configured with ``auth: token`` and our token server."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import uuid

import pytest
from regclient_tokenserver import TokenAuthRegistry, TokenServer

from remora.errors import AuthError
from remora.registry import Credentials, RegistryClient, load_credentials
from remora.registry.client import OCI_MANIFEST

USER, PASSWORD = "remora", "s3cret-pass"   # tests/conftest.py's auth_registry user


@pytest.fixture(autouse=True)
def _isolated_credentials(monkeypatch, tmp_path):
    """No test may see the machine's real docker config or REMORA_* variables."""
    monkeypatch.delenv("REMORA_USERNAME", raising=False)
    monkeypatch.delenv("REMORA_PASSWORD", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    (tmp_path / "docker-config").mkdir()


def _write_config(tmp_path, cfg: dict) -> None:
    (tmp_path / "docker-config" / "config.json").write_text(json.dumps(cfg))


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _helper(tmp_path, monkeypatch, name: str, script: str) -> None:
    """A real docker-credential-<name> executable on PATH (the helper protocol is stdin/stdout JSON)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    path = bindir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")


def _roundtrip(client: RegistryClient, tmp_path, repo: str | None = None) -> str:
    """Push a blob and a manifest, read both back: proves pull and push are authorized."""
    repo = repo or f"auth/{uuid.uuid4().hex[:10]}"
    data = os.urandom(2048)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert client.push_blob(repo, digest, len(data), path) is True
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": digest, "size": len(data)}, "layers": []}).encode()
    mdigest = client.push_manifest(repo, "v1", manifest, OCI_MANIFEST)
    assert client.get_manifest(repo, "v1") == (manifest, OCI_MANIFEST, mdigest)
    with client.open_blob(repo, digest) as s:
        assert s.read() == data
    return digest


# ---------------------------------------------------------------- load_credentials

def test_docker_config_auth_field_and_localhost_alias(tmp_path):
    _write_config(tmp_path, {"auths": {"http://localhost:5000/v1/": {"auth": _b64("bob:pa:ss")}}})
    creds = load_credentials("127.0.0.1:5000")
    assert (creds.username, creds.password) == ("bob", "pa:ss")
    assert creds.source.endswith("config.json")
    assert load_credentials("127.0.0.1:5001") is None


def test_docker_config_username_password_and_identity_token(tmp_path):
    _write_config(tmp_path, {"auths": {"reg.example": {"username": "u", "password": "p"},
                                       "tok.example": {"identitytoken": "refresh-me"}}})
    assert load_credentials("reg.example").basic() == _b64("u:p")
    tok = load_credentials("tok.example")
    assert tok.identity_token == "refresh-me" and tok.basic() is None


def test_explicit_and_env_override_the_config(tmp_path, monkeypatch):
    _write_config(tmp_path, {"auths": {"reg.example": {"auth": _b64("file:user")}}})
    monkeypatch.setenv("REMORA_USERNAME", "envuser")
    monkeypatch.setenv("REMORA_PASSWORD", "envpass")
    assert load_credentials("reg.example").username == "envuser"
    assert load_credentials("reg.example", username="arg", password="x").username == "arg"
    with pytest.raises(AuthError, match="needs a password"):
        load_credentials("reg.example", username="arg")
    monkeypatch.delenv("REMORA_PASSWORD")
    with pytest.raises(AuthError, match="set together"):
        load_credentials("reg.example")


def test_explicit_docker_config_path(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"auths": {"reg.example": {"auth": _b64("a:b")}}}))
    assert load_credentials("reg.example") is None
    assert load_credentials("reg.example", docker_config=other).username == "a"
    assert load_credentials("reg.example", docker_config=other / "config.json").username == "a"


def test_credential_helper_is_run(tmp_path, monkeypatch):
    _helper(tmp_path, monkeypatch, "remoratest", """read host
if [ "$1" = get ] && [ "$host" = reg.example ]; then
  echo '{"ServerURL":"reg.example","Username":"helper-user","Secret":"helper-secret"}'
else
  echo "credentials not found in native keychain"; exit 1
fi
""")
    _write_config(tmp_path, {"credHelpers": {"reg.example": "remoratest"}, "credsStore": "remoratest"})
    creds = load_credentials("reg.example")
    assert (creds.username, creds.password) == ("helper-user", "helper-secret")
    assert "docker-credential-remoratest" in creds.source
    assert load_credentials("other.example") is None  # credsStore has nothing: anonymous


def test_missing_credential_helper_is_a_clear_error(tmp_path):
    _write_config(tmp_path, {"credsStore": "does-not-exist-remora"})
    with pytest.raises(AuthError, match="docker-credential-does-not-exist-remora.*not on PATH"):
        load_credentials("reg.example")


def test_secrets_never_appear_in_repr():
    creds = Credentials(username="u", password="hunter2", identity_token=None, source="x")
    assert "hunter2" not in repr(creds) and "hunter2" not in str(creds)
    assert "tok-secret" not in repr(Credentials(identity_token="tok-secret"))


def test_credentials_are_looked_up_lazily(registry, tmp_path):
    """An anonymous registry never triggers the (here broken) credential store."""
    _write_config(tmp_path, {"credsStore": "does-not-exist-remora"})
    client = RegistryClient(registry.host)
    assert client.head_manifest(f"lazy/{uuid.uuid4().hex[:8]}", "latest") is None


# ---------------------------------------------------------------- Basic auth (htpasswd) on the real registry

def test_basic_auth_via_docker_config(auth_registry, tmp_path):
    _write_config(tmp_path, {"auths": {auth_registry.host: {"auth": _b64(f"{USER}:{PASSWORD}")}}})
    _roundtrip(RegistryClient(auth_registry.host), tmp_path)


def test_basic_auth_via_explicit_credentials(auth_registry, tmp_path):
    _roundtrip(RegistryClient(auth_registry.host, credentials=(USER, PASSWORD)), tmp_path)


def test_no_credentials_is_a_helpful_auth_error(auth_registry):
    with pytest.raises(AuthError) as exc:
        RegistryClient(auth_registry.host).get_manifest("some/repo", "latest")
    msg = str(exc.value)
    assert auth_registry.host in msg and "no credentials found" in msg
    assert f"docker login {auth_registry.host}" in msg and "--username" in msg


def test_wrong_password_names_the_source_not_the_secret(auth_registry, tmp_path):
    _write_config(tmp_path, {"auths": {auth_registry.host: {"auth": _b64(f"{USER}:wrong-secret-xyz")}}})
    with pytest.raises(AuthError) as exc:
        RegistryClient(auth_registry.host).head_blob("some/repo", "sha256:" + "7" * 64)
    msg = str(exc.value)
    assert f"user '{USER}'" in msg and "config.json" in msg
    assert "wrong-secret-xyz" not in msg


# ---------------------------------------------------------------- Bearer tokens (real distribution, auth: token)

@pytest.fixture(scope="module")
def token_setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("token-auth")
    server = TokenServer({"alice": ("alice-pw", {"team/app", "team/base"}), "root": ("root-pw", {"*"})},
                         work, refresh_tokens={"alice-identity-token": "alice"}).start()
    reg = TokenAuthRegistry(work / "registry", server)
    try:
        reg.start()
        yield reg, server
    finally:
        reg.stop()
        server.stop()


def test_bearer_push_pull_and_scopes(token_setup, tmp_path):
    reg, server = token_setup
    server.requests.clear()
    client = RegistryClient(reg.host, credentials=("alice", "alice-pw"))
    digest = _roundtrip(client, tmp_path, repo="team/base")
    asked = [s for r in server.requests for s in r["scopes"]]
    assert "repository:team/base:pull" in asked and "repository:team/base:pull,push" in asked
    assert all(r["user"] == "alice" and r["service"] == "remora-test-registry" for r in server.requests)
    # Tokens are cached per scope: more reads of the same repository ask the token server nothing.
    n = len(server.requests)
    assert client.head_blob("team/base", digest) == 2048
    assert client.head_manifest("team/base", "v1") is not None
    assert len(server.requests) == n
    # A cross-repository mount needs push on the target and pull on the source, in one token.
    assert client.mount_blob("team/app", digest, "team/base") is True
    assert ["repository:team/app:pull,push", "repository:team/base:pull"] in [r["scopes"] for r in server.requests]
    assert client.head_blob("team/app", digest) == 2048


def test_bearer_credentials_from_docker_config(token_setup, tmp_path):
    reg, _ = token_setup
    _write_config(tmp_path, {"auths": {reg.host: {"auth": _b64("root:root-pw")}}})
    _roundtrip(RegistryClient(reg.host), tmp_path)


def test_bearer_insufficient_scope_is_an_auth_error(token_setup):
    reg, _ = token_setup
    client = RegistryClient(reg.host, credentials=("alice", "alice-pw"))
    with pytest.raises(AuthError, match="user 'alice' was denied .* in other/repo"):
        client.head_blob("other/repo", "sha256:" + "8" * 64)


def test_bearer_wrong_password_and_anonymous(token_setup):
    reg, server = token_setup
    with pytest.raises(AuthError, match=f"token server {server.realm} refused .*user 'alice'"):
        RegistryClient(reg.host, credentials=("alice", "nope")).head_blob("team/app", "sha256:" + "9" * 64)
    with pytest.raises(AuthError, match="no credentials found"):
        RegistryClient(reg.host).get_manifest("team/app", "v1")


def test_bearer_with_identity_token_uses_the_refresh_grant(token_setup, tmp_path):
    reg, server = token_setup
    _write_config(tmp_path, {"auths": {reg.host: {"identitytoken": "alice-identity-token"}}})
    server.requests.clear()
    _roundtrip(RegistryClient(reg.host), tmp_path, repo="team/app")
    assert server.requests and all(r["method"] == "POST" and r["user"] == "alice" for r in server.requests)
    _write_config(tmp_path, {"auths": {reg.host: {"identitytoken": "revoked"}}})
    with pytest.raises(AuthError, match="refused a token .*identity token"):
        RegistryClient(reg.host).head_blob("team/app", "sha256:" + "a" * 64)
