"""Who may read what: the registry decides, per repository; the peer only asks it, and remembers briefly.

The node's credentials fetch, they never authorize. Before the mirror answers a manifest or blob request
for repository ``R``, and before the upload server sends a piece to another peer, :class:`AccessChecker`
asks the registry whether *the requester* may read that object under ``R``:

* a requester without credentials: an anonymous ``HEAD /v2/R/{manifests,blobs}/<ref>`` (after an
  anonymous token request for ``repository:R:pull`` when the registry uses Bearer tokens, as Docker Hub
  does for public images);
* a requester with ``Authorization: Bearer ...``: the same ``HEAD`` with that token;
* ``Authorization: Basic ...``: the same ``HEAD`` with it, or, when the registry answers with a Bearer
  challenge, a token exchange for ``repository:R:pull`` with those credentials and the ``HEAD`` with the
  token (which becomes what is passed along the mesh, see :class:`Grant`, instead of the password).

The ``HEAD`` is per object, not per repository: a blob held for ``R`` is served under ``R'`` only if
the registry has it under ``R'`` *and* lets the requester read ``R'`` (the cross-repository case; a
registry answers 404 for a blob not linked into ``R'``). 2xx and 3xx (a redirect to blob storage is
issued only to an authorized client) allow; 401/403 deny, and the registry's own ``WWW-Authenticate``
challenge is kept so the mirror can pass it through (containerd then fetches a token from the real
registry's realm and comes back with it); 404 is "not found"; anything else, or an unreachable registry,
fails closed (never cached).

Answers are cached: allowed for :data:`ALLOW_TTL` seconds, refused/not found for :data:`DENY_TTL`, keyed
by (registry, repository, kind, reference, HMAC of the ``Authorization`` header under a per-process random
key): credentials are never stored in clear, never logged, and a memory dump does not give a verifier
for them. Concurrent identical checks share one request to the registry. A credential revoked at the
registry keeps working here for at most :data:`ALLOW_TTL`.

**The registry unreachable** (no answer at all: connection refused, timeout, 5xx): a requester the
registry allowed within :data:`OFFLINE_GRACE` (same object, same credential) is still served, so a
registry outage does not stop a cluster from starting what it already holds; anyone else is refused
(fail closed). Answers to anonymous requesters (what the registry serves to anyone) are also kept in a
small file in the data directory, without any credential material, so a restarted peer still serves
public blobs it holds while the registry is down. A 401/403/404 is an answer, never "unreachable".

**Whole images while it is unreachable** (issue 13: preheat, then start with the registry down). The
per-object rule above covers only objects this requester asked for before. Besides it, every "yes" is
also remembered per *repository* and requester (anonymous, or the HMAC of the credential the registry
accepted; the grant it gave), for the same :data:`OFFLINE_GRACE`. While the registry is unreachable, a
requester whose access to repository ``R`` the registry confirmed within the grace may read an object
*that this peer keeps for R* (``kept(registry, R, kind, ref)``: a manifest fetched from ``R``, a digest
one of those names, a recorded tag of ``R``; see offline.py), and nothing else: a blob never linked
into ``R`` is not reachable under ``R`` this way. A preheat asks once anonymously, so a repository the
registry serves to anyone is readable by anyone offline; a private repository only by a client whose
credential the registry accepted for it (per-process HMAC key: such answers do not survive a restart,
anonymous ones do, in the state file as ``"<registry> <repository>"``). No credential, a wrong one, or
one never seen accepted: refused, registry up or down. An anonymous requester refused offline gets the
registry's last ``WWW-Authenticate`` challenge for ``R`` (when one was seen), so a client holding
credentials presents them, exactly as it would to the registry.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from remora import __version__
from remora.errors import AuthError, InvalidInput, NotFound, RegistryError
from remora.registry import authcore

log = logging.getLogger(__name__)

#: How long a "yes" from the registry is reused (the bound on a revoked credential still working here).
ALLOW_TTL = 60.0
#: How long a "no" / "not found" is reused (keeps a client retrying in a loop from hammering the registry).
DENY_TTL = 5.0
#: How long an earlier "yes" still counts while the registry cannot be reached at all.
OFFLINE_GRACE = 24 * 3600.0
#: At most this many answers are kept (least recently used go first).
MAX_ENTRIES = 8192
#: The header a child sends with a piece request: ``<registry>/<repository>`` its client was authorized
#: for; the client's authorization itself travels as ``Authorization`` (see :class:`Grant`).
SOURCE_HEADER = "X-Remora-Source"
MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json", "*/*"])
REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
REGISTRY_RE = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]+)?$|^\[[0-9a-fA-F:]+\](:[0-9]+)?$")
_AUTH_RE = re.compile(r"^(Basic|Bearer) [A-Za-z0-9._~+/=-]{1,8192}$", re.IGNORECASE)


class AccessDenied(AuthError):
    """The registry would not give the requester this object: ``status`` (401/403) and the registry's
    ``challenge`` (its ``WWW-Authenticate``, passed through to the client) say how to ask properly."""

    def __init__(self, message: str, status: int = 401, challenge: str = ""):
        super().__init__(message)
        self.status = status
        self.challenge = challenge


@dataclass(frozen=True)
class Grant:
    """What a request was authorized with: passed along the mesh with every piece request of the task,
    so the parent can check it against the registry itself (its own cache makes that one request per
    minute and credential). ``authorization`` is the header the registry accepted: a Bearer token scoped
    to ``repository:<repository>:pull`` when the registry issues tokens (never the client's password
    then), the client's own Basic header on a Basic-auth registry, None for anonymous access."""

    registry: str
    repository: str
    authorization: str | None = None

    def headers(self) -> dict[str, str]:
        h = {SOURCE_HEADER: f"{self.registry}/{self.repository}"}
        if self.authorization:
            h["Authorization"] = self.authorization
        return h

    def __repr__(self) -> str:  # never the credential
        return f"Grant({self.registry}/{self.repository}, {'with' if self.authorization else 'no'} credentials)"


def parse_source(header: str) -> tuple[str, str]:
    """``X-Remora-Source`` -> (registry, repository); InvalidInput-like AccessDenied when malformed."""
    registry, _, repository = (header or "").strip().partition("/")
    if not registry or not REGISTRY_RE.match(registry) or not REPO_RE.match(repository):
        raise AccessDenied(f"a piece request must name the registry/repository its client may read "
                           f"({SOURCE_HEADER})", status=403)
    return registry, repository


def _bearer_challenge(header: str) -> authcore.Challenge | None:
    """The Bearer challenge to answer for a client, or None (none offered, or a malformed header: then
    the client simply is not let in). Parsed by the registry-auth core every client of remora uses."""
    try:
        chosen = authcore.select_challenge(authcore.parse_challenges(header))
    except RegistryError as exc:
        log.info("access check: %s", exc)
        return None
    return chosen if chosen is not None and chosen.scheme == "bearer" else None


@dataclass
class _Answer:
    expires: float
    grant: Grant | None = None
    error: Exception | None = None
    at: float = 0.0   # wall clock of the registry's answer (the offline grace counts from it)


class AccessChecker:
    """Asks registries whether a requester may read an object; caches the answers (see module doc).

    ``endpoint(registry)`` maps a registry name to its base URL (the peer's :class:`Upstream` does:
    https, or http for loopback and ``--plain-http`` registries); ``allows(registry)`` says which
    registries may be asked at all (``--upstream``/``--registry``); ``state_file`` keeps anonymous
    answers across restarts (see the offline grace above)."""

    def __init__(self, endpoint, timeout: float = 10.0, allow_ttl: float = ALLOW_TTL, deny_ttl: float = DENY_TTL,
                 offline_grace: float = OFFLINE_GRACE, state_file: Path | None = None, allows=None,
                 plain_http=None, kept=None):
        self.endpoint = endpoint
        #: (registry, repository, kind, ref) -> whether the object is one this peer keeps for that
        #: repository (offline.KeptManifests.holds): the repository rule while the registry is unreachable
        self.kept = kept or (lambda registry, repository, kind, ref: False)
        #: (registry, repository, who) -> (wall clock, grant) of the registry's last yes for that
        #: requester and repository (any object); who is b"" for anonymous
        self._repo_yes: OrderedDict[tuple, tuple[float, Grant]] = OrderedDict()
        #: (registry, repository) -> the registry's last WWW-Authenticate for an anonymous requester
        self._challenges: OrderedDict[tuple, str] = OrderedDict()
        #: registry name -> whether the operator configured it plain HTTP (``--plain-http``): only then may a
        #: client's credentials go to a plain-HTTP token realm on another host (authcore's realm rule)
        self.plain_http = plain_http or (lambda registry: False)
        #: registry name -> whether this peer may talk to it (``Upstream.allows``): nothing else is dialled
        self.allows = allows or (lambda registry: True)
        self.timeout = timeout
        self.allow_ttl = allow_ttl
        self.deny_ttl = deny_ttl
        self.offline_grace = offline_grace
        self.state_file = state_file
        self._public = self._load_public()   # "registry repo kind ref" -> wall clock of an anonymous yes
        self._public_saved = 0.0
        self._public_dirty = False
        self._key = os.urandom(32)
        self._cache: OrderedDict[tuple, _Answer] = OrderedDict()
        self._pending: dict[tuple, asyncio.Future] = {}
        #: (registry, repository, HMAC of a Basic header) -> (Bearer header, expiry): one token exchange
        #: per client and repository, not per object
        self._tokens: OrderedDict[tuple, tuple[str, float]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self.asked = 0   # requests to registries (tests and status: the cache works)

    async def close(self) -> None:
        for pending in list(self._pending.values()):
            pending.cancel()
        await asyncio.gather(*self._pending.values(), return_exceptions=True)
        if self._public_dirty:
            self._save_public(time.time())
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), auto_decompress=False,
                headers={"User-Agent": f"remora-peer/{__version__}"})
        return self._session

    async def check(self, registry: str, repository: str, kind: str, ref: str,
                    authorization: str | None) -> Grant:
        """The :class:`Grant` to read ``kind`` ("manifest" or "blob") ``ref`` of ``registry/repository``
        with ``authorization`` (the client's header, or None); raises :class:`AccessDenied`,
        :class:`NotFound`, or :class:`RegistryError` (could not ask: fail closed)."""
        assert kind in ("manifest", "blob")
        if not self.allows(registry):
            raise AccessDenied(f"registry {registry!r} is not one this peer fetches from", status=403)
        authorization = (authorization or "").strip() or None
        if authorization is not None and not _AUTH_RE.match(authorization):
            raise AccessDenied("unsupported Authorization header (Basic or Bearer only)", status=401)
        who = hmac.new(self._key, authorization.encode(), hashlib.sha256).digest() if authorization else b""
        key = (registry, repository, kind, ref, who)
        now = time.monotonic()
        answer = self._cache.get(key)
        if answer is not None and answer.expires > now:
            self._cache.move_to_end(key)
            return self._result(answer)
        pending = self._pending.get(key)
        if pending is None:
            # One request to the registry for every identical check meanwhile; in a task of its own, so a
            # client that hangs up does not cancel the answer the others wait for.
            pending = self._pending[key] = asyncio.ensure_future(
                self._resolve(key, registry, repository, kind, ref, authorization))
        return self._result(await asyncio.shield(pending))

    async def _resolve(self, key: tuple, registry: str, repository: str, kind: str, ref: str,
                       authorization: str | None) -> _Answer:
        try:
            answer = await self._ask(registry, repository, kind, ref, authorization, key[4])
        except RegistryError as exc:  # no answer at all: an earlier yes within the grace, else refused
            return self._offline(key, exc)
        except Exception as exc:  # the unexpected: fail closed, not cached
            log.exception("access check of %s/%s failed", registry, repository)
            return _Answer(0.0, error=RegistryError(f"{registry}: access check failed: {type(exc).__name__}"))
        finally:
            self._pending.pop(key, None)
        self._cache[key] = answer
        while len(self._cache) > MAX_ENTRIES:
            self._cache.popitem(last=False)
        if answer.grant is not None:
            repo_key = (registry, repository, key[4])
            self._repo_yes[repo_key] = (answer.at, answer.grant)
            self._repo_yes.move_to_end(repo_key)
            while len(self._repo_yes) > MAX_ENTRIES:
                self._repo_yes.popitem(last=False)
            if not key[4]:
                self._remember_public(key)
                self._remember_public((registry, repository))
        elif isinstance(answer.error, AccessDenied) and answer.error.challenge and not key[4]:
            self._challenges[(registry, repository)] = answer.error.challenge
            self._challenges.move_to_end((registry, repository))
            while len(self._challenges) > MAX_ENTRIES:
                self._challenges.popitem(last=False)
        return answer

    def _offline(self, key: tuple, exc: RegistryError) -> _Answer:
        """The registry could not be asked: a yes for this requester and object within the grace stands."""
        now = time.time()
        earlier = self._cache.get(key)
        at = earlier.at if earlier is not None and earlier.grant is not None else 0.0
        if not key[4]:
            at = max(at, self._public.get(" ".join(key[:4]), 0.0))
        if now - at <= self.offline_grace:
            log.warning("%s/%s: registry unreachable (%s): serving on its answer of %.0f s ago", key[0], key[1],
                        exc, now - at)
            grant = earlier.grant if earlier is not None and earlier.grant is not None else Grant(key[0], key[1])
            return _Answer(0.0, grant=grant, at=at)
        # The repository rule (module doc): an object kept for the repository, and a yes for the repository.
        registry, repository, kind, ref, who = key
        if self.kept(registry, repository, kind, ref):
            at, grant = self._repo_yes.get((registry, repository, who), (0.0, None))
            if not who:
                at = max(at, self._public.get(f"{registry} {repository}", 0.0))
            if now - at <= self.offline_grace:
                log.warning("%s/%s: registry unreachable (%s): %s %s kept for the repository, which the registry "
                            "let this requester (%s) read %.0f s ago", registry, repository, exc, kind, ref[:19],
                            "with credentials" if who else "anonymous", now - at)
                return _Answer(0.0, grant=grant or Grant(registry, repository), at=at)
        challenge = self._challenges.get((registry, repository), "")
        if not who and challenge:
            # The registry required credentials for this repository when it last answered: ask for them, as
            # it would (a client holding some presents them and the rule above decides).
            return _Answer(0.0, error=AccessDenied(
                f"{registry} is unreachable and did not let anonymous clients read {repository}",
                status=401, challenge=challenge))
        log.info("%s/%s: registry unreachable (%s): refused %s %s to this requester (%s): no earlier yes of the "
                 "registry for it, or the object is not one kept for the repository", registry, repository, exc,
                 kind, ref[:19], "with credentials" if who else "anonymous")
        return _Answer(0.0, error=exc)

    def _load_public(self) -> dict[str, float]:
        if self.state_file is None:
            return {}
        try:
            doc = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable, starting without it: %s", self.state_file, exc)
            return {}
        if not isinstance(doc, dict):
            return {}
        now = time.time()
        return {k: float(v) for k, v in doc.items() if isinstance(k, str) and isinstance(v, (int, float))
                and now - float(v) <= self.offline_grace}

    def _remember_public(self, key: tuple) -> None:
        """Record an anonymous yes (no credential involved). The file is rewritten at most once a second
        for objects not recorded yet, once a minute for refreshes, and at close."""
        name = " ".join(key[:4])   # an object ("registry repo kind ref") or a repository ("registry repo")
        now = time.time()
        new = name not in self._public
        self._public[name] = now
        self._public_dirty = True
        if now - self._public_saved > (1.0 if new else 60.0):
            self._save_public(now)

    def _save_public(self, now: float) -> None:
        if self.state_file is None:
            return
        if len(self._public) > MAX_ENTRIES:
            for old in sorted(self._public, key=self._public.get)[:len(self._public) - MAX_ENTRIES]:
                del self._public[old]
        self._public_saved, self._public_dirty = now, False
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self._public))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning("%s: cannot record anonymous access answers: %s", self.state_file, exc)

    @staticmethod
    def _result(answer: _Answer) -> Grant:
        if answer.error is not None:
            raise answer.error.with_traceback(None)   # a cached answer is raised again and again
        return answer.grant

    async def _ask(self, registry: str, repository: str, kind: str, ref: str, authorization: str | None,
                   who: bytes) -> _Answer:
        base = self.endpoint(registry)
        url = f"{base}/v2/{repository}/{kind}s/{ref}"
        what = f"{registry}/{repository} {kind} {ref[:19]}"
        used, ttl = authorization, self.allow_ttl
        exchanged = self._tokens.get((registry, repository, who))
        status = 401
        if exchanged is not None and exchanged[1] > time.monotonic():
            status, challenge = await self._head(url, exchanged[0], kind)
            if status != 401:
                used, ttl = exchanged[0], min(ttl, exchanged[1] - time.monotonic())
        if status == 401:
            status, challenge = await self._head(url, authorization, kind)
        if status == 401 and used is authorization:
            bearer = _bearer_challenge(challenge)
            basic = authorization is None or authorization.lower().startswith("basic ")
            if bearer is not None and basic:
                token = await self._token(bearer, registry, repository, authorization,
                                          plain_http=self.plain_http(registry))
                if token is not None:
                    used = f"Bearer {token[0]}"
                    lifetime = max(1.0, token[1] - 10)
                    ttl = min(ttl, lifetime)   # the grant carries the token: not cached past its end
                    self._tokens[(registry, repository, who)] = (used, time.monotonic() + lifetime)
                    while len(self._tokens) > MAX_ENTRIES:
                        self._tokens.popitem(last=False)
                    status, _ = await self._head(url, used, kind)
        now = time.monotonic()
        if 200 <= status < 400:
            log.debug("access to %s: allowed (%s)", what, "with credentials" if authorization else "anonymous")
            return _Answer(now + ttl, grant=Grant(registry, repository, used), at=time.time())
        if status == 404:
            return _Answer(now + self.deny_ttl, error=NotFound(f"{what}: not found"))
        if status in (401, 403):
            log.info("access to %s: refused by the registry (%d, %s)", what, status,
                     "with credentials" if authorization else "anonymous")
            return _Answer(now + self.deny_ttl, error=AccessDenied(
                f"{registry} does not let this client read {repository} "
                f"({'credentials refused' if authorization else 'authentication required'})",
                status=status, challenge=challenge))
        raise RegistryError(f"{registry}: access check answered {status}")

    async def _head(self, url: str, authorization: str | None, kind: str) -> tuple[int, str]:
        headers = {"Accept-Encoding": "identity"}
        if kind == "manifest":
            headers["Accept"] = MANIFEST_ACCEPT
        if authorization:
            headers["Authorization"] = authorization
        self.asked += 1
        try:
            async with self._http().head(url, headers=headers, allow_redirects=False) as resp:
                return resp.status, resp.headers.get("WWW-Authenticate", "")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise RegistryError(f"{urlsplit(url).netloc}: access check failed: {type(exc).__name__}") from None

    async def _token(self, challenge: authcore.Challenge, registry: str, repository: str,
                     authorization: str | None, *, plain_http: bool) -> tuple[str, float] | None:
        """A token for ``repository:<repository>:pull`` from the challenge's realm, with the client's
        Basic credentials (or none); None when the token service refuses or may not be asked (the
        realm rule of :mod:`remora.registry.authcore`: a client's credentials never go to a plain-HTTP
        realm unless the registry itself is configured plain HTTP, or both are on loopback)."""
        try:
            scope = authcore.repository_scope(repository)
            req = authcore.token_request(challenge, scope, None, registry=registry, allow_plain_http=plain_http)
            if authorization:
                authcore.check_realm(challenge.realm, registry, with_credentials=True, allow_plain_http=plain_http)
        except (RegistryError, AuthError, InvalidInput) as exc:
            log.info("access check for %s/%s: %s", registry, repository, exc)
            return None
        headers = dict(req.headers)
        if authorization:
            headers["Authorization"] = authorization
        self.asked += 1
        realm_host = urlsplit(req.url).netloc
        try:
            async with self._http().get(req.url, headers=headers, allow_redirects=False) as resp:
                if resp.status != 200:
                    return None
                body = await resp.content.read(authcore.MAX_TOKEN_RESPONSE + 1)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise RegistryError(f"token service of {realm_host}: {type(exc).__name__}") from None
        try:
            token = authcore.parse_token_response(body, now=time.monotonic())
        except RegistryError as exc:
            log.info("access check for %s/%s: %s", registry, repository, exc)
            return None
        return token.value, token.expires_in
