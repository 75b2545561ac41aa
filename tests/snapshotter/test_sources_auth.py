"""A mirror/peer source answers a 401 with the registry-auth core's rules (remora.registry.authcore):
the mount's credentials never go to a plain-HTTP token server on another host, a malformed challenge is
an error, and a loopback registry + realm pair still gets its token.

Network safety: the "foreign" realm's host is served by a recording transport adapter mounted on the
source's session, so even a regression that dials it sends nothing off this machine."""
from __future__ import annotations

import http.server
import json
import threading

import pytest
import requests

from remora.errors import AuthError, RegistryError
from remora.snapshotter.sources import HttpBlobSource, SourceSpec

BLOB = "sha256:" + "c" * 64
DATA = b"0123456789"


class _Recorder(requests.adapters.BaseAdapter):
    def __init__(self):
        super().__init__()
        self.calls: list = []

    def send(self, request, **kw):
        self.calls.append((request.url, request.headers.get("Authorization")))
        raise requests.ConnectionError("recorded, not sent")

    def close(self):
        pass


@pytest.fixture
def mirror():
    """A mirror on 127.0.0.1: 401 with ``state["challenge"]`` unless the request carries the token it
    issued from ``/token`` (which it gives to Basic alice:pw only)."""
    state: dict = {"challenge": "", "token_auth": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path.startswith("/token"):
                state["token_auth"].append(self.headers.get("Authorization"))
                body = json.dumps({"token": "t0k3n", "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if self.headers.get("Authorization") == "Bearer t0k3n":
                self.send_response(206)
                self.send_header("Content-Range", f"bytes 0-9/{len(DATA)}")
                self.send_header("Content-Length", "10")
                self.end_headers()
                self.wfile.write(DATA)
                return
            self.send_response(401)
            self.send_header("WWW-Authenticate", state["challenge"])
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["port"] = server.server_address[1]
    yield state
    server.shutdown()
    server.server_close()


def _source(mirror, registry: str, **kw) -> tuple[HttpBlobSource, _Recorder]:
    src = HttpBlobSource(SourceSpec.peer(f"http://127.0.0.1:{mirror['port']}", "team/app", registry,
                                         username="alice", password="pw", **kw))
    rec = _Recorder()
    src._session.mount("http://auth.example", rec)
    return src, rec


def test_credentials_never_go_to_a_foreign_plain_http_realm(mirror):
    mirror["challenge"] = 'Bearer realm="http://auth.example/token",service="reg"'
    src, rec = _source(mirror, "registry.example")
    with pytest.raises(AuthError):
        src.read_range(BLOB, 0, 9)
    assert rec.calls == []   # refused before any connection


def test_a_registry_configured_plain_http_may_use_its_plain_http_realm(mirror):
    mirror["challenge"] = 'Bearer realm="http://auth.example/token",service="reg"'
    src, rec = _source(mirror, "registry.example", plain_http=True)
    with pytest.raises(RegistryError):
        src.read_range(BLOB, 0, 9)
    assert len(rec.calls) == 1 and rec.calls[0][1].startswith("Basic ")   # asked, with the credentials


def test_loopback_registry_and_realm_get_the_token(mirror):
    port = mirror["port"]
    mirror["challenge"] = f'Bearer realm="http://127.0.0.1:{port}/token",service="reg"'
    src, _ = _source(mirror, f"127.0.0.1:{port}")
    assert src.read_range(BLOB, 0, 9) == DATA
    assert mirror["token_auth"] and mirror["token_auth"][0].startswith("Basic ")


def test_malformed_challenge_is_an_error(mirror):
    mirror["challenge"] = 'Bearer realm="http://127.0.0.1/unterminated'
    src, rec = _source(mirror, "registry.example")
    with pytest.raises(RegistryError, match="malformed"):
        src.read_range(BLOB, 0, 9)
    assert rec.calls == []
