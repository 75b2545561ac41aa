"""Where the bytes of data blobs come from: a registry, or a mirror/peer that speaks the same API.

A source answers one question: "bytes ``start..end`` (inclusive) of blob ``digest``". Both a registry
(``GET /v2/<repo>/blobs/<digest>``) and a remora peer (the same path plus ``?ns=<registry host>``)
answer it with an HTTP ``Range`` request, so one class serves both. The fetcher tries its sources in
order (peers/mirrors first, then the registry) and verifies every chunk, so a source is trusted for
nothing but availability.

Every request has a connect and a read timeout: an unreachable or stalled source becomes a
:class:`~remora.errors.RegistryError` within a bounded time, never a hang of the reader.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests

from remora.errors import AuthError, InvalidInput, NotFound, RegistryError

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_READ_TIMEOUT = 20.0
STREAM_BLOCK = 256 * 1024  # pieces a streamed range read is handed over in


@dataclass
class SourceSpec:
    """A JSON-friendly description of one blob source (it crosses the process boundary to a mount).

    ``url`` is the base (``http://127.0.0.1:5000``); ``repo`` the repository; ``ns`` the registry host
    a peer/mirror should fetch from (sent as ``?ns=``), empty for the registry itself. ``kind``
    ``staged`` is the snapshotter's early-prefetch directory (``url`` is its path, ``staged`` the
    bytes staged per blob; :mod:`remora.snapshotter.staging`). ``kind``
    ``registry`` goes through :class:`remora.registry.client.RegistryClient` (credentials from the
    docker config / auth helpers when none are given here, token auth, retries); ``peer`` is a plain
    ranged GET with ``?ns=`` (a remora peer or a registry mirror).
    """

    url: str
    repo: str
    kind: str = "registry"
    ns: str = ""
    retries: int = 1
    username: str = ""
    password: str = field(default="", repr=False)  # never in a log line or a traceback
    identity_token: str = field(default="", repr=False)  # an OAuth2 refresh token (CRI identity_token)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    verify_tls: bool = True
    staged: dict[str, int] = field(default_factory=dict)  # kind "staged": blob -> bytes staged
    #: the registry behind this source is configured plain HTTP (``--insecure``): only then may the
    #: credentials go to a plain-HTTP token realm on another host (remora.registry.authcore)
    plain_http: bool = False

    @classmethod
    def registry(cls, host: str, repo: str, insecure: bool = False, **kw) -> SourceSpec:
        """A registry by host name; plain HTTP when ``insecure`` (or for loopback hosts)."""
        plain = insecure or host.startswith(("127.", "localhost", "[::1]"))
        return cls(url=f"{'http' if plain else 'https'}://{host}", repo=repo, kind="registry", **kw)

    @classmethod
    def peer(cls, base_url: str, repo: str, registry_host: str, **kw) -> SourceSpec:
        """A remora peer or mirror at ``base_url`` serving blobs of ``registry_host`` (``?ns=``)."""
        return cls(url=base_url.rstrip("/"), repo=repo, kind="peer", ns=registry_host, **kw)

    @classmethod
    def staging(cls, directory: str, staged: dict[str, int]) -> SourceSpec:
        """The snapshotter's early-prefetch directory (:mod:`remora.snapshotter.staging`)."""
        return cls(url=str(directory), repo="", kind="staged", staged=dict(staged))

    def describe(self) -> str:
        return f"{self.url}/v2/{self.repo}" + (f"?ns={self.ns}" if self.ns else "")


def open_source(spec: SourceSpec, client=None):
    """The source object for a spec: ``.name`` and ``.read_range(blob, start, end_inclusive)``;
    ``client``: a RegistryClient a ``registry`` source should use instead of its own."""
    if spec.kind == "registry":
        return RegistryClientSource(spec, client)
    if spec.kind == "peer":
        return HttpBlobSource(spec)
    if spec.kind == "staged":
        from remora.snapshotter.staging import StagedSource

        return StagedSource(spec.url, spec.staged, stall_timeout=spec.read_timeout)
    raise InvalidInput(f"unknown blob source kind {spec.kind!r} (registry, peer or staged)")


class RegistryClientSource:
    """A registry through the shared :class:`RegistryClient` (auth discovery, token flow, retries)."""

    def __init__(self, spec: SourceSpec, client=None):
        from remora.registry.client import RegistryClient

        self.spec = spec
        self.name = spec.describe()
        scheme, _, host = spec.url.partition("://")
        creds = _credentials(spec)
        # ``client``: share one (its kept-alive connection) with other work for the same registry
        self.client = client or RegistryClient(host.rstrip("/"), plain_http=scheme == "http", credentials=creds,
                                               timeout=spec.read_timeout, retries=spec.retries, backoff=0.1)

    def read_range(self, blob: str, start: int, end: int, sink=None) -> bytes | int:
        return self.client.get_blob_range(self.spec.repo, blob, start, end, sink=sink)

    def close(self) -> None:
        self.client.close()


def _credentials(spec: SourceSpec):
    """The spec's own credentials (None: the client finds the node's, docker config and helpers)."""
    from remora.registry.auth import Credentials

    if spec.identity_token:
        return Credentials(username=spec.username or None, identity_token=spec.identity_token, source="mount spec")
    if spec.username:
        return Credentials(username=spec.username, password=spec.password, source="mount spec")
    return None


class HttpBlobSource:
    """Range reads of blobs over the registry HTTP API, with Basic or Bearer-token auth."""

    def __init__(self, spec: SourceSpec, session: requests.Session | None = None):
        self.spec = spec
        self.name = spec.describe()
        self._session = session or requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._auth_header: str | None = None
        self._lock = threading.Lock()

    def read_range(self, blob: str, start: int, end: int, sink=None) -> bytes | int:
        """Bytes ``start..end`` inclusive of ``blob`` (with ``sink``: streamed to it, the count
        returned); raises RegistryError/NotFound/AuthError."""
        s = self.spec
        url = f"{s.url.rstrip('/')}/v2/{s.repo}/blobs/{blob}"
        params = {"ns": s.ns} if s.ns else None
        want = end - start + 1
        headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
        for attempt in range(2):
            if self._auth_header:
                headers["Authorization"] = self._auth_header
            try:
                r = self._session.get(url, params=params, headers=headers, stream=True,
                                      timeout=(s.connect_timeout, s.read_timeout), verify=s.verify_tls)
            except requests.RequestException as exc:
                raise RegistryError(f"{self.name}: {blob} bytes {start}-{end}: {_short(exc)}") from None
            try:
                if r.status_code == 401 and attempt == 0:
                    self._authenticate(r.headers.get("WWW-Authenticate", ""))
                    continue
                return self._body(r, blob, start, want, sink)
            finally:
                r.close()
        raise AuthError(f"{self.name}: credentials refused for {blob}")

    def close(self) -> None:
        self._session.close()

    def _body(self, r: requests.Response, blob: str, start: int, want: int, sink=None) -> bytes | int:
        where = f"{self.name}: {blob} bytes {start}-{start + want - 1}"
        if r.status_code == 404:
            raise NotFound(f"{where}: blob not found")
        if r.status_code in (401, 403):
            raise AuthError(f"{where}: HTTP {r.status_code}")
        try:
            if r.status_code == 206 and sink is not None:
                got = 0
                while got < want:
                    block = r.raw.read(min(want - got, STREAM_BLOCK), decode_content=False)
                    if not block:
                        break
                    got += len(block)
                    sink(block)
                if got != want or r.raw.read(1, decode_content=False):
                    raise InvalidInput(f"{where}: the range's body is not {want} bytes")
                return got
            if r.status_code == 206:
                data = r.raw.read(want + 1, decode_content=False)
                if len(data) != want:
                    raise InvalidInput(f"{where}: got {len(data)} bytes for a {want}-byte range")
                return data
            if r.status_code == 200:
                # The server ignored Range: skip to the wanted bytes rather than fail.
                log.warning("%s: server ignored the Range header; reading past %d bytes", self.name, start)
                skipped = 0
                while skipped < start:
                    block = r.raw.read(min(1 << 20, start - skipped), decode_content=False)
                    if not block:
                        break
                    skipped += len(block)
                data = r.raw.read(want, decode_content=False)
                if len(data) != want:
                    raise InvalidInput(f"{where}: blob shorter than the requested range")
                if sink is not None:
                    sink(data)
                    return want
                return data
        except (requests.RequestException, OSError) as exc:  # read timeout / reset mid-body
            raise RegistryError(f"{where}: {_short(exc)}") from None
        raise RegistryError(f"{where}: HTTP {r.status_code} {r.reason}")

    def _authenticate(self, challenge: str) -> None:
        """Answer a 401 (a mirror passes the registry's challenge through) with the registry-auth core
        every remora client uses: challenge parsing, the realm rule (the spec's credentials never go to
        a plain-HTTP token server on another host unless the registry is configured plain HTTP, or both
        are on loopback), token request and response."""
        from remora.registry import authcore

        s = self.spec
        creds = _credentials(s)
        chosen = authcore.select_challenge(authcore.parse_challenges(challenge))  # RegistryError if malformed
        if chosen is None:
            raise AuthError(f"{self.name}: unsupported auth challenge {challenge[:100]!r}")
        with self._lock:
            if chosen.scheme == "basic":
                basic = creds.basic() if creds is not None else None
                if basic is None:
                    raise AuthError(f"{self.name}: authentication required and no credentials configured")
                self._auth_header = f"Basic {basic}"
                return
            registry = s.ns or urlsplit(s.url).netloc   # whose token server this is
            scope = authcore.merge_scopes(authcore.repository_scope(s.repo), chosen.scope)
            req = authcore.token_request(chosen, scope, creds, registry=registry, allow_plain_http=s.plain_http)
            try:
                r = self._session.request(req.method, req.url, headers=req.headers, data=req.body(), stream=True,
                                          timeout=(s.connect_timeout, s.read_timeout), verify=s.verify_tls,
                                          allow_redirects=False)
                try:
                    status = r.status_code
                    body = r.raw.read(authcore.MAX_TOKEN_RESPONSE + 1, decode_content=True) if status == 200 else b""
                finally:
                    r.close()
            except (requests.RequestException, OSError) as exc:
                raise RegistryError(f"{self.name}: token service {urlsplit(req.url).netloc}: {_short(exc)}") from None
            if status != 200:
                raise AuthError(f"{self.name}: token service {urlsplit(req.url).netloc} answered HTTP {status}")
            token = authcore.parse_token_response(body, now=time.monotonic())
            self._auth_header = token.header()


def _short(exc: Exception) -> str:
    """requests nests urllib3's whole repr in its messages; keep the innermost reason."""
    reason = exc
    while reason.__context__ is not None and isinstance(reason.__context__, Exception):
        reason = reason.__context__
    text = str(reason).split(": ", 1)[-1] if "object at 0x" in str(reason) else str(reason)
    return f"{type(exc).__name__}: {text[:200]}"
