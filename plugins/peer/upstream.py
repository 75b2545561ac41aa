"""The registry side of the peer: async OCI distribution requests with this node's own credentials.

Only the peer that talks to the registry ever holds credentials: they are this node's own (read with
:func:`remora.registry.auth.load_credentials`: ``REMORA_USERNAME``/``REMORA_PASSWORD``, then the docker
config's credential helpers and ``auths``), and they are never put on the wire to other peers (pieces
carry no headers of the registry).
Handles the two auth schemes of the distribution spec (Basic, and Bearer tokens from the realm named in
``WWW-Authenticate``) as the aiohttp shell of :mod:`remora.registry.authcore` (the I/O-free core the
sync :class:`RegistryClient` drives too: challenge parsing, scopes, token requests, the plain-HTTP realm
rule, token responses and the token cache), follows redirects to blob storage by hand so
``Authorization`` never leaks to another host, and maps failures onto :mod:`remora.errors` (404 -> NotFound,
401/403 -> AuthError, the rest -> RegistryError) so the mirror can answer containerd with a clean status.

**Which registries.** The peer fetches only from the registries it is configured for (``--upstream``
and each ``--registry``): the name in a request (containerd's ``?ns=``, the ``X-Remora-Upstream``
header) is checked by :func:`registry_guard` before a handler runs, and again by :meth:`Upstream.request`
before any connection is made, so the mirror is never a proxy to an arbitrary host:port (a port scanner
of the node's networks, with the node's credentials on top).

**What errors say.** The messages of the errors raised here end up in HTTP answers to clients, so they
name the request path and the registry's status, never the URL dialled, a connection error's text or an
exception: those are logged here (a refused or unreachable address is what a port scan wants to learn).
"""
from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import aiohttp

from remora import __version__
from remora.errors import AuthError, NotFound, RegistryError, RemoraError
from remora.registry import authcore
from remora.registry.auth import Credentials, is_loopback, load_credentials
from remora.registry.manifestcheck import MAX_MANIFEST_SIZE, check_declared_length, check_manifest

log = logging.getLogger(__name__)

#: Docker Hub's name in image references vs the host that serves its API.
HUB_ALIASES = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}


class RegistryUnreachable(RegistryError):
    """The registry gave no answer that decides anything: connection refused or reset, a timeout, a 5xx
    (or its token service so). The mirror may then answer from what it keeps (offline.py); a 401, 403 or
    404 is an answer and never raises this."""


class RegistryNotAllowed(RemoraError):
    """A request named a registry this peer is not configured for: 403, nothing was dialled."""

    exit_code = 4


def canonical_registry(name: str) -> str:
    """The name a registry is compared by: lower case, Docker Hub's aliases folded into ``docker.io``."""
    name = name.strip().lower()
    if name in HUB_ALIASES or name in HUB_ALIASES.values():
        return "docker.io"
    return name


#: What :func:`scrub` takes out of error messages: ``host:port`` (names, IPv4, ``[IPv6]``), URLs, and the
#: names of exceptions (``ClientConnectorError``, ``ConnectionRefusedError``), ``[Errno N]`` texts.
_LEAKS = re.compile(r"[a-z][a-z0-9+.-]*://\S+"
                    r"|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?"
                    r"|\b[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*:\d{1,5}\b"
                    r"|\b\d{1,3}(?:\.\d{1,3}){3}\b"
                    r"|\[Errno[^\]]*\][^;]*"
                    r"|\b[A-Z][A-Za-z]*(?:Error|Exception|Timeout)\b")


def scrub(message: str) -> str:
    """An error message fit for a client: no address, URL or exception text (those go to the log)."""
    return _LEAKS.sub("<upstream>", message)


def registry_guard(upstream: Upstream, metrics=None):
    """An aiohttp middleware for the mirror.

    - A request that names a registry (``?ns=`` or the ``X-Remora-Upstream`` header) outside the
      allow-list gets 403 before any handler runs (and so before any cached blob is looked at or any
      connection made).
    - A 5xx error answer has its messages passed through :func:`scrub`, whoever wrote them: a client
      must not learn from the mirror which addresses answer, refuse or time out.
    """
    import json

    from aiohttp import web

    from .mirror import UPSTREAM_HEADER

    def scrubbed(resp):
        if not isinstance(resp, web.Response) or resp.status < 500 or not resp.body or len(resp.body) > 65536:
            return resp
        try:
            doc = json.loads(resp.body)
            errors = doc["errors"]
            changed = False
            for e in errors:
                clean = scrub(str(e.get("message", "")))
                if clean != e.get("message"):
                    log.info("error answer scrubbed (was: %s)", str(e.get("message"))[:500])
                    e["message"], changed = clean, True
        except (ValueError, KeyError, TypeError, AttributeError):
            return resp
        if changed:
            resp.body = json.dumps(doc).encode()
        return resp

    @web.middleware
    async def guard(request, handler):
        if request.path.startswith("/v2/"):
            for named in (request.query.get("ns"), request.headers.get(UPSTREAM_HEADER)):
                if named and not upstream.allows(named):
                    log.warning("refused a request for registry %r (not configured: --registry to allow it)",
                                named[:200])
                    if metrics is not None:
                        metrics.requests.labels("registry", "403").inc()
                    body = ('{"errors": [{"code": "DENIED", "message": "registry not allowed by this mirror"}]}')
                    return web.Response(status=403, text=body, content_type="application/json",
                                        headers={"Docker-Distribution-API-Version": "registry/2.0"})
            return scrubbed(await handler(request))
        return await handler(request)

    return guard


class Upstream:
    """One aiohttp session to any number of registries, with per-host auth state."""

    def __init__(self, plain_http: list[str] | None = None, docker_config: Path | None = None,
                 timeout: float = 30.0, allowed: list[str] | None = None):
        self.plain_http = set(plain_http or [])
        #: registries this peer may fetch from (canonical names); see :meth:`allows`
        self.allowed: set[str] = {canonical_registry(r) for r in allowed or [] if r}
        self.docker_config = docker_config
        self._credentials: dict[str, Credentials | None] = {}
        self.timeout = timeout
        #: per registry, once it has challenged: its Basic header, or its last Bearer challenge
        self._basic: dict[str, str] = {}
        self._bearer: dict[str, authcore.Challenge] = {}
        self._tokens = authcore.TokenCache()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # identity: digests are over the bytes as stored, so no transfer compression may touch them.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(self.timeout, 10), sock_read=self.timeout),
            auto_decompress=False, headers={"Accept-Encoding": "identity", "User-Agent": f"remora-peer/{__version__}"})

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    # -- addressing -----------------------------------------------------------------------------------
    def allow(self, registry: str) -> None:
        """Add a registry to the allow-list (what ``--registry`` does at start)."""
        self.allowed.add(canonical_registry(registry))

    def allows(self, registry: str) -> bool:
        return canonical_registry(registry) in self.allowed

    def configured_plain_http(self, registry: str) -> bool:
        """Whether the operator said ``--plain-http`` for ``registry`` (loopback alone does not count:
        it decides the scheme, never whether credentials may cross plain HTTP to another host)."""
        return registry in self.plain_http or HUB_ALIASES.get(registry, registry) in self.plain_http

    def endpoint(self, registry: str) -> str:
        host = HUB_ALIASES.get(registry, registry)
        plain = registry in self.plain_http or host in self.plain_http or is_loopback(host)
        return f"{'http' if plain else 'https'}://{host}"

    async def _creds(self, registry: str) -> Credentials | None:
        """This node's credentials for ``registry`` (looked up once; helpers may run a program)."""
        if registry not in self._credentials:
            self._credentials[registry] = await asyncio.to_thread(load_credentials, registry, self.docker_config)
        return self._credentials[registry]

    # -- requests -------------------------------------------------------------------------------------
    async def manifest(self, registry: str, name: str, ref: str, accept: str) -> tuple[bytes, str, str]:
        """GET a manifest: (body, Content-Type, its sha256 digest), checked against ``ref`` when that is a
        digest, else against the registry's ``Docker-Content-Digest`` if it sent one; at most
        MAX_MANIFEST_SIZE bytes (InvalidInput past that). An answer that breaks off is RegistryUnreachable."""
        resp = await self.request("GET", registry, f"/v2/{name}/manifests/{ref}", {"Accept": accept},
                                  scope=f"repository:{name}:pull")
        what = f"manifest {name}:{ref} from {registry}"
        try:
            check_declared_length(resp.content_length, what)
            try:
                body = await resp.content.read(MAX_MANIFEST_SIZE + 1)
            except aiohttp.ClientError as exc:
                raise RegistryUnreachable(f"manifest {name}:{ref}: the registry's answer broke off") from exc
            content_type = resp.headers.get("Content-Type", "application/octet-stream")
            claimed = resp.headers.get("Docker-Content-Digest", "")
        finally:
            resp.release()
        return body, content_type, check_manifest(body, ref, claimed, what)

    async def request(self, method: str, registry: str, path: str, headers: dict[str, str] | None = None,
                      scope: str = "") -> aiohttp.ClientResponse:
        """A request to ``registry`` (``path`` starts with ``/v2/``) with auth and redirects handled.

        Returns a 2xx response (the caller reads and releases it); anything else raises.
        """
        assert self._session is not None, "Upstream.start() was not awaited"
        if not self.allows(registry):
            log.warning("refused to fetch %s from registry %r: not configured (--registry)", path[:200], registry[:200])
            raise RegistryNotAllowed("registry not allowed by this mirror")
        url = self.endpoint(registry) + path
        headers = dict(headers or {})
        for attempt in range(2):
            auth = self._auth_header(registry, scope)
            resp = await self._follow(method, url, headers, auth)
            if resp.status == 401 and attempt == 0 and "WWW-Authenticate" in resp.headers:
                challenge = resp.headers.getall("WWW-Authenticate")
                resp.release()
                await self._authenticate(registry, scope, challenge)
                continue
            break
        if 200 <= resp.status < 300:
            return resp
        body = b""
        try:
            body = await resp.content.read(2048)
        except (TimeoutError, aiohttp.ClientError):
            pass
        resp.release()
        detail = body.decode(errors="replace").strip()[:300]
        log.info("%s %s: %d %s %s", method, url, resp.status, resp.reason, detail[:200])
        what = f"{method} {path}"   # not the URL: the answer goes to the client
        if resp.status >= 500:
            raise RegistryUnreachable(f"{what}: {resp.status} {resp.reason} {detail}".rstrip())
        if resp.status == 404:
            raise NotFound(f"{what}: not found ({detail or resp.reason})")
        if resp.status in (401, 403):
            raise AuthError(f"{what}: {resp.status} {resp.reason} (credentials of this node for {registry}?)")
        raise RegistryError(f"{what}: {resp.status} {resp.reason} {detail}".rstrip())

    async def _follow(self, method: str, url: str, headers: dict, auth: str | None) -> aiohttp.ClientResponse:
        origin = urlsplit(url).netloc
        for _ in range(6):
            h = dict(headers)
            if auth and urlsplit(url).netloc == origin:
                h["Authorization"] = auth
            try:
                resp = await self._session.request(method, url, headers=h, allow_redirects=False)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.warning("%s %s: cannot reach the registry: %s", method, url, exc or type(exc).__name__)
                raise RegistryUnreachable(f"{method} {urlsplit(url).path}: registry unreachable") from None
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                url = urljoin(url, resp.headers["Location"])
                resp.release()
                continue
            return resp
        log.warning("%s %s: too many redirects", method, url)
        raise RegistryError(f"{method} {urlsplit(url).path}: too many redirects")

    def _auth_header(self, registry: str, scope: str) -> str | None:
        challenge = self._bearer.get(registry)
        if challenge is not None:
            token = self._tokens.get(challenge, scope, self._tokens.identity(self._credentials.get(registry)))
            if token is not None:
                return token.header()
        return self._basic.get(registry)

    async def _authenticate(self, registry: str, scope: str, header: list[str]) -> None:
        try:
            challenge = authcore.select_challenge(authcore.parse_challenges(header))
        except RegistryError as exc:
            log.warning("%s: %s", registry, exc)
            raise RegistryError(f"{registry}: {scrub(str(exc))}") from None
        creds = await self._creds(registry)
        if challenge is None:
            raise AuthError(f"{registry}: unsupported auth challenge (Basic or Bearer only)")
        if challenge.scheme == "basic":
            basic = creds.basic() if creds else None
            if not basic:
                raise AuthError(f"{registry} requires credentials and this node has none for it "
                                "(docker login on this node, or --registry-config)")
            self._basic[registry] = f"Basic {basic}"
            return
        self._bearer[registry] = challenge
        want = authcore.merge_scopes(scope, challenge.scope)
        try:
            req = authcore.token_request(challenge, want, creds, registry=registry,
                                         allow_plain_http=registry in self.plain_http)
        except (AuthError, RegistryError) as exc:  # the realm may not have credentials / is no URL
            log.warning("%s: %s", registry, exc)
            raise type(exc)(scrub(str(exc))) from None
        try:
            async with self._session.request(req.method, req.url, headers=req.headers, data=req.body()) as resp:
                if resp.status in (401, 403):
                    raise AuthError(f"{registry}: token service refused this node's credentials ({resp.status})")
                if resp.status >= 500:
                    raise RegistryUnreachable(f"{registry}: token service answered {resp.status}")
                if resp.status != 200:
                    raise RegistryError(f"{registry}: token service answered {resp.status}")
                body = bytearray()
                while len(body) <= authcore.MAX_TOKEN_RESPONSE:   # bounded: one byte more is enough to refuse
                    chunk = await resp.content.read(authcore.MAX_TOKEN_RESPONSE + 1 - len(body))
                    if not chunk:
                        break
                    body += chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("%s: token service %s failed: %s", registry, challenge.realm, exc or type(exc).__name__)
            raise RegistryUnreachable(f"{registry}: token service failed") from None
        try:
            token = authcore.parse_token_response(bytes(body), now=self._tokens.clock())
        except RegistryError as exc:
            raise RegistryError(f"{registry}: {exc}") from None
        who = self._tokens.identity(creds)
        self._tokens.put(challenge, want, who, token)
        self._tokens.put(challenge, scope, who, token)   # what _auth_header looks up
