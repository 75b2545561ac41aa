"""Registry credentials: where they come from, and how :class:`RegistryClient` answers auth challenges.

Two jobs, kept apart from the HTTP client so they can be tested alone:

* :func:`load_credentials` finds the username/password (or identity token) for one registry host, in
  the order a user expects: explicit arguments (``--username``), ``REMORA_USERNAME`` /
  ``REMORA_PASSWORD``, then the Docker client's ``config.json`` (``$DOCKER_CONFIG`` or
  ``~/.docker/config.json``) with its ``credHelpers``, ``credsStore`` and inline ``auths``. Anyone who
  ran ``docker login`` therefore needs no extra setup.
* :class:`Authenticator` is the requests (sync) shell around :mod:`remora.registry.authcore`, which
  decides everything else without I/O: challenge parsing, scopes, the token request, whether a realm
  may get credentials, token responses and the token cache. The peer's aiohttp client
  (``plugins/peer/upstream.py``) drives the same core, so both clients follow the same rules.

Secrets never reach a log line or an exception message: :class:`Credentials` masks them in ``repr``.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlsplit

import requests

from remora.errors import AuthError, RegistryError
from remora.registry import authcore
from remora.registry.authcore import Credentials, is_loopback  # noqa: F401 - re-exported: their historic home

log = logging.getLogger(__name__)

#: Docker Hub's credentials live under this key in config.json, whatever name the user typed.
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
DOCKER_HUB_HOSTS = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
#: What docker-credential helpers return as the username when the secret is an identity token.
IDENTITY_TOKEN_USER = "<token>"
HELPER_TIMEOUT = 30.0


def docker_config_path(docker_config: str | os.PathLike | None = None) -> Path:
    """The Docker client config file: an explicit path (file or directory), ``$DOCKER_CONFIG``, or ~/.docker."""
    if docker_config is not None:
        path = Path(docker_config)
        return path / "config.json" if path.is_dir() else path
    env = os.environ.get("DOCKER_CONFIG")
    base = Path(env) if env else Path.home() / ".docker"
    return base / "config.json"


def _normalize_key(key: str) -> str:
    """``https://host:5000/v1/`` -> ``host:5000``; Docker Hub's aliases collapse to ``docker.io``."""
    k = key.strip()
    if "://" in k:
        k = urlsplit(k).netloc or k
    k = k.split("/", 1)[0].lower()
    return "docker.io" if k in DOCKER_HUB_HOSTS else k


def _host_aliases(host: str) -> list[str]:
    """Names ``docker login`` may have stored for ``host`` (localhost and 127.0.0.1 are the same)."""
    h = _normalize_key(host)
    names = [h]
    if h.startswith("localhost"):
        names.append(h.replace("localhost", "127.0.0.1", 1))
    elif h.startswith("127.0.0.1"):
        names.append(h.replace("127.0.0.1", "localhost", 1))
    return names


def _helper_server_url(host: str) -> str:
    return DOCKER_HUB_KEY if _normalize_key(host) == "docker.io" else host


def _run_helper(name: str, host: str, config: Path) -> Credentials | None:
    """Run ``docker-credential-<name> get``; None when the helper has nothing for this host."""
    binary = f"docker-credential-{name}"
    path = shutil.which(binary)
    if path is None:
        raise AuthError(f"{config} says credentials for {host} are kept by the credential helper {binary!r}, "
                        f"but it is not on PATH: install it, or pass --username/--password "
                        f"(or REMORA_USERNAME/REMORA_PASSWORD)")
    try:
        proc = subprocess.run([path, "get"], input=_helper_server_url(host).encode(), capture_output=True,
                              timeout=HELPER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {binary} did not answer within {HELPER_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        out = (proc.stdout or proc.stderr).decode(errors="replace").strip()
        if "credentials not found" in out.lower():
            return None
        # The helper's own message, not its stdout payload: it holds no secret when it failed.
        raise AuthError(f"credential helper {binary} failed for {host}: {out[:300] or f'exit code {proc.returncode}'}")
    try:
        payload = json.loads(proc.stdout)
        user, secret = payload["Username"], payload["Secret"]
    except (ValueError, KeyError, TypeError):
        raise AuthError(f"credential helper {binary} returned malformed output for {host}") from None
    source = f"{binary} (from {config})"
    if user == IDENTITY_TOKEN_USER:
        return Credentials(identity_token=secret, source=source)
    return Credentials(username=user, password=secret, source=source)


def _from_auths_entry(entry: dict, host: str, config: Path) -> Credentials | None:
    source = str(config)
    if entry.get("identitytoken"):
        return Credentials(username=entry.get("username"), identity_token=entry["identitytoken"], source=source)
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise AuthError(f"{config}: the 'auth' entry for {host} is not valid base64 'user:password'") from None
        return Credentials(username=user, password=password, source=source)
    if entry.get("username") and entry.get("password") is not None:
        return Credentials(username=entry["username"], password=entry["password"], source=source)
    return None


def _from_docker_config(host: str, config: Path) -> Credentials | None:
    if not config.is_file():
        return None
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read docker config {config}: {exc}") from None
    if not isinstance(cfg, dict):
        raise AuthError(f"docker config {config} is not a JSON object")
    aliases = _host_aliases(host)
    helpers = {_normalize_key(k): v for k, v in (cfg.get("credHelpers") or {}).items()}
    for name in aliases:
        if helpers.get(name):
            return _run_helper(helpers[name], name, config)
    auths = {_normalize_key(k): v for k, v in (cfg.get("auths") or {}).items() if isinstance(v, dict)}
    if cfg.get("credsStore"):
        for name in aliases:
            creds = _run_helper(cfg["credsStore"], name, config)
            if creds is not None:
                return creds
    for name in aliases:
        if name in auths:
            creds = _from_auths_entry(auths[name], name, config)
            if creds is not None:
                return creds
    return None


def load_credentials(host: str, docker_config: str | os.PathLike | None = None, *,
                     username: str | None = None, password: str | None = None) -> Credentials | None:
    """The credentials to use for registry ``host`` ("127.0.0.1:5000", "ghcr.io"), or None (anonymous).

    Precedence: ``username``/``password`` arguments, then ``REMORA_USERNAME``/``REMORA_PASSWORD``,
    then the Docker config (``credHelpers`` for the host, ``credsStore``, inline ``auths``).
    A username without a password is a usage mistake and raises :class:`AuthError` rather than
    silently going anonymous. A configured helper that is missing or fails raises too.
    """
    if username is not None or password is not None:
        if not username or password is None:
            raise AuthError("--username needs a password too (--password, --password-stdin or REMORA_PASSWORD)")
        return Credentials(username=username, password=password, source="--username")
    env_user, env_pass = os.environ.get("REMORA_USERNAME"), os.environ.get("REMORA_PASSWORD")
    if env_user or env_pass:
        if not env_user or env_pass is None:
            raise AuthError("REMORA_USERNAME and REMORA_PASSWORD must be set together")
        return Credentials(username=env_user, password=env_pass, source="REMORA_USERNAME/REMORA_PASSWORD")
    return _from_docker_config(host, docker_config_path(docker_config))


def _read_bounded(resp: requests.Response, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a streamed body (one more than allowed is enough to refuse it)."""
    buf = bytearray()
    for chunk in resp.iter_content(8192):
        buf += chunk
        if len(buf) > limit:
            break
    return bytes(buf)


class Authenticator:
    """Answers one registry's challenges; shared by every request (and thread) of a :class:`RegistryClient`.

    ``credentials`` is resolved lazily (``loader`` is called on the first challenge), so talking to an
    anonymous registry never runs a credential helper. Bearer tokens live in an
    :class:`~remora.registry.authcore.TokenCache` keyed by realm, service, scope and credential, so
    pulling from one repository and pushing to another never reuse a token that lacks the scope.
    """

    def __init__(self, host: str, session: requests.Session, *, loader, timeout: float, allow_plain_http: bool,
                 docker_config: str | os.PathLike | None = None, cache: authcore.TokenCache | None = None):
        self.host = host
        self.docker_config = docker_config
        self.session = session
        self.timeout = timeout
        self.allow_plain_http = allow_plain_http
        self._loader = loader
        self._loaded = False
        self._creds: Credentials | None = None
        self._who = "anonymous"
        self._lock = threading.Lock()
        self._scheme: str | None = None                      # "basic" or "bearer" once the registry has told us
        self._bearer: authcore.Challenge | None = None       # the last Bearer challenge (realm, service)
        self._tokens = cache if cache is not None else authcore.TokenCache()

    @property
    def credentials(self) -> Credentials | None:
        with self._lock:
            if not self._loaded:
                self._creds = self._loader()
                self._who = self._tokens.identity(self._creds)
                self._loaded = True
            return self._creds

    def _identity(self) -> str:
        self.credentials  # noqa: B018 - loads them (and their identity) once
        return self._who

    def describe_credentials(self) -> str:
        """For error messages: which credentials were (not) found, never their values."""
        creds = self.credentials
        if creds is None:
            return (f"no credentials found for {self.host} (checked --username, REMORA_USERNAME/REMORA_PASSWORD "
                    f"and {docker_config_path(self.docker_config)}); run `docker login {self.host}` or pass "
                    "--username/--password")
        who = f"user {creds.username!r}" if creds.username else "an identity token"
        return (f"the registry refused {who} from {creds.source}; check them with `docker login {self.host}` "
                f"or pass --username/--password")

    def header_for(self, scope: str | None) -> dict[str, str]:
        """Authorization to send up front, once we know how this registry authenticates."""
        if self._scheme == "basic":
            basic = self.credentials.basic() if self.credentials else None
            return {"Authorization": f"Basic {basic}"} if basic else {}
        bearer = self._bearer
        if self._scheme == "bearer" and bearer is not None and scope:
            tok = self._tokens.get(bearer, scope, self._identity()) or self._fetch_token(bearer, scope)
            return {"Authorization": tok.header()}
        return {}

    def answer(self, response: requests.Response, scope: str | None, sent: dict[str, str]) -> dict[str, str] | None:
        """Headers to retry a 401 with, or None when retrying cannot help (then it is an AuthError)."""
        try:
            challenge = authcore.select_challenge(
                authcore.parse_challenges(response.headers.get("WWW-Authenticate", "")))
        except RegistryError as exc:
            raise RegistryError(f"registry {self.host}: {exc}") from None
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            self._scheme = "basic"
            basic = self.credentials.basic() if self.credentials else None
            if not basic or sent.get("Authorization") == f"Basic {basic}":
                return None
            return {"Authorization": f"Basic {basic}"}
        self._bearer, self._scheme = challenge, "bearer"
        want = authcore.merge_scopes(scope, challenge.scope)
        who = self._identity()
        cached = self._tokens.get(challenge, want, who)
        if cached and sent.get("Authorization") == cached.header():
            # The token we just sent for exactly this scope was refused: fetch once more (it may have
            # expired early or been revoked); a second refusal is final.
            self._tokens.discard(challenge, want, who, cached)
        elif cached:
            return {"Authorization": cached.header()}
        tok = self._fetch_token(challenge, want)
        if scope and authcore.merge_scopes(scope) != want:
            self._tokens.put(challenge, scope, who, tok)
        if sent.get("Authorization") == tok.header():
            return None
        return {"Authorization": tok.header()}

    def _fetch_token(self, challenge: authcore.Challenge, scope: str) -> authcore.Token:
        realm = challenge.realm
        creds = self.credentials
        req = authcore.token_request(challenge, scope, creds, registry=self.host,
                                     allow_plain_http=self.allow_plain_http)
        try:
            with self.session.request(req.method, req.url, headers=req.headers, data=req.body(),
                                      timeout=self.timeout, stream=True) as resp:
                status = resp.status_code
                body = _read_bounded(resp, authcore.MAX_TOKEN_RESPONSE) if status == 200 else b""
        except requests.RequestException as exc:
            raise RegistryError(f"token server {realm} for registry {self.host} unreachable: {exc}") from None
        if status in (401, 403):
            raise AuthError(f"token server {realm} refused a token for {self.host} "
                            f"(scope {scope or 'none'}, HTTP {status}): {self.describe_credentials()}")
        if status != 200:
            raise RegistryError(f"token server {realm} for registry {self.host} answered HTTP {status}")
        try:
            tok = authcore.parse_token_response(body, now=self._tokens.clock())
        except RegistryError as exc:
            raise RegistryError(f"{exc} (token server {realm}, registry {self.host})") from None
        self._tokens.put(challenge, scope, self._identity(), tok)
        log.debug("got a bearer token for %s scope %r", self.host, scope)
        return tok
