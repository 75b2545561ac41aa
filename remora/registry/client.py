"""The OCI distribution client every remora component uses to talk to a registry.

A requests session set up the way OCI clients such as oras-py set theirs up (cookie-free, so
registries such as Harbor do not mistake us for a browser), auth by :class:`remora.registry.auth.Authenticator`
(the sync shell of the I/O-free :mod:`remora.registry.authcore` the peer shares: challenges, scopes,
per-scope bearer tokens), and what generic clients lack, written here: range reads, cross-repository
mounts, uploads from any path with constant memory, bounded retries, and errors mapped onto
:mod:`remora.errors` so a command never shows a traceback.

Retries: idempotent requests (GET, HEAD, manifest PUT) are retried on 5xx, 429 and connection
failures with exponential backoff; a blob upload is retried as a whole (new upload session), since an
upload session is not idempotent. Nothing is retried on 4xx: those are answers, not failures.

Integrity: manifests are checked against the digest they were asked by (and against the registry's
``Docker-Content-Digest``); blob bodies are returned as streams that the caller wraps in a verifying
reader, because only the caller knows when the stream is complete.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from http.cookiejar import DefaultCookiePolicy
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from remora import __version__
from remora.errors import (
    AuthError,
    DigestMismatch,
    InvalidInput,
    NotFound,
    RegistryError,
    RemoraError,
    StorageError,
    UnsupportedMediaType,
    UsageError,
)
from remora.registry.auth import Authenticator, Credentials, is_loopback, load_credentials
from remora.registry.authcore import repository_scope
from remora.registry.manifestcheck import DIGEST_RE as _DIGEST_RE
from remora.registry.manifestcheck import MAX_MANIFEST_SIZE, check_declared_length, check_manifest
from remora.registry.manifestcheck import hash_digest as _hash

log = logging.getLogger(__name__)

DEFAULT_USER_AGENT = f"remora/{__version__}"  # not importlib.metadata: ~20 ms at every process start

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
DOCKER_SCHEMA1_PREFIX = "application/vnd.docker.distribution.manifest.v1+"

DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry.hub.docker.com"}
DOCKER_HUB_API = "registry-1.docker.io"

#: Pieces a streamed range read is handed over in (~20 ms of a 100 Mbit/s link).
STREAM_BLOCK = 256 * 1024
#: Blobs up to this size go up in one PUT; larger ones in PATCH chunks of CHUNK_SIZE.
MONOLITHIC_LIMIT = 64 * 1024 * 1024
CHUNK_SIZE = 32 * 1024 * 1024
#: A registry that ignores Range and answers 200 with the whole blob: we read and discard at most this
#: much to serve the range, beyond it we fail instead of silently downloading a huge blob per read.
MAX_RANGE_FALLBACK = 64 * 1024 * 1024
MAX_RETRY_AFTER = 10.0

_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_RETRYABLE_STATUS = {429, 500, 502, 503, 504}
_IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE"}


class TransientRegistryError(RegistryError):
    """A failure that may pass on retry: 5xx, 429, connection refused/reset, timeout."""


def _check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise InvalidInput(f"not a valid digest: {digest!r} (want sha256:<64 hex>)")
    return digest


def _check_repo(repo: str) -> str:
    if not isinstance(repo, str) or len(repo) > 255 or not _REPO_RE.match(repo):
        raise UsageError(f"not a valid repository name: {repo!r} (lowercase letters, digits, '.', '_', '-', '/')")
    return repo


def _check_reference(reference: str) -> str:
    if isinstance(reference, str) and (_TAG_RE.match(reference) or _DIGEST_RE.match(reference)):
        return reference
    raise UsageError(f"not a valid tag or digest: {reference!r}")


def _media_type(resp: requests.Response) -> str:
    return resp.headers.get("Content-Type", "").split(";", 1)[0].strip()


def _add_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


class _TimeoutAdapter(HTTPAdapter):
    """Gives every request on the session a timeout, including those oras-py code makes itself."""

    def __init__(self, timeout: float, **kw):
        self._timeout = timeout
        super().__init__(**kw)

    def send(self, request, timeout=None, **kw):
        return super().send(request, timeout=timeout if timeout is not None else self._timeout, **kw)


class _FileSlice:
    """``length`` bytes of an open file from ``offset``, read in small pieces by requests.

    Having ``__len__`` makes requests send a Content-Length and stream the body, so an upload of any
    size uses constant memory.
    """

    def __init__(self, f: BinaryIO, offset: int, length: int):
        self._f, self._offset, self._length, self._pos = f, offset, length, 0
        f.seek(offset)

    def __len__(self) -> int:
        return self._length - self._pos

    def read(self, n: int = -1) -> bytes:
        left = self._length - self._pos
        if left <= 0:
            return b""
        n = left if n is None or n < 0 else min(n, left)
        data = self._f.read(min(n, 1024 * 1024))
        if not data and left:
            raise InvalidInput(f"file shrank while uploading (expected {self._length} bytes from offset "
                               f"{self._offset})")
        self._pos += len(data)
        return data


class BlobStream:
    """A blob body being downloaded: ``read(n)``, ``close()``, usable as a context manager.

    Reads the raw bytes (we ask for ``Accept-Encoding: identity``), so what you hash is what the
    registry stored. A connection lost mid-body raises :class:`RegistryError`, never a short read that
    looks like the end, when the registry announced a length.
    """

    def __init__(self, response: requests.Response, what: str):
        self._resp = response
        self._what = what
        length = response.headers.get("Content-Length", "")
        self.size: int | None = int(length) if length.isdigit() else None
        self.url = response.url
        self._read = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._resp.raw.read(None if n is None or n < 0 else n, decode_content=False)
        except Exception as exc:  # noqa: BLE001 - urllib3 ProtocolError / ReadTimeoutError / IncompleteRead
            raise RegistryError(f"{self._what}: connection lost after {self._read} bytes: {exc}") from None
        self._read += len(data)
        if not data and self.size is not None and self._read < self.size and n != 0:
            raise RegistryError(f"{self._what}: stream ended after {self._read} of {self.size} bytes")
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._resp.close()

    @property
    def closed(self) -> bool:
        return self._resp.raw.closed

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RegistryClient:
    """One registry host: ``RegistryClient("127.0.0.1:5000").get_manifest("library/debian", "12")``.

    ``plain_http`` None picks plain HTTP only for loopback hosts (where the embedded registry and test
    registries live) and HTTPS for everything else; True is the ``--plain-http`` flag. ``credentials``
    None means "find them" (:func:`remora.registry.auth.load_credentials`, looked up lazily on the first
    auth challenge); pass :class:`Credentials` or a ``(username, password)`` tuple to force them.
    ``retries`` is how many times a failing idempotent request is retried; ``backoff`` the first delay.
    Safe to share between threads for independent requests.
    """

    def __init__(self, host: str, *, plain_http: bool | None = None,
                 credentials: Credentials | tuple[str, str] | None = None, timeout: float = 30.0,
                 retries: int = 3, user_agent: str = DEFAULT_USER_AGENT, backoff: float = 0.25,
                 docker_config: str | os.PathLike | None = None):
        host = host.strip().rstrip("/")
        if not host or "/" in host or "://" in host:
            raise UsageError(f"registry host must be host[:port], got {host!r}")
        self.host = host
        self.plain_http = is_loopback(host) if plain_http is None else bool(plain_http)
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        # Docker Hub is named docker.io (and its credentials are stored under that name) but serves
        # the API from registry-1.docker.io.
        api_host = DOCKER_HUB_API if host in DOCKER_HUB_ALIASES else host
        self.base_url = f"{'http' if self.plain_http else 'https'}://{api_host}"
        # Cookies ignored, as oras-py does: a registry that sets one may take us for a browser and
        # start asking for CSRF tokens (Harbor).
        self.session = requests.Session()
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        adapter = _TimeoutAdapter(timeout, pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = user_agent
        if isinstance(credentials, tuple):
            credentials = Credentials(username=credentials[0], password=credentials[1], source="--username")

        def loader() -> Credentials | None:
            return credentials if credentials is not None else load_credentials(host, docker_config)

        self.auth = Authenticator(host, self.session, loader=loader, timeout=timeout,
                                  allow_plain_http=bool(plain_http), docker_config=docker_config)

    def __repr__(self) -> str:
        return f"RegistryClient({self.base_url})"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- transport

    def _url(self, path: str) -> str:
        return f"{self.base_url}/v2/{path}"

    def _sleep_before_retry(self, attempt: int, resp: requests.Response | None) -> None:
        delay = self.backoff * (2 ** attempt) * (0.5 + random.random() / 2)
        if resp is not None and resp.headers.get("Retry-After", "").isdigit():
            delay = min(float(resp.headers["Retry-After"]), MAX_RETRY_AFTER)
        time.sleep(delay)

    def _send(self, method: str, url: str, *, scope: str | None, headers: dict | None = None,
              body: Callable[[], Any] | None = None, stream: bool = False) -> requests.Response:
        """One request with auth: sends known credentials up front, answers one 401 challenge."""
        hdrs = dict(headers or {})
        hdrs.update(self.auth.header_for(scope))
        try:
            resp = self.session.request(method, url, headers=hdrs, data=body() if body else None,
                                        stream=stream)
            if resp.status_code == 401:
                retry_headers = self.auth.answer(resp, scope, hdrs)
                if retry_headers is not None:
                    resp.close()
                    hdrs.update(retry_headers)
                    resp = self.session.request(method, url, headers=hdrs, data=body() if body else None,
                                                stream=stream)
        except requests.exceptions.SSLError as exc:
            hint = "; if it serves plain HTTP, pass --plain-http" if not self.plain_http else ""
            raise RegistryError(f"registry {self.host}: TLS failed: {exc}{hint}") from None
        except requests.Timeout as exc:
            raise TransientRegistryError(f"registry {self.host} timed out ({self.timeout:g}s): {method} "
                                         f"{urlsplit(url).path}: {exc}") from None
        except requests.RequestException as exc:
            raise TransientRegistryError(f"registry {self.host} unreachable: {exc}") from None
        return resp

    def _request(self, method: str, url: str, *, scope: str | None, what: str, ok=(200,),
                 not_found: str | None = None, headers: dict | None = None,
                 body: Callable[[], object] | None = None, stream: bool = False, retry: bool | None = None
                 ) -> requests.Response:
        """A request whose status is checked; retried with backoff when idempotent (or ``retry``).

        Returns the response for a status in ``ok``; 404 returns it too when ``not_found`` is None
        (the caller handles "absent"), else raises :class:`NotFound` with that text. Everything else
        raises the matching :mod:`remora.errors` exception.
        """
        retry = method in _IDEMPOTENT if retry is None else retry
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                resp = self._send(method, url, scope=scope, headers=headers, body=body, stream=stream)
            except TransientRegistryError:
                if last:
                    raise
                log.info("%s: %s %s failed, retrying", self.host, method, urlsplit(url).path)
                self._sleep_before_retry(attempt, None)
                continue
            if resp.status_code in ok:
                return resp
            if resp.status_code in _RETRYABLE_STATUS and not last:
                log.info("%s: %s %s -> HTTP %d, retrying", self.host, method, urlsplit(url).path, resp.status_code)
                resp.close()
                self._sleep_before_retry(attempt, resp)
                continue
            self._raise_for(resp, what, not_found, attempts)
            return resp  # 404 with not_found None
        raise AssertionError("unreachable")

    def _raise_for(self, resp: requests.Response, what: str, not_found: str | None, attempts: int) -> None:
        status = resp.status_code
        detail = self._error_detail(resp)
        if status == 404 and not_found is None:
            return
        resp.close()
        if status == 404:
            raise NotFound(f"{not_found} (registry {self.host}{detail})")
        if status == 401 and 'error="insufficient_scope"' in resp.headers.get("WWW-Authenticate", ""):
            creds = self.auth.credentials
            who = f"user {creds.username!r}" if creds and creds.username else "anonymous access"
            raise AuthError(f"registry {self.host}: {who} was denied {what} (insufficient scope{detail}); "
                            f"ask for access, or log in as another user (`docker login {self.host}`, --username)")
        if status in (401, 403):
            verb = "refused access" if status == 403 else "requires authentication"
            raise AuthError(f"registry {self.host} {verb} for {what} (HTTP {status}{detail}): "
                            f"{self.auth.describe_credentials()}")
        if status >= 500 or status == 429:
            tries = f" after {attempts} attempts" if attempts > 1 else ""
            raise TransientRegistryError(f"registry {self.host} failed {what}: HTTP {status}{tries}{detail}")
        if status == 416:
            raise InvalidInput(f"registry {self.host}: range not satisfiable for {what}{detail}")
        raise RegistryError(f"registry {self.host} rejected {what}: HTTP {status}{detail}")

    @staticmethod
    def _error_detail(resp: requests.Response) -> str:
        """The OCI error codes and messages of an error body, briefly (never the whole body)."""
        if resp.request is not None and resp.request.method == "HEAD":
            return ""
        try:
            if getattr(resp, "_content", False) is not False:  # already read (not a streamed request)
                raw = resp.content[:64 * 1024]
            else:
                raw = resp.raw.read(64 * 1024, decode_content=True) if resp.raw is not None else b""
            errors = json.loads(raw or b"{}").get("errors") or []
            msgs = [f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors if isinstance(e, dict)]
        except Exception:  # noqa: BLE001 - an error body is a courtesy: any failure reading it means none
            return ""
        return f"; {'; '.join(msgs)[:300]}" if msgs else ""

    @staticmethod
    def _pull(repo: str) -> str:
        return repository_scope(repo, ("pull",))

    @staticmethod
    def _push(repo: str) -> str:
        return repository_scope(repo, ("pull", "push"))

    # ---------------------------------------------------------------- manifests

    def get_manifest(self, repo: str, reference: str, accept: list[str] | tuple[str, ...] | str | None = None
                     ) -> tuple[bytes, str, str]:
        """``(bytes, media_type, digest)`` of a manifest or index, by tag or digest.

        The digest is computed from the bytes; when ``reference`` is a digest, or the registry sends
        ``Docker-Content-Digest``, a mismatch raises :class:`DigestMismatch`. Bodies over 4 MiB raise
        :class:`InvalidInput` (the limit containerd and distribution use).
        """
        _check_repo(repo), _check_reference(reference)
        if accept is None:
            accept = MANIFEST_MEDIA_TYPES
        accept_header = accept if isinstance(accept, str) else ", ".join(accept)
        what = f"manifest {repo}:{reference}" if ":" not in reference else f"manifest {repo}@{reference}"
        resp = self._request("GET", self._url(f"{repo}/manifests/{reference}"), scope=self._pull(repo), what=what,
                             not_found=f"{what} not found", headers={"Accept": accept_header}, stream=True)
        with resp:
            check_declared_length(resp.headers.get("Content-Length"), what)
            chunks, got = [], 0
            try:
                for chunk in resp.iter_content(256 * 1024):
                    chunks.append(chunk)
                    got += len(chunk)
                    if got > MAX_MANIFEST_SIZE:
                        raise InvalidInput(f"{what} is over the {MAX_MANIFEST_SIZE} byte limit")
            except requests.RequestException as exc:
                raise RegistryError(f"registry {self.host}: connection lost reading {what}: {exc}") from None
            data = b"".join(chunks)
            media_type = _media_type(resp)
            header_digest = resp.headers.get("Docker-Content-Digest", "")
        if media_type.startswith(DOCKER_SCHEMA1_PREFIX):
            raise UnsupportedMediaType(f"{what} is a Docker schema 1 manifest ({media_type}), deprecated since 2017 "
                                       f"and not supported; re-push the image with a current Docker or skopeo")
        digest = check_manifest(data, reference, header_digest, what)
        if media_type not in MANIFEST_MEDIA_TYPES:
            # Some registries answer application/json or nothing; the manifest says what it is.
            try:
                declared = json.loads(data).get("mediaType")
            except (ValueError, AttributeError, RecursionError):
                declared = None
            if isinstance(declared, str) and declared:
                media_type = declared
        return data, media_type, digest

    def head_manifest(self, repo: str, reference: str) -> tuple[str, str, int] | None:
        """``(digest, media_type, size)`` of a manifest, or None when it does not exist."""
        _check_repo(repo), _check_reference(reference)
        what = f"manifest {repo}:{reference}"
        resp = self._request("HEAD", self._url(f"{repo}/manifests/{reference}"), scope=self._pull(repo), what=what,
                             headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)})
        resp.close()
        if resp.status_code == 404:
            return None
        digest = resp.headers.get("Docker-Content-Digest", "")
        size = resp.headers.get("Content-Length", "")
        if not _DIGEST_RE.match(digest) or not size.isdigit():
            # Registries may omit the digest on HEAD; the body tells us for certain.
            data, media_type, digest = self.get_manifest(repo, reference)
            return digest, media_type, len(data)
        if _DIGEST_RE.match(reference) and digest != reference:
            raise DigestMismatch(what, reference, digest)
        return digest, _media_type(resp), int(size)

    def push_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or its digest; returns its sha256 digest."""
        _check_repo(repo), _check_reference(reference)
        if len(data) > MAX_MANIFEST_SIZE:
            raise InvalidInput(f"manifest for {repo}:{reference} is {len(data)} bytes, over the "
                               f"{MAX_MANIFEST_SIZE} byte limit")
        digest = _hash(data)
        if _DIGEST_RE.match(reference) and _hash(data, reference.split(":", 1)[0]) != reference:
            raise DigestMismatch(f"manifest pushed as {repo}@{reference}", reference, digest)
        what = f"push of manifest {repo}:{reference}"
        resp = self._request("PUT", self._url(f"{repo}/manifests/{reference}"), scope=self._push(repo), what=what,
                             ok=(200, 201), not_found=f"{what}: repository or referenced blob not found",
                             headers={"Content-Type": media_type}, body=lambda: data)
        resp.close()
        returned = resp.headers.get("Docker-Content-Digest", "")
        if returned.startswith("sha256:") and returned != digest:
            raise DigestMismatch(f"{what} (registry's Docker-Content-Digest)", digest, returned)
        return digest

    def list_tags(self, repo: str) -> list[str]:
        """Every tag of ``repo`` (following ``Link`` pagination); NotFound if the repository is unknown."""
        _check_repo(repo)
        url: str | None = self._url(f"{repo}/tags/list")
        tags: list[str] = []
        seen: set[str] = set()
        while url and url not in seen:
            seen.add(url)
            resp = self._request("GET", url, scope=self._pull(repo), what=f"tag list of {repo}",
                                 not_found=f"repository {repo} not found")
            try:
                page = resp.json().get("tags") or []
            except (ValueError, AttributeError):
                raise RegistryError(f"registry {self.host} returned a malformed tag list for {repo}") from None
            tags.extend(t for t in page if isinstance(t, str))
            link = resp.links.get("next", {}).get("url")
            url = urljoin(self.base_url, link) if link else None
        return tags

    # ---------------------------------------------------------------- blobs, reading

    def head_blob(self, repo: str, digest: str) -> int | None:
        """The blob's size, or None when the repository does not have it."""
        _check_repo(repo), _check_digest(digest)
        resp = self._request("HEAD", self._url(f"{repo}/blobs/{digest}"), scope=self._pull(repo),
                             what=f"blob {digest} in {repo}")
        resp.close()
        if resp.status_code == 404:
            return None
        size = resp.headers.get("Content-Length", "")
        if not size.isdigit():
            raise RegistryError(f"registry {self.host} sent no Content-Length for blob {digest} in {repo}")
        return int(size)

    def open_blob(self, repo: str, digest: str) -> BlobStream:
        """A stream of the blob's bytes (redirects followed). Verify them: the stream does not."""
        _check_repo(repo), _check_digest(digest)
        what = f"blob {digest} in {repo}"
        resp = self._request("GET", self._url(f"{repo}/blobs/{digest}"), scope=self._pull(repo), what=what,
                             not_found=f"{what} not found", headers={"Accept-Encoding": "identity"}, stream=True)
        returned = resp.headers.get("Docker-Content-Digest", "")
        if _DIGEST_RE.match(returned) and returned.split(":")[0] == digest.split(":")[0] and returned != digest:
            resp.close()
            raise DigestMismatch(f"{what} (registry's Docker-Content-Digest)", digest, returned)
        return BlobStream(resp, what)

    def get_blob_range(self, repo: str, digest: str, start: int, end_inclusive: int | None,
                       sink: Callable[[bytes], None] | None = None) -> bytes | int:
        """Bytes ``start..end_inclusive`` of a blob (``end_inclusive`` None: to the end) via HTTP Range.
        Like a file read, a range reaching past the end returns the bytes up to the end; a range that
        starts past the end raises :class:`InvalidInput`.

        With ``sink``, the body is handed over as it arrives (consecutive pieces of at most
        :data:`STREAM_BLOCK` bytes) and the byte count is returned: a caller cutting a large range into
        frames can use the first ones while the rest is still on the wire. An error raised after some
        pieces were delivered means the range is incomplete, not that the delivered bytes are wrong.

        A 206 must carry a Content-Range matching the request and exactly that many bytes. A registry
        that ignores Range (200 with the full body) is served by slicing, unless that would mean
        downloading more than 64 MiB for this one read, then :class:`RegistryError`.
        """
        _check_repo(repo), _check_digest(digest)
        if start < 0 or (end_inclusive is not None and end_inclusive < start):
            raise UsageError(f"invalid byte range {start}-{end_inclusive}")
        rng = f"bytes={start}-{'' if end_inclusive is None else end_inclusive}"
        what = f"blob {digest} in {repo} ({rng})"
        resp = self._request("GET", self._url(f"{repo}/blobs/{digest}"), scope=self._pull(repo), what=what,
                             ok=(200, 206), not_found=f"blob {digest} in {repo} not found",
                             headers={"Range": rng, "Accept-Encoding": "identity"}, stream=True)
        with resp:
            if resp.status_code == 206:
                m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", "").strip())
                if not m:
                    raise RegistryError(f"registry {self.host} answered {what} with 206 but a bad Content-Range "
                                        f"{resp.headers.get('Content-Range')!r}")
                got_start, got_end = int(m.group(1)), int(m.group(2))
                total = int(m.group(3)) if m.group(3) != "*" else None
                want_end = got_end if end_inclusive is None else end_inclusive
                if want_end > got_end and total is not None and got_end == total - 1:
                    want_end = got_end  # a range past the end is clamped to the blob (RFC 9110 14.1.2)
                if got_start != start or got_end != want_end:
                    raise RegistryError(f"registry {self.host} answered {what} with Content-Range "
                                        f"{resp.headers['Content-Range']}")
                length = got_end - got_start + 1
                got = self._read_exact(resp, length, what, sink)
                if sink is not None:
                    return got
                data = cast(bytes, got)
            else:
                size = resp.headers.get("Content-Length", "")
                needed = None if end_inclusive is None else end_inclusive + 1
                if needed is None and not size.isdigit():
                    raise RegistryError(f"registry {self.host} ignored the Range of {what} and sent no length")
                total = int(size) if size.isdigit() else None
                if total is not None and start >= total:
                    raise InvalidInput(f"registry {self.host}: range not satisfiable for {what} "
                                       f"(blob is {total} bytes)")
                needed = total if needed is None else (min(needed, total) if total is not None else needed)
                assert needed is not None  # one of the two is known (checked above)
                if needed > MAX_RANGE_FALLBACK:
                    raise RegistryError(f"registry {self.host} ignores HTTP Range requests ({what} answered with "
                                        f"the full blob); refusing to download {needed} bytes for one range read")
                data = cast(bytes, self._read_exact(resp, needed, what))[start:]
                length = needed - start
        if len(data) != length:
            raise RegistryError(f"registry {self.host} sent {len(data)} bytes for {what}, expected {length}")
        if sink is not None:
            sink(data)
            return len(data)
        return data

    def _read_exact(self, resp: requests.Response, n: int, what: str,
                    sink: Callable[[bytes], None] | None = None) -> bytes | int:
        """Exactly ``n`` body bytes (joined, or handed to ``sink`` as they come: then the count)."""
        chunks, got = [], 0
        block = STREAM_BLOCK if sink is not None else 1024 * 1024
        try:
            while got < n:
                c = resp.raw.read(min(n - got, block), decode_content=False)
                if not c:
                    break
                got += len(c)
                if sink is not None:
                    sink(c)
                else:
                    chunks.append(c)
        except RemoraError:
            raise  # from the sink: its own verdict on the bytes
        except Exception as exc:  # noqa: BLE001 - urllib3's many read errors: all mean the connection is gone
            raise RegistryError(f"registry {self.host}: connection lost reading {what}: {exc}") from None
        if got < n:
            raise RegistryError(f"registry {self.host}: {what} ended after {got} of {n} bytes")
        return got if sink is not None else b"".join(chunks)

    # ---------------------------------------------------------------- blobs, writing

    def _location(self, resp: requests.Response, what: str) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RegistryError(f"registry {self.host} sent no Location for {what}")
        return urljoin(self.base_url + "/", loc)

    def _cancel_upload(self, location: str, repo: str) -> None:
        """Best effort: leave no dangling upload session (they hold space until purged)."""
        try:
            self._send("DELETE", location, scope=self._push(repo)).close()
        except RegistryError:
            pass

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount of ``digest`` from ``from_repo``; False when the registry would not."""
        _check_repo(repo), _check_repo(from_repo), _check_digest(digest)
        what = f"mount of blob {digest} from {from_repo} into {repo}"
        url = self._url(f"{repo}/blobs/uploads/") + "?" + urlencode({"mount": digest, "from": from_repo})
        scope = f"{self._push(repo)} {self._pull(from_repo)}"
        resp = self._request("POST", url, scope=scope, what=what, ok=(201, 202), not_found=f"{what}: not found",
                             retry=True)
        resp.close()
        if resp.status_code == 202:
            self._cancel_upload(self._location(resp, what), repo)
            return False
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise DigestMismatch(what, digest, returned)
        return True

    def push_blob(self, repo: str, digest: str, size: int, path: str | os.PathLike) -> bool:
        """Upload the file at ``path`` as blob ``digest``; False when the registry already had it.

        The file is streamed (one PUT up to 64 MiB, PATCH chunks above) in constant memory; the
        registry verifies the digest and we check the digest it reports. A transient failure restarts
        the upload in a new session, up to ``retries`` times.
        """
        _check_repo(repo), _check_digest(digest)
        try:
            actual_size = os.stat(path).st_size
        except OSError as exc:
            raise StorageError(f"cannot read blob file {path}: {exc.strerror}") from None
        if actual_size != size:
            raise InvalidInput(f"blob file {path} is {actual_size} bytes, expected {size} for {digest}")
        if self.head_blob(repo, digest) is not None:
            return False
        for attempt in range(self.retries + 1):
            try:
                self._upload(repo, digest, size, path)
                return True
            except TransientRegistryError as exc:
                if attempt == self.retries:
                    raise
                log.info("%s: upload of %s failed (%s), retrying", self.host, digest, exc)
                self._sleep_before_retry(attempt, None)
        raise AssertionError("unreachable")

    def _upload(self, repo: str, digest: str, size: int, path: str | os.PathLike) -> None:
        what = f"upload of blob {digest} to {repo}"
        scope = self._push(repo)
        resp = self._request("POST", self._url(f"{repo}/blobs/uploads/"), scope=scope, what=what, ok=(202,),
                             not_found=f"{what}: repository not found", retry=False)
        resp.close()
        location = self._location(resp, what)
        try:
            with open(path, "rb") as f:
                if size <= MONOLITHIC_LIMIT:
                    resp = self._request("PUT", _add_query(location, digest=digest), scope=scope, what=what,
                                         ok=(201,), not_found=f"{what}: upload session lost", retry=False,
                                         headers={"Content-Type": "application/octet-stream"},
                                         body=lambda: _FileSlice(f, 0, size))
                else:
                    offset = 0
                    while offset < size:
                        n = min(CHUNK_SIZE, size - offset)
                        resp = self._request(
                            "PATCH", location, scope=scope, what=what, ok=(202,), retry=False,
                            not_found=f"{what}: upload session lost",
                            headers={"Content-Type": "application/octet-stream",
                                     "Content-Range": f"{offset}-{offset + n - 1}"},
                            body=functools.partial(_FileSlice, f, offset, n))
                        resp.close()
                        location = self._location(resp, what)
                        offset += n
                    resp = self._request("PUT", _add_query(location, digest=digest), scope=scope, what=what,
                                         ok=(201,), not_found=f"{what}: upload session lost", retry=False)
        except OSError as exc:
            self._cancel_upload(location, repo)
            raise StorageError(f"cannot read blob file {path}: {exc.strerror or exc}") from None
        except RemoraError as exc:
            self._cancel_upload(location, repo)
            if isinstance(exc, RegistryError) and "DIGEST_INVALID" in str(exc):
                raise InvalidInput(f"registry {self.host} rejected blob {digest}: the content of {path} does not "
                                   f"match that digest") from None
            raise
        resp.close()
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise DigestMismatch(what, digest, returned)
