"""Registry credentials: where they come from, and how a registry's auth challenge is answered.

Two jobs, kept apart from the HTTP client so they can be tested alone:

* :func:`load_credentials` finds the username/password (or identity token) for one registry host, in
  the order a user expects: explicit arguments (``--username``), ``REMORA_USERNAME`` /
  ``REMORA_PASSWORD``, then the Docker client's ``config.json`` (``$DOCKER_CONFIG`` or
  ``~/.docker/config.json``) with its ``credHelpers``, ``credsStore`` and inline ``auths``. Anyone who
  ran ``docker login`` therefore needs no extra setup.
* :class:`Authenticator` answers ``WWW-Authenticate`` challenges: ``Basic`` (send the credentials) and
  ``Bearer`` (fetch a token from the realm for the challenged scope, cache it per scope, refresh it
  when it is rejected). The challenge parser and the basic-auth encoding come from oras-py; the token
  fetch is ours because oras-py keeps one token for every scope, has no timeout, and reports a
  refused token request only as a log line.

Secrets never reach a log line or an exception message: :class:`Credentials` masks them in ``repr``.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

from remora.errors import AuthError, RegistryError

log = logging.getLogger("remora.registry")

#: Docker Hub's credentials live under this key in config.json, whatever name the user typed.
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
DOCKER_HUB_HOSTS = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
#: What docker-credential helpers return as the username when the secret is an identity token.
IDENTITY_TOKEN_USER = "<token>"
HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    """A username with a password, or an OAuth2 identity (refresh) token, and where it came from.

    ``source`` names the origin ("--username", "REMORA_USERNAME", "/root/.docker/config.json", ...)
    so an :class:`AuthError` can tell the user which credentials the registry refused.
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)
    source: str = "arguments"

    def basic(self) -> str | None:
        """The base64 ``user:password`` of a Basic ``Authorization`` header, or None."""
        if self.username is None or self.password is None:
            return None
        from oras.auth.utils import get_basic_auth  # oras-py costs ~0.2 s to import: only when auth is used

        return get_basic_auth(self.username, self.password)

    def __repr__(self) -> str:  # never show a secret, even in a debugger or a traceback
        secret = "identity-token" if self.identity_token else ("password" if self.password else "none")
        return f"Credentials(username={self.username!r}, secret=<{secret}>, source={self.source!r})"


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


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1, with or without a port (``[::1]:5000``)."""
    h = host.strip()
    if h.startswith("["):
        h = h[1:].split("]", 1)[0]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass
class _Token:
    value: str
    expires_at: float


class Authenticator:
    """Answers one registry's challenges; shared by every request of a :class:`RegistryClient`.

    ``credentials`` is resolved lazily (``loader`` is called on the first challenge), so talking to an
    anonymous registry never runs a credential helper. Bearer tokens are cached per scope string, so
    pulling from one repository and pushing to another never reuse a token that lacks the scope.
    """

    def __init__(self, host: str, session: requests.Session, *, loader, timeout: float, allow_plain_http: bool,
                 docker_config: str | os.PathLike | None = None):
        self.host = host
        self.docker_config = docker_config
        self.session = session
        self.timeout = timeout
        self.allow_plain_http = allow_plain_http
        self._loader = loader
        self._loaded = False
        self._creds: Credentials | None = None
        self._lock = threading.Lock()
        self._scheme: str | None = None          # "basic" or "bearer" once the registry has told us
        self._bearer: dict[str, str] = {}        # realm, service of the last bearer challenge
        self._tokens: dict[str, _Token] = {}     # scope string -> token

    @property
    def credentials(self) -> Credentials | None:
        with self._lock:
            if not self._loaded:
                self._creds = self._loader()
                self._loaded = True
            return self._creds

    def describe_credentials(self) -> str:
        """For error messages: which credentials were (not) found, never their values."""
        creds = self.credentials
        if creds is None:
            return (f"no credentials found for {self.host} (checked --username, REMORA_USERNAME/REMORA_PASSWORD and "
                    f"{docker_config_path(self.docker_config)}); run `docker login {self.host}` or pass --username/--password")
        who = f"user {creds.username!r}" if creds.username else "an identity token"
        return (f"the registry refused {who} from {creds.source}; check them with `docker login {self.host}` "
                f"or pass --username/--password")

    def header_for(self, scope: str | None) -> dict[str, str]:
        """Authorization to send up front, once we know how this registry authenticates."""
        if self._scheme == "basic":
            basic = self.credentials.basic() if self.credentials else None
            return {"Authorization": f"Basic {basic}"} if basic else {}
        if self._scheme == "bearer" and scope:
            tok = self._tokens.get(scope)
            if tok is None or tok.expires_at <= time.monotonic():
                tok = self._fetch_token(scope)
            return {"Authorization": f"Bearer {tok.value}"}
        return {}

    def answer(self, response: requests.Response, scope: str | None, sent: dict[str, str]) -> dict[str, str] | None:
        """Headers to retry a 401 with, or None when retrying cannot help (then it is an AuthError)."""
        challenge = response.headers.get("WWW-Authenticate", "")
        kind = challenge.split(" ", 1)[0].strip().lower()
        if kind == "basic":
            self._scheme = "basic"
            basic = self.credentials.basic() if self.credentials else None
            if not basic or sent.get("Authorization") == f"Basic {basic}":
                return None
            return {"Authorization": f"Basic {basic}"}
        if kind == "bearer":
            from oras.auth.utils import parse_auth_header

            h = parse_auth_header(challenge)
            if not h.realm:
                raise RegistryError(f"registry {self.host} sent a Bearer challenge without a realm: {challenge[:200]}")
            self._scheme = "bearer"
            self._bearer = {"realm": h.realm, "service": h.service or ""}
            want = h.scope or scope or ""
            cached = self._tokens.get(want)
            if cached and sent.get("Authorization") == f"Bearer {cached.value}":
                # The token we just sent for exactly this scope was refused: fetch once more (it may have
                # expired early or been revoked); a second refusal is final.
                self._tokens.pop(want, None)
            elif cached:
                return {"Authorization": f"Bearer {cached.value}"}
            tok = self._fetch_token(want)
            if scope and scope != want:
                self._tokens[scope] = tok
            if sent.get("Authorization") == f"Bearer {tok.value}":
                return None
            return {"Authorization": f"Bearer {tok.value}"}
        return None

    def _fetch_token(self, scope: str) -> _Token:
        realm, service = self._bearer["realm"], self._bearer.get("service")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryError(f"registry {self.host} names an invalid token realm {realm!r}")
        creds = self.credentials
        if parts.scheme == "http" and creds is not None and not (self.allow_plain_http or is_loopback(parts.netloc)):
            raise AuthError(f"refusing to send credentials for {self.host} to the plain-HTTP token server {realm}; "
                            f"use --plain-http only if you trust the network")
        scopes = [s for s in scope.split(" ") if s]
        try:
            if creds is not None and creds.identity_token:
                # OAuth2 refresh-token grant, what `docker login` identity tokens are for.
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "client_id": "remora", "scope": " ".join(scopes)}
                if service:
                    form["service"] = service
                resp = self.session.post(realm, data=form, timeout=self.timeout)
            else:
                params: list[tuple[str, str]] = [("service", service)] if service else []
                params += [("scope", s) for s in scopes]
                headers = {"Accept": "application/json"}
                basic = creds.basic() if creds else None
                if basic:
                    headers["Authorization"] = f"Basic {basic}"
                resp = self.session.get(realm, params=params, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            raise RegistryError(f"token server {realm} for registry {self.host} unreachable: {exc}") from None
        if resp.status_code in (401, 403):
            raise AuthError(f"token server {realm} refused a token for {self.host} "
                            f"(scope {scope or 'none'}, HTTP {resp.status_code}): {self.describe_credentials()}")
        if resp.status_code != 200:
            raise RegistryError(f"token server {realm} for registry {self.host} answered HTTP {resp.status_code}")
        try:
            data = resp.json()
            value = data.get("token") or data.get("access_token")
            expires_in = float(data.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise RegistryError(f"token server {realm} returned a malformed token response") from None
        if not value:
            raise RegistryError(f"token server {realm} returned no token")
        # Refresh a little early so a token does not expire between our check and the registry's.
        tok = _Token(value, time.monotonic() + max(expires_in - 10, expires_in / 2))
        self._tokens[scope] = tok
        log.debug("got a bearer token for %s scope %r", self.host, scope)
        return tok
