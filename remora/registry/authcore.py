"""Registry auth without I/O: the one core both registry clients drive (the httpcore idea).

The sync :class:`remora.registry.auth.Authenticator` (requests, under :class:`RegistryClient`) and the
peer's async :class:`plugins.peer.upstream.Upstream` (aiohttp) differ only in how they send bytes. What
a ``WWW-Authenticate`` challenge says, which scopes to ask for, what the token request looks like, whether
a realm may receive credentials, what a token response means and how long a token is reused are decided
here, once, by pure functions and one thread-safe cache, so the two clients cannot drift apart and every
rule can be tested without a socket.

Rules kept here (each one is a test in ``tests/core/test_registry_authcore.py``):

* **Challenges** are parsed per RFC 7235 (several challenges in one header, quoted strings with commas
  and ``\\"`` escapes, ``token68``). A malformed or oversized header is a :class:`RegistryError` whose
  message never echoes the header (it may come from a hostile registry and ends up in answers to
  clients). Bearer is preferred over Basic when a registry offers both; a Bearer challenge without a
  realm is an error.
* **Realms**: only ``http``/``https`` URLs with a host and no userinfo. An ``https`` realm may be on any
  host (Docker Hub's registry-1.docker.io sends us to auth.docker.io). A plain-``http`` realm never gets
  credentials unless the user asked for plain HTTP to that registry (``--plain-http``), or both the
  registry and the realm are on loopback (the embedded and test registries). Anonymous token requests
  may go to any http(s) realm: they carry nothing to steal.
* **Scopes**: what the caller needs and what the challenge names are merged (union of actions per
  resource, first-seen order, actions sorted), so a token covers both.
* **Tokens**: ``token`` (else ``access_token``), header-safe characters only, bounded size;
  ``expires_in`` defaults to 60 s (the distribution token spec), is clamped to
  [:data:`MIN_EXPIRES_IN`, :data:`MAX_EXPIRES_IN`], and a token is refreshed a little before it ends.
  ``issued_at`` is parsed for diagnostics but the lifetime is counted from when *we* received the token:
  the token server's clock is not ours.
* **Cache**: keyed by (realm, service, normalized scope, credential identity), the identity an HMAC under
  a per-cache random key, so two credentials never share a token and no secret is a dict key.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from remora.errors import AuthError, InvalidInput, RegistryError

#: A ``WWW-Authenticate`` value (all headers joined) longer than this is refused: real ones are < 1 KiB.
MAX_CHALLENGE_CHARS = 16384
MAX_CHALLENGES = 16
MAX_PARAMS = 32
#: A token response body longer than this is refused (shells read at most this many bytes + 1).
MAX_TOKEN_RESPONSE = 65536
MAX_TOKEN_CHARS = 16384
#: ``expires_in`` when the token server does not say (distribution token spec).
DEFAULT_EXPIRES_IN = 60.0
#: A token is trusted for at least this long (a server answering 0 or less) ...
MIN_EXPIRES_IN = 1.0
#: ... and at most this long, whatever it says (a revoked token is noticed within this bound).
MAX_EXPIRES_IN = 3600.0
#: Refresh this much before the end (at most half the lifetime), so a token does not expire in flight.
REFRESH_MARGIN = 10.0
MAX_CACHE_ENTRIES = 1024
#: ``client_id`` of the OAuth2 refresh-token grant (identity tokens from ``docker login``).
CLIENT_ID = "remora"

_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_TOKEN_VALUE = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_SCOPE_NAME = re.compile(r"^[A-Za-z0-9._/:-]{1,512}$")


# ------------------------------------------------------------------------------------------ credentials

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
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def __repr__(self) -> str:  # never show a secret, even in a debugger or a traceback
        secret = "identity-token" if self.identity_token else ("password" if self.password else "none")
        return f"Credentials(username={self.username!r}, secret=<{secret}>, source={self.source!r})"


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


# ------------------------------------------------------------------------------------------- challenges

@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header: ``scheme`` lower case, ``params`` keys lower case."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)
    token68: str | None = None

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scope(self) -> str:
        return self.params.get("scope", "")

    @property
    def error(self) -> str:
        """``insufficient_scope``, ``invalid_token``... (RFC 6750), or ""."""
        return self.params.get("error", "")


def _malformed(why: str, at: int | None = None) -> RegistryError:
    where = f" at offset {at}" if at is not None else ""
    return RegistryError(f"malformed WWW-Authenticate challenge from the registry: {why}{where}")


class _Scanner:
    def __init__(self, text: str):
        self.s, self.i = text, 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def token(self) -> str:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in _TCHAR:
            self.i += 1
        return self.s[start:self.i]

    def quoted(self) -> str:
        start = self.i
        out: list[str] = []
        self.i += 1  # the opening quote
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == '"':
                self.i += 1
                return "".join(out)
            if c == "\\":
                self.i += 1
                if self.i >= len(self.s):
                    break
                c = self.s[self.i]
            if (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F:
                raise _malformed("control character in a quoted string", self.i)
            out.append(c)
            self.i += 1
        raise _malformed("unterminated quoted string", start)

    def param_ahead(self) -> bool:
        """Whether a ``name =`` follows (an auth-param), not a new challenge's scheme."""
        save = self.i
        try:
            if not self.token():
                return False
            self.ws()
            if self.peek() != "=":
                return False
            self.i += 1
            self.ws()
            return self.peek() not in ("", ",", "=")   # "abc=" / "abc==" is a token68
        finally:
            self.i = save


def parse_challenges(header: str | Iterable[str]) -> list[Challenge]:
    """Every challenge in a ``WWW-Authenticate`` value (or the values of several such headers).

    ``Bearer realm="https://a/token",service="reg",scope="repository:x:pull"``,
    ``Basic realm="r", Bearer realm="..."`` and ``Negotiate abc==`` all parse; anything else (an
    unterminated quote, a parameter without a value, a duplicate parameter, more than
    :data:`MAX_CHALLENGE_CHARS` characters) raises :class:`RegistryError`.
    """
    text = header if isinstance(header, str) else ", ".join(header)
    if len(text) > MAX_CHALLENGE_CHARS:
        raise _malformed(f"{len(text)} characters (at most {MAX_CHALLENGE_CHARS})")
    sc = _Scanner(text)
    out: list[Challenge] = []
    while True:
        while sc.peek() in (" ", "\t", ","):   # empty list elements are allowed (RFC 7230 #rule)
            sc.i += 1
        if not sc.peek():
            return out
        at = sc.i
        scheme = sc.token()
        if not scheme:
            raise _malformed("expected an auth scheme", at)
        if len(out) >= MAX_CHALLENGES:
            raise _malformed(f"more than {MAX_CHALLENGES} challenges")
        params: dict[str, str] = {}
        token68 = None
        sc.ws()
        if sc.peek() and sc.peek() != ",":
            if sc.param_ahead():
                while True:
                    at = sc.i
                    name = sc.token().lower()
                    sc.ws()
                    sc.i += 1  # "=", checked by param_ahead
                    sc.ws()
                    if sc.peek() == '"':
                        value = sc.quoted()
                    else:
                        value = sc.token()
                        if not value:
                            raise _malformed(f"parameter {name!r} has no value", at)
                    if name in params:
                        raise _malformed(f"parameter {name!r} given twice", at)
                    if len(params) >= MAX_PARAMS:
                        raise _malformed(f"more than {MAX_PARAMS} parameters")
                    params[name] = value
                    sc.ws()
                    if sc.peek() == ",":
                        while sc.peek() in (" ", "\t", ","):
                            sc.i += 1
                        if sc.param_ahead():
                            continue
                        break   # the next challenge (or the end)
                    if sc.peek():
                        raise _malformed("expected ',' after a parameter", sc.i)
                    break
            else:
                m = _TOKEN68.match(sc.s, sc.i)
                if m is None:
                    raise _malformed("expected parameters or a token68", sc.i)
                token68 = m.group(0)
                sc.i = m.end()
                sc.ws()
                if sc.peek() not in ("", ","):
                    raise _malformed("expected ',' after a token68", sc.i)
        out.append(Challenge(scheme.lower(), params, token68))


def select_challenge(challenges: list[Challenge]) -> Challenge | None:
    """The challenge to answer: Bearer if offered (it must name a realm), else Basic, else None."""
    for c in challenges:
        if c.scheme == "bearer":
            if not c.realm:
                raise RegistryError("the registry sent a Bearer challenge without a realm")
            return c
    for c in challenges:
        if c.scheme == "basic":
            return c
    return None


# ---------------------------------------------------------------------------------------------- scopes

def repository_scope(name: str, actions: Iterable[str] = ("pull",)) -> str:
    """``repository:NAME:pull`` (actions sorted, comma separated); InvalidInput for a name that would
    change the scope's meaning (whitespace, quotes, commas)."""
    if not _SCOPE_NAME.match(name or ""):
        raise InvalidInput(f"repository name not usable in a token scope: {name[:100]!r}")
    acts = sorted({a.strip() for a in actions if a.strip()})
    if not acts or any(not re.match(r"^[a-z*]+$", a) for a in acts):
        raise InvalidInput(f"bad scope actions {list(actions)!r}")
    return f"repository:{name}:{','.join(acts)}"


def merge_scopes(*scopes: str | None) -> str:
    """One space-separated scope string covering all of ``scopes``.

    ``type:name:actions`` items for the same ``type:name`` have their actions united (sorted);
    items that are not of that form are kept verbatim (once). Order: first appearance.
    """
    merged: OrderedDict[str, set[str] | None] = OrderedDict()
    for scope in scopes:
        for item in (scope or "").split():
            kind, sep, rest = item.partition(":")
            name, sep2, actions = rest.rpartition(":")
            if not (sep and sep2 and kind and name and actions):
                merged.setdefault(item, None)
                continue
            key = f"{kind}:{name}"
            acts = merged.get(key)
            if acts is None:
                acts = merged[key] = set()
            acts.update(a for a in actions.split(",") if a)
    return " ".join(k if acts is None else f"{k}:{','.join(sorted(acts))}" for k, acts in merged.items())


# --------------------------------------------------------------------------------------- token requests

def check_realm(realm: str, registry: str, *, with_credentials: bool, allow_plain_http: bool) -> None:
    """Raise unless ``realm`` may be asked for a token (see the module doc for the rule)."""
    try:
        parts = urlsplit(realm)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise RegistryError(f"registry {registry} names an invalid token realm") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None \
            or parts.password is not None or any(c in realm for c in " \t\r\n"):
        raise RegistryError(f"registry {registry} names an invalid token realm {realm[:200]!r}")
    if parts.scheme == "http" and with_credentials and not (
            allow_plain_http or (is_loopback(parts.netloc) and is_loopback(registry))):
        raise AuthError(f"refusing to send credentials for {registry} to the plain-HTTP token server {realm[:200]}; "
                        f"use --plain-http only if you trust the network")


@dataclass(frozen=True)
class TokenRequest:
    """What to send to a token server: ``GET url`` with ``headers``, or ``POST url`` with ``form``."""

    method: str
    url: str
    headers: dict[str, str] = field(repr=False)
    form: dict[str, str] | None = field(default=None, repr=False)

    def body(self) -> bytes | None:
        return urlencode(self.form).encode() if self.form is not None else None


def token_request(challenge: Challenge, scope: str, credentials: Credentials | None, *, registry: str,
                  allow_plain_http: bool = False) -> TokenRequest:
    """The request for a token for ``scope`` (space-separated items) from ``challenge``'s realm.

    Identity tokens use the OAuth2 refresh-token grant (``POST``, form body); a username/password is
    sent as Basic to the ``GET`` (the distribution token spec); no credentials is an anonymous ``GET``.
    """
    realm = challenge.realm
    basic = credentials.basic() if credentials is not None else None
    identity = credentials.identity_token if credentials is not None else None
    check_realm(realm, registry, with_credentials=bool(basic or identity), allow_plain_http=allow_plain_http)
    scopes = scope.split()
    if identity:
        form = {"grant_type": "refresh_token", "refresh_token": identity, "client_id": CLIENT_ID,
                "scope": " ".join(scopes)}
        if challenge.service:
            form["service"] = challenge.service
        return TokenRequest("POST", realm, {"Accept": "application/json",
                                            "Content-Type": "application/x-www-form-urlencoded"}, form)
    parts = urlsplit(realm)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if challenge.service:
        query.append(("service", challenge.service))
    query += [("scope", s) for s in scopes]
    headers = {"Accept": "application/json"}
    if basic:
        headers["Authorization"] = f"Basic {basic}"
    return TokenRequest("GET", urlunsplit(parts._replace(query=urlencode(query), fragment="")), headers)


# -------------------------------------------------------------------------------------- token responses

@dataclass(frozen=True)
class Token:
    """A bearer token and when to stop using it (``refresh_at``, on the cache's clock)."""

    value: str = field(repr=False)
    expires_in: float
    refresh_at: float
    issued_at: datetime.datetime | None = None

    def header(self) -> str:
        return f"Bearer {self.value}"


def _lifetime(raw) -> float:
    if raw is None or raw == 0 or raw == "":
        return DEFAULT_EXPIRES_IN   # what the old clients did with a missing/zero expires_in
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise RegistryError("token server returned a malformed token response (expires_in)")
    try:
        value = float(raw)
    except ValueError:
        raise RegistryError("token server returned a malformed token response (expires_in)") from None
    if math.isnan(value):
        raise RegistryError("token server returned a malformed token response (expires_in)")
    return min(max(value, MIN_EXPIRES_IN), MAX_EXPIRES_IN)


def _issued_at(raw) -> datetime.datetime | None:
    if not isinstance(raw, str) or len(raw) > 64:
        return None
    try:
        return datetime.datetime.fromisoformat(raw)   # RFC 3339, "Z" included (3.11+)
    except ValueError:
        return None


def parse_token_response(body: bytes, *, now: float) -> Token:
    """The token in a token server's 200 answer; ``now`` is the cache clock when it arrived.

    RegistryError for a body that is too large, not a JSON object, without a usable token, or with a
    malformed ``expires_in``. The error never contains the body (it may hold a token).
    """
    if len(body) > MAX_TOKEN_RESPONSE:
        raise RegistryError(f"token server answer larger than {MAX_TOKEN_RESPONSE} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RegistryError("token server returned a malformed token response (not JSON)") from None
    if not isinstance(doc, dict):
        raise RegistryError("token server returned a malformed token response (not a JSON object)")
    value = doc.get("token") or doc.get("access_token")
    if not value:
        raise RegistryError("token server returned no token")
    if not isinstance(value, str) or len(value) > MAX_TOKEN_CHARS or not _TOKEN_VALUE.match(value):
        raise RegistryError("token server returned a token that is not a bearer token (bad characters or size)")
    lifetime = _lifetime(doc.get("expires_in"))
    margin = min(REFRESH_MARGIN, lifetime / 2)
    return Token(value, lifetime, now + lifetime - margin, _issued_at(doc.get("issued_at")))


# ---------------------------------------------------------------------------------------------- cache

class TokenCache:
    """Bearer tokens keyed by (realm, service, scope, credential identity); thread-safe, bounded (LRU).

    ``clock`` is monotonic seconds (inject a fake one in tests). Scopes are normalized with
    :func:`merge_scopes` and sorted, so ``"a b"`` and ``"b a"`` are one entry.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = MAX_CACHE_ENTRIES):
        self.clock = clock
        self.max_entries = max_entries
        self._key = os.urandom(32)
        self._lock = threading.Lock()
        self._tokens: OrderedDict[tuple[str, str, str, str], Token] = OrderedDict()

    def identity(self, credentials: Credentials | None) -> str:
        """Who a token was issued to: "anonymous", or an HMAC of the secret (never the secret itself)."""
        if credentials is None or not (credentials.identity_token or credentials.basic()):
            return "anonymous"
        material = (f"identity\0{credentials.identity_token}" if credentials.identity_token
                    else f"basic\0{credentials.username}\0{credentials.password}")
        return hmac.new(self._key, material.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def _k(challenge: Challenge, scope: str, who: str) -> tuple[str, str, str, str]:
        return challenge.realm, challenge.service, " ".join(sorted(merge_scopes(scope).split())), who

    def get(self, challenge: Challenge, scope: str, who: str) -> Token | None:
        """A token still good for ``scope``, or None (an expired one is dropped)."""
        key = self._k(challenge, scope, who)
        with self._lock:
            tok = self._tokens.get(key)
            if tok is None:
                return None
            if tok.refresh_at <= self.clock():
                del self._tokens[key]
                return None
            self._tokens.move_to_end(key)
            return tok

    def put(self, challenge: Challenge, scope: str, who: str, token: Token) -> None:
        with self._lock:
            key = self._k(challenge, scope, who)
            self._tokens[key] = token
            self._tokens.move_to_end(key)
            while len(self._tokens) > self.max_entries:
                self._tokens.popitem(last=False)

    def discard(self, challenge: Challenge, scope: str, who: str, token: Token | None = None) -> None:
        """Forget the token for this key (only if it is still ``token``, when given: a refused one)."""
        key = self._k(challenge, scope, who)
        with self._lock:
            if token is None or self._tokens.get(key) is token:
                self._tokens.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)
