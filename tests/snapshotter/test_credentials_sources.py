"""Where the snapshotter's registry credentials come from, besides the CRI proxy: the scoped store,
Kubernetes dockerconfigjson secrets read by reference (against a small fake API server on
127.0.0.1 that checks the bearer token like the real one), and kubelet's credential-provider exec
plugin driven as kubelet drives it (a subprocess, a request on stdin)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from remora.errors import AuthError, InvalidInput, NotFound
from remora.registry.auth import Credentials
from remora.snapshotter.credentials.criproxy import credentials_from_auth
from remora.snapshotter.credentials.kubesecrets import (
    KubeClient,
    SecretRef,
    SecretsKeychain,
    credentials_for,
)
from remora.snapshotter.credentials.resolver import CredentialResolver
from remora.snapshotter.credentials.store import CredentialStore

TOKEN = "sa-token-123"
REGISTRY = "registry.example.com:5000"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _dockerconfig(auths: dict) -> str:
    return base64.b64encode(json.dumps({"auths": auths}).encode()).decode()


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


class FakeAPIServer:
    """GET /api/v1/namespaces/NS/{secrets,pods}/NAME from ``objects``; 401 without the bearer token."""

    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, {"kind": "Status", "code": 401})
                obj = outer.objects.get(self.path)
                self._send(200 if obj is not None else 404, obj or {"kind": "Status", "code": 404})

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def secret(self, ns: str, name: str, auths: dict, kind: str = "kubernetes.io/dockerconfigjson") -> None:
        self.objects[f"/api/v1/namespaces/{ns}/secrets/{name}"] = {
            "kind": "Secret", "type": kind, "data": {".dockerconfigjson": _dockerconfig(auths)}}


@pytest.fixture
def api():
    srv = FakeAPIServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def kubeconfig(tmp_path, api):
    path = tmp_path / "kubeconfig"
    (tmp_path / "token").write_text(TOKEN + "\n")
    path.write_text(f"""apiVersion: v1
kind: Config
current-context: node
contexts:
- name: node
  context: {{cluster: c, user: remora}}
clusters:
- name: c
  cluster: {{server: "{api.url}"}}
users:
- name: remora
  user: {{tokenFile: token}}
""")
    return path


# -- the store --------------------------------------------------------------------------------------
def test_store_is_scoped_to_host_and_repository_and_expires():
    clock = Clock()
    store = CredentialStore(ttl=60, max_entries=2, clock=clock)
    creds = Credentials(username="a", password="pa", source="test")
    assert store.put(f"{REGISTRY}/team-a/app:1", creds) == (REGISTRY, "team-a/app")
    assert store.get(REGISTRY, "team-a/app") is creds
    assert store.get(REGISTRY, "team-b/app") is None           # another tenant's repository
    assert store.get(REGISTRY, "team-a/app/sub") is None       # no prefix widening
    assert store.get("other.example.com:5000", "team-a/app") is None
    store.put("busybox", creds)                                 # docker.io/library/busybox
    assert store.get("registry-1.docker.io", "library/busybox") is creds
    clock.now += 61
    assert store.get(REGISTRY, "team-a/app") is None            # expired
    for i in range(3):
        store.put(f"{REGISTRY}/r{i}:1", creds)
    assert len(store) == 2 and store.get(REGISTRY, "r0") is None  # bounded: the oldest went


def test_cri_auth_config_becomes_credentials():
    from remora._proto.cri.runtime.v1 import api_pb2

    c = credentials_from_auth(api_pb2.AuthConfig(username="u", password="p"))
    assert (c.username, c.password) == ("u", "p")
    c = credentials_from_auth(api_pb2.AuthConfig(auth=_basic("u2", "p:2")))
    assert (c.username, c.password) == ("u2", "p:2")
    c = credentials_from_auth(api_pb2.AuthConfig(identity_token="refresh"))
    assert c.identity_token == "refresh" and c.password is None
    assert credentials_from_auth(api_pb2.AuthConfig(registry_token="bearer")) is None
    assert credentials_from_auth(api_pb2.AuthConfig(auth="%%%not-base64")) is None
    assert "p:2" not in repr(credentials_from_auth(api_pb2.AuthConfig(auth=_basic("u2", "p:2"))))


def test_resolver_prefers_the_pulls_own_credentials():
    clock = Clock()
    store = CredentialStore(clock=clock)

    class Keychain:
        def lookup(self, host, repo):
            return Credentials(username="node", password="n", source="keychain")

    class Broken:
        def lookup(self, host, repo):
            raise RuntimeError("API server down")

    resolver = CredentialResolver(store, [Broken(), Keychain()])
    assert resolver.resolve(REGISTRY, "team-a/app").username == "node"
    store.put(f"{REGISTRY}/team-a/app:1", Credentials(username="pod", password="p", source="cri"))
    assert resolver.resolve(REGISTRY, "team-a/app").username == "pod"
    assert resolver.resolve(REGISTRY, "team-b/app").username == "node"


# -- Kubernetes secrets by reference ---------------------------------------------------------------
def test_secret_read_by_reference_from_the_api_server(api, kubeconfig):
    api.secret("team-a", "regcred", {f"https://{REGISTRY}/team-a": {"auth": _basic("alice", "s3cret")},
                                     "ghcr.io": {"username": "gh", "password": "tok"}})
    api.secret("team-a", "opaque", {}, kind="Opaque")
    api.objects["/api/v1/namespaces/team-a/pods/web"] = {"spec": {"imagePullSecrets": [{"name": "regcred"}]}}
    client = KubeClient.from_kubeconfig(kubeconfig)
    try:
        cfg = client.docker_config(SecretRef.parse("team-a/regcred"))
        c = credentials_for(cfg, REGISTRY, "team-a/app", "secret team-a/regcred")
        assert (c.username, c.password, c.source) == ("alice", "s3cret", "secret team-a/regcred")
        # the key names a path: a repository outside it gets nothing
        assert credentials_for(cfg, REGISTRY, "team-b/app", "s") is None
        assert credentials_for(cfg, REGISTRY, "team-ab/app", "s") is None
        assert credentials_for(cfg, "ghcr.io", "any/thing", "s").username == "gh"
        assert client.pod_pull_secrets("team-a", "web") == [SecretRef("team-a", "regcred")]
        with pytest.raises(InvalidInput, match="Opaque"):
            client.docker_config(SecretRef("team-a", "opaque"))
        with pytest.raises(NotFound):
            client.docker_config(SecretRef("team-a", "missing"))
    finally:
        client.close()
    assert "/api/v1/namespaces/team-a/secrets/regcred" in api.requests
    wrong = KubeClient(api.url, token="wrong")
    with pytest.raises(AuthError, match="needs 'get'"):
        wrong.docker_config(SecretRef("team-a", "regcred"))


def test_keychain_picks_up_a_rotated_secret(api):
    clock = Clock()
    api.secret("ns", "pull", {REGISTRY: {"username": "u", "password": "old"}})
    keychain = SecretsKeychain(KubeClient(api.url, token=TOKEN), [SecretRef("ns", "pull"), SecretRef("ns", "gone")],
                               refresh=30, clock=clock)
    assert keychain.lookup(REGISTRY, "app").password == "old"
    api.secret("ns", "pull", {REGISTRY: {"username": "u", "password": "new"}})
    assert keychain.lookup(REGISTRY, "app").password == "old"   # cached until the refresh
    clock.now += 31
    assert keychain.lookup(REGISTRY, "app").password == "new"
    assert keychain.lookup("other:5000", "app") is None
    assert "not found" in keychain.errors[SecretRef("ns", "gone")]


# -- kubelet's credential provider plugin ------------------------------------------------------------
def _provider(request, *args, env=None):
    text = request if isinstance(request, str) else json.dumps(request)
    return subprocess.run([sys.executable, "-m", "remora.cli", "credential-provider", *args], check=False, input=text,
                          capture_output=True, text=True, timeout=60, env=env)


def test_credential_provider_answers_kubelet(api, kubeconfig, tmp_path):
    api.secret("kube-system", "registry", {f"{REGISTRY}/team-a": {"username": "alice", "password": "s3cret"}})
    config = tmp_path / "credentials.yaml"
    config.write_text(f"kubeconfig: {kubeconfig}\nsecrets: [kube-system/registry]\n")
    empty = tmp_path / "docker"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMORA_")} | {"DOCKER_CONFIG": str(empty)}
    args = ["--credentials-config", str(config), "--cache-duration", "600"]
    req = {"apiVersion": "credentialprovider.kubelet.k8s.io/v1", "kind": "CredentialProviderRequest",
           "image": f"{REGISTRY}/team-a/app:1"}
    proc = _provider(req, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "kind": "CredentialProviderResponse", "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
        "cacheKeyType": "Image", "cacheDuration": "10m0s",
        "auth": {f"{REGISTRY}/team-a/app": {"username": "alice", "password": "s3cret"}}}
    # another repository: an answer without credentials (kubelet tries its other sources)
    proc = _provider(dict(req, image=f"{REGISTRY}/team-b/app:1",
                          apiVersion="credentialprovider.kubelet.k8s.io/v1beta1"),
                     *args, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["auth"] == {} and out["apiVersion"].endswith("/v1beta1")
    # the node's docker config is the fallback unless turned off
    (empty / "config.json").write_text(json.dumps({"auths": {REGISTRY: {"auth": _basic("node", "n")}}}))
    assert json.loads(_provider(dict(req, image=f"{REGISTRY}/team-b/app:1"), *args, env=env).stdout)["auth"] == \
        {f"{REGISTRY}/team-b/app": {"username": "node", "password": "n"}}
    assert json.loads(_provider(dict(req, image=f"{REGISTRY}/team-b/app:1"), *args, "--no-node-credentials",
                                env=env).stdout)["auth"] == {}
    # what is not a request is an error (exit 3, a message on stderr, nothing on stdout)
    for bad in ["not json", json.dumps(dict(req, apiVersion="v9")), json.dumps(dict(req, kind="Pod")),
                json.dumps(dict(req, image=""))]:
        proc = _provider(bad, *args, env=env)
        assert proc.returncode == 3 and proc.stdout == "" and "error" in proc.stderr, (bad, proc)


def test_failed_pull_does_not_replace_working_credentials(tmp_path):
    """A pull whose credentials fail must not leave them in place of ones an earlier pod's pull
    proved (the proxy undoes its capture when containerd answers with an error)."""
    from remora._proto.cri.runtime.v1 import api_pb2
    from remora.snapshotter.credentials.criproxy import CRIProxy

    store = CredentialStore()
    proxy = CRIProxy(tmp_path / "cri.sock", tmp_path / "nothing.sock", store)  # never started
    ref = f"{REGISTRY}/team-a/app:1"

    def request(password: str) -> bytes:
        return api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref),
                                        auth=api_pb2.AuthConfig(username="u", password=password)).SerializeToString()

    assert proxy.capture(request("good")) is not None
    undo = proxy.capture(request("wrong"))
    assert store.get(REGISTRY, "team-a/app").password == "wrong"   # what the Prepares of this pull use
    undo()
    assert store.get(REGISTRY, "team-a/app").password == "good"
    proxy.capture(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=f"{REGISTRY}/new:1"),
                                           auth=api_pb2.AuthConfig(username="u", password="x")).SerializeToString())()
    assert store.get(REGISTRY, "new") is None
    assert proxy.capture(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)).SerializeToString()) is None
    assert proxy.capture(b"\xff\xff garbage") is None
