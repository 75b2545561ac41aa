"""A real Docker token-auth setup for tests: a JWT token server plus distribution configured to trust it.

The token server (http.server on 127.0.0.1 in a thread) implements the Docker registry token spec:
``GET /token?service=..&scope=..`` with Basic credentials (or the OAuth2 ``POST`` refresh-token grant
with an identity token) returns ``{"token": <JWT>}`` whose ``access``
claim grants the requested actions on the repositories the user may use. JWTs are RS256, signed with a
key whose self-signed certificate is both in the JWT's ``x5c`` header and in the registry's
``rootcertbundle``, so distribution 2.8 verifies them exactly as it would a production token server's.
Every token request is recorded so tests can assert on the scopes the client asked for.
"""
from __future__ import annotations

import base64
import datetime
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from remora_testing.registry import LocalRegistry

ISSUER = "remora-test-issuer"
SERVICE = "remora-test-registry"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """``users``: name -> (password, set of repositories the user may pull and push, "*" for all)."""

    def __init__(self, users: dict[str, tuple[str, set[str]]], workdir: Path,
                 refresh_tokens: dict[str, str] | None = None):
        self.users = users
        self.refresh_tokens = dict(refresh_tokens or {})  # identity token -> user
        self.requests: list[dict] = []
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "remora test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_path = workdir / "token-signer.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                query = parse_qs(urlsplit(self.path).query)
                server._handle(self, server._user(self), query)

            def do_POST(self):  # OAuth2 refresh-token grant (identity tokens from `docker login`)
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                user = None
                if form.get("grant_type") == ["refresh_token"]:
                    user = server.refresh_tokens.get(form.get("refresh_token", [""])[0])
                server._handle(self, user, form)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> TokenServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _user(self, handler) -> str | None:
        header = handler.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        entry = self.users.get(user)
        return user if entry and secrets.compare_digest(entry[0], password) else None

    def _handle(self, handler, user: str | None, query: dict) -> None:
        scopes = [s for raw in query.get("scope", []) for s in raw.split(" ") if s]
        self.requests.append({"user": user, "scopes": scopes, "service": query.get("service", [None])[0],
                              "method": handler.command})
        if user is None:
            handler.send_response(401)
            handler.send_header("Content-Type", "application/json")
            handler.end_headers()
            handler.wfile.write(b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}')
            return
        allowed = self.users[user][1]
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and ("*" in allowed or name in allowed):
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        body = json.dumps({"token": self.sign(user, access), "expires_in": 300}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def sign(self, subject: str, access: list[dict]) -> str:
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(sig)}"


class TokenAuthRegistry(LocalRegistry):
    """Debian's docker-registry with ``auth: token`` pointing at a :class:`TokenServer`."""

    def __init__(self, root: Path, token_server: TokenServer):
        super().__init__(root=root)
        self.token_server = token_server

    def config_text(self) -> str:
        return super().config_text() + f"""auth:
  token:
    realm: {self.token_server.realm}
    service: {SERVICE}
    issuer: {ISSUER}
    rootcertbundle: {self.token_server.cert_path}
"""

