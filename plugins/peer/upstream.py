"""The registry side of the peer: async OCI distribution requests with this node's own credentials.

Only the peer that talks to the registry ever holds credentials: they are this node's own (read with
:func:`remora.registry.auth.load_credentials`: ``REMORA_USERNAME``/``REMORA_PASSWORD``, then the docker
config's credential helpers and ``auths``), and they are never put on the wire to other peers (pieces
carry no headers of the registry).
Handles the two auth schemes of the distribution spec (Basic, and Bearer tokens from the realm named in
``WWW-Authenticate``), follows redirects to blob storage by hand so ``Authorization`` never leaks to
another host, and maps failures onto :mod:`remora.errors` (404 -> NotFound, 401/403 -> AuthError, the
rest -> RegistryError) so the mirror can answer containerd with a clean status.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from remora import __version__
from remora.errors import AuthError, NotFound, RegistryError
from remora.registry.auth import Credentials, is_loopback, load_credentials

log = logging.getLogger(__name__)

#: Docker Hub's name in image references vs the host that serves its API.
HUB_ALIASES = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict((k.lower(), v) for k, v in re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class Upstream:
    """One aiohttp session to any number of registries, with per-host auth state."""

    def __init__(self, plain_http: list[str] | None = None, docker_config: Path | None = None,
                 timeout: float = 30.0):
        self.plain_http = set(plain_http or [])
        self.docker_config = docker_config
        self._credentials: dict[str, Credentials | None] = {}
        self.timeout = timeout
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
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
    async def request(self, method: str, registry: str, path: str, headers: dict[str, str] | None = None,
                      scope: str = "") -> aiohttp.ClientResponse:
        """A request to ``registry`` (``path`` starts with ``/v2/``) with auth and redirects handled.

        Returns a 2xx response (the caller reads and releases it); anything else raises.
        """
        assert self._session is not None, "Upstream.start() was not awaited"
        url = self.endpoint(registry) + path
        headers = dict(headers or {})
        for attempt in range(2):
            auth = self._auth_header(registry, scope)
            resp = await self._follow(method, url, headers, auth)
            if resp.status == 401 and attempt == 0 and "WWW-Authenticate" in resp.headers:
                challenge = resp.headers["WWW-Authenticate"]
                resp.release()
                await self._authenticate(registry, scope, challenge)
                continue
            break
        if 200 <= resp.status < 300:
            return resp
        body = b""
        try:
            body = await resp.content.read(2048)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        resp.release()
        detail = body.decode(errors="replace").strip()[:300]
        what = f"{method} {url}"
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
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise RegistryError(f"{method} {url}: cannot reach the registry: {exc or type(exc).__name__}") from exc
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                url = urljoin(url, resp.headers["Location"])
                resp.release()
                continue
            return resp
        raise RegistryError(f"{method} {url}: too many redirects")

    def _auth_header(self, registry: str, scope: str) -> str | None:
        token = self._tokens.get((registry, scope))
        if token and token[1] > time.monotonic():
            return token[0]
        basic = self._tokens.get((registry, "basic"))
        return basic[0] if basic else None

    async def _authenticate(self, registry: str, scope: str, challenge: str) -> None:
        scheme, params = _parse_challenge(challenge)
        creds = await self._creds(registry)
        basic = f"Basic {creds.basic()}" if creds and creds.basic() else None
        if scheme == "basic":
            if not basic:
                raise AuthError(f"{registry} requires credentials and this node has none for it "
                                "(docker login on this node, or --registry-config)")
            self._tokens[(registry, "basic")] = (basic, float("inf"))
            return
        if scheme != "bearer" or "realm" not in params:
            raise AuthError(f"{registry}: unsupported auth challenge {challenge!r}")
        query = {"service": params.get("service", "")}
        if scope or params.get("scope"):
            query["scope"] = scope or params["scope"]
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urlencode(query)
        try:
            async with self._session.get(url, headers={"Authorization": basic} if basic else {}) as resp:
                if resp.status in (401, 403):
                    raise AuthError(f"{registry}: token service refused this node's credentials ({resp.status})")
                if resp.status != 200:
                    raise RegistryError(f"{registry}: token service answered {resp.status}")
                doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise RegistryError(f"{registry}: token service failed: {exc}") from exc
        token = doc.get("token") or doc.get("access_token")
        if not token:
            raise AuthError(f"{registry}: token service returned no token")
        ttl = float(doc.get("expires_in") or 60)
        self._tokens[(registry, scope)] = (f"Bearer {token}", time.monotonic() + max(10.0, ttl - 10))
