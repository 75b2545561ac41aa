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
from typing import NoReturn
from urllib.parse import urlsplit

import requests
import urllib3

from remora.errors import AuthError, InvalidInput, NotFound, RegistryError, RemoraError
from remora.registry.manifestcheck import MAX_MANIFEST_SIZE, check_declared_length, check_manifest

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

    def __init__(self, spec: SourceSpec, session: requests.Session | None = None, credentials_loader=None):
        self.spec = spec
        self.name = spec.describe()
        # no credentials in the spec: called on a 401 only (MirrorFirstStore gives one to mirrors on
        # this node, never to remote ones); None: anonymous
        self._credentials_loader = credentials_loader
        self._session = session or requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._auth_header: str | None = None
        self._lock = threading.Lock()

    def read_range(self, blob: str, start: int, end: int, sink=None) -> bytes | int:
        """Bytes ``start..end`` inclusive of ``blob`` (with ``sink``: streamed to it, the count
        returned); raises RegistryError/NotFound/AuthError."""
        r = self._get(f"blobs/{blob}", {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"},
                      f"{blob} bytes {start}-{end}")
        try:
            return self._body(r, blob, start, end - start + 1, sink)
        finally:
            r.close()

    def open_blob(self, blob: str, size: int):
        """The whole blob as a stream that raises at EOF unless it is exactly ``size`` bytes hashing to
        ``blob`` (:class:`~remora.digest.VerifyingReader`): a consumer that keeps the bytes only once
        it read to EOF never keeps a mirror's lie. Raises RegistryError/NotFound/AuthError."""
        import io

        from remora.digest import VerifyingReader

        r = self._get(f"blobs/{blob}", {"Accept-Encoding": "identity"}, blob)
        if r.status_code != 200:
            r.close()
            self._status_error(r, f"{self.name}: {blob}", "blob")
        return io.BufferedReader(VerifyingReader(_RawBody(r, f"{self.name}: {blob}"), blob, size,
                                                 what=f"blob {blob} from {self.name}"), 1 << 18)

    def get_manifest(self, reference: str, accept: str) -> tuple[bytes, str, str]:
        """``(bytes, media type, digest)`` of a manifest by digest or tag. By digest the bytes must hash
        to it; by tag to the ``Docker-Content-Digest`` the mirror claims, if it sends one (who may be
        asked for a tag at all is the caller's rule: MirrorFirstStore). At most MAX_MANIFEST_SIZE bytes."""
        where = f"{self.name}: manifest {reference}"
        r = self._get(f"manifests/{reference}", {"Accept": accept, "Accept-Encoding": "identity"},
                      f"manifest {reference}")
        try:
            if r.status_code != 200:
                self._status_error(r, where, "manifest")
            check_declared_length(r.headers.get("Content-Length"), where)
            try:
                data = r.raw.read(MAX_MANIFEST_SIZE + 1, decode_content=False)  # bounded: no decompression
            except (requests.RequestException, OSError, urllib3.exceptions.HTTPError) as exc:
                raise RegistryError(f"{where}: {_short(exc)}") from None
            media_type = r.headers.get("Content-Type", "").split(";")[0].strip()
            claimed = r.headers.get("Docker-Content-Digest", "")
        finally:
            r.close()
        return data, media_type, check_manifest(data, reference, claimed, where)

    def _get(self, path: str, headers: dict[str, str], what: str) -> requests.Response:
        """An open streamed GET of ``/v2/<repo>/<path>`` (``?ns=``), one 401 answered with credentials."""
        s = self.spec
        url = f"{s.url.rstrip('/')}/v2/{s.repo}/{path}"
        params = {"ns": s.ns} if s.ns else None
        for attempt in range(2):
            if self._auth_header:
                headers["Authorization"] = self._auth_header
            try:
                r = self._session.get(url, params=params, headers=headers, stream=True,
                                      timeout=(s.connect_timeout, s.read_timeout), verify=s.verify_tls)
            except requests.RequestException as exc:
                raise RegistryError(f"{self.name}: {what}: {_short(exc)}") from None
            if r.status_code == 401 and attempt == 0:
                challenge = r.headers.get("WWW-Authenticate", "")
                r.close()
                self._authenticate(challenge)
                continue
            return r
        raise AuthError(f"{self.name}: credentials refused for {what}")

    @staticmethod
    def _status_error(r: requests.Response, where: str, kind: str) -> NoReturn:
        if r.status_code == 404:
            raise NotFound(f"{where}: {kind} not found")
        if r.status_code in (401, 403):
            raise AuthError(f"{where}: HTTP {r.status_code}")
        raise RegistryError(f"{where}: HTTP {r.status_code} {r.reason}")

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
        if creds is None and self._credentials_loader is not None:
            creds = self._credentials_loader()
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


class MirrorFirstStore:
    """An image's manifests and small blobs from the configured mirrors/peers first, then the registry
    (``remora pull``'s manifest and config, the snapshotter's bootstrap): after a preheat, the node's
    peer holds them and the registry sees no blob read.

    The rules are the chunk reads' (fetch.py): mirrors in order, then the registry; every answer is
    verified (a blob against its digest and size, a manifest against the digest asked for); a mirror
    that fails or lies is logged and skipped for the next source, and one that was unreachable is not
    asked again for ``COOLDOWN`` seconds (``down``, shared by the caller's stores), so a dead peer costs
    one timeout, not one per image. Two more, for what is not named by a digest: a *tag* is resolved
    only by a mirror on this node (loopback: the node's own peer, in the node's trust domain like the
    credentials sent to it), never by a remote one, whose answer could not be checked against anything
    and could name another image's manifest; and credentials go to loopback mirrors only. Nothing here
    replaces the access check: the snapshotter still asks the registry whether this client may read
    the repository (RemoraLayerHandler._check_access), and a peer asks it for every request it serves.
    """

    COOLDOWN = 30.0

    def __init__(self, store, mirrors, credentials_loader=None, *, insecure: bool = False,
                 down: dict[str, float] | None = None):
        from remora.registry.auth import is_loopback

        self.store = store  # a remora.imagestore.RegistryStore: the fallback, and the reference
        self.ref = store.ref
        self.down = down if down is not None else {}  # mirror URL -> monotonic time it may be asked again
        self.sources: list[tuple[HttpBlobSource, bool]] = []
        now = time.monotonic()
        for url in mirrors:
            if self.down.get(url, 0.0) > now:
                log.info("mirror %s: skipped (unreachable less than %.0fs ago)", url, self.COOLDOWN)
                continue
            local = is_loopback(urlsplit(url).netloc)
            spec = SourceSpec.peer(url, self.ref.repository, self.ref.host, plain_http=insecure)
            self.sources.append((HttpBlobSource(spec, credentials_loader=credentials_loader if local else None),
                                 local))

    def resolve(self):
        """``(descriptor, bytes)`` of the manifest or index the reference names (verified)."""
        from remora import oci

        by_digest = bool(self.ref.digest)
        for source, local in self.sources:
            if not (by_digest or local):
                continue
            try:
                data, media_type, digest = source.get_manifest(self.ref.reference, _manifest_accept())
                if by_digest and digest != self.ref.digest:
                    raise InvalidInput(f"{source.name}: manifest {self.ref.digest} hashes to {digest}")
                parsed = oci.parse_manifest_or_index(data, media_type if media_type in _manifest_types() else None)
            except RemoraError as exc:
                self.skipped(source, f"manifest {self.ref}", exc)
                continue
            return oci.Descriptor(parsed.media_type, digest, len(data)), data
        return self.store.resolve()

    def get_manifest(self, desc_or_digest) -> bytes:
        """A manifest by digest (an index's platform entry), verified."""
        digest = getattr(desc_or_digest, "digest", desc_or_digest)
        size = getattr(desc_or_digest, "size", None)
        for source, _local in self.sources:
            try:
                data, _, actual = source.get_manifest(digest, _manifest_accept())
                if actual != digest or (size is not None and size != len(data)):
                    raise InvalidInput(f"{source.name}: manifest {digest} is not the one asked for")
            except RemoraError as exc:
                self.skipped(source, f"manifest {digest}", exc)
                continue
            return data
        return self.store.get_manifest(desc_or_digest)

    def read_blob(self, desc, max_size: int | None = None) -> bytes:
        """A small blob (config) whole in memory, verified against ``desc``."""
        from remora.imagestore import MAX_CONFIG_SIZE

        limit = MAX_CONFIG_SIZE if max_size is None else max_size
        if desc.size > limit:
            raise InvalidInput(f"blob {desc.digest} is {desc.size} bytes, over the {limit}-byte limit")
        for source, opener in self.openers(desc):
            try:
                with opener() as f:
                    return f.read()
            except RemoraError as exc:
                if source is None:
                    raise
                self.skipped(source, f"blob {desc.digest}", exc)
        raise AssertionError("unreachable: the registry is the last opener")

    def openers(self, desc):
        """``(source, open)`` pairs for ``desc``, mirrors first, the registry last (source None): a
        caller that spools a stream (and learns of a lie only at its end) tries them in turn, and
        reports a mirror's failure with :meth:`skipped`."""
        for source, _local in self.sources:
            yield source, (lambda s=source: s.open_blob(desc.digest, desc.size))
        yield None, (lambda: self.store.open_blob(desc))

    def skipped(self, source: HttpBlobSource, what: str, exc: Exception) -> None:
        """Log why ``source`` did not give ``what``; an unreachable one (no answer, 5xx, timeout) cools
        down. A lie (bad digest or size) or a refusal is a warning: the node's peer should not lie."""
        if isinstance(exc, RegistryError) and not isinstance(exc, (NotFound, AuthError)):
            self.down[source.spec.url] = time.monotonic() + self.COOLDOWN
            if len(self.down) > 256:  # bounded: forget the ones whose cool-down is over
                now = time.monotonic()
                for url in [u for u, t in self.down.items() if t <= now]:
                    del self.down[url]
            log.info("%s: %s unreachable (%s); next source, not asked for %.0fs", what, source.name, exc,
                     self.COOLDOWN)
        elif isinstance(exc, NotFound):
            log.info("%s: not on %s; next source", what, source.name)
        else:
            log.warning("%s from %s refused: %s; next source", what, source.name, exc)

    def close_mirrors(self) -> None:
        """Close the mirrors' connections only (the registry store's client may be shared)."""
        for source, _local in self.sources:
            source.close()

    def close(self) -> None:
        self.close_mirrors()
        self.store.close()

    def __enter__(self) -> MirrorFirstStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _manifest_accept() -> str:
    from remora.oci import MANIFEST_ACCEPT

    return ", ".join(MANIFEST_ACCEPT)


def _manifest_types():
    from remora.oci import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES

    return MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES


class _RawBody:
    """The body of an open response as a plain ``read(n)`` stream; transport errors become
    :class:`RegistryError` and ``close`` releases the connection."""

    def __init__(self, r: requests.Response, where: str):
        self._r, self._where = r, where

    def read(self, n: int = -1) -> bytes:
        try:
            return self._r.raw.read(None if n is None or n < 0 else n, decode_content=False)
        except (requests.RequestException, OSError, urllib3.exceptions.HTTPError) as exc:
            raise RegistryError(f"{self._where}: {_short(exc)}") from None

    def close(self) -> None:
        self._r.close()


def _short(exc: Exception) -> str:
    """requests nests urllib3's whole repr in its messages; keep the innermost reason."""
    reason = exc
    while reason.__context__ is not None and isinstance(reason.__context__, Exception):
        reason = reason.__context__
    text = str(reason).split(": ", 1)[-1] if "object at 0x" in str(reason) else str(reason)
    return f"{type(exc).__name__}: {text[:200]}"
