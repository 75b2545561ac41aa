"""The mirror API: the pull side of the OCI distribution API, as containerd's hosts.toml mirror.

* ``GET/HEAD /v2/<name>/manifests/<ref>`` is passed through to the registry (with this node's
  credentials) and digest-checked: by digest, the body must hash to it; by tag, it must hash to the
  ``Docker-Content-Digest`` the registry claims.
* ``GET/HEAD /v2/<name>/blobs/<digest>`` comes from the piece mesh (:mod:`.download`). A whole-blob GET
  (and an open-ended ``bytes=N-``, which is containerd resuming a whole blob) is answered only once the
  complete blob matched its digest; a bounded ``Range`` (the snapshotter's lazy reads) fetches only the
  pieces covering it, each verified against its piece digest. Before any byte goes out, the pieces of the
answer are hashed again against their recorded digests: a piece damaged on disk since it was verified is
dropped and fetched again, never served (:meth:`Mirror._recheck`).

The registry is the one containerd names with ``?ns=<host>``, else the ``X-Remora-Upstream`` header,
else ``--upstream``. Failures are answered fast and never as a 200: 404 when the registry has no such
thing, 502/504 otherwise, so containerd moves on to the next host in hosts.toml (the registry itself).

**The registry unreachable** (connection refused, timeout, 5xx: :class:`.upstream.RegistryUnreachable`;
a 401/403/404 is the registry's answer and is passed on): a manifest comes from the copy the peer keeps
(:mod:`.offline`: preheats and every manifest passed through keep one), by digest always, by tag only
from a record younger than ``--offline-tag-max-age``, with ``X-Remora-Offline`` and a log line saying so
and ``remora_peer_offline_manifests_total`` counting it (or why there was none). Blobs come from the
store as always. Who may read them then is still the access checker's decision (below).

Authorization (:mod:`.access`): the node's credentials fetch, they never authorize. Every manifest and
blob request, whether or not the bytes are already here, is first checked against the registry with the
*client's* ``Authorization`` (none: anonymous). Refused, the mirror answers the registry's own status
and ``WWW-Authenticate`` challenge: containerd (and the snapshotter's lazy reads) then get a token from
the real registry's realm, or send Basic credentials, and retry with them, which the mirror checks the
same way. The grant is handed to the blob's task, which shows it to the parents it fetches pieces from.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re

from aiohttp import web

from remora.errors import AuthError, InvalidInput, NotFound, RegistryError, RemoraError, StorageError

from .access import MANIFEST_ACCEPT, AccessDenied
from .access import REPO_RE as _REPO_RE
from .download import Source, TaskManager
from .metrics import PeerMetrics
from .pieces import BlobEntry, check_digest, send_file
from .upstream import RegistryUnreachable

log = logging.getLogger(__name__)

UPSTREAM_HEADER = "X-Remora-Upstream"
#: Set on a manifest answered from the kept copy while the registry is unreachable (offline.py):
#: ``kept; by-digest`` or ``stale-while-offline; age=<seconds since the registry confirmed the tag>``.
OFFLINE_HEADER = "X-Remora-Offline"
_REF_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|sha256:[a-f0-9]{64})$")
# ASCII digits only, at most 19 (a 63-bit offset): int() of thousands of digits raised ValueError (a 500
# with a traceback) and \d also matched other scripts' digits.
_RANGE_RE = re.compile(r"^bytes=([0-9]{0,19})-([0-9]{0,19})$", re.ASCII)


def _error(status: int, code: str, message: str, head: bool = False) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return web.Response(status=status, body=None if head else body, content_type="application/json",
                        headers={"Docker-Distribution-API-Version": "registry/2.0"})


class Mirror:
    def __init__(self, tasks: TaskManager, metrics: PeerMetrics, default_upstream: str, status_cb=None):
        self.tasks = tasks
        self.upstream = tasks.upstream
        self.metrics = metrics
        self.default_upstream = default_upstream
        self.status_cb = status_cb

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_route("GET", "/v2/", self.ping)
        r.add_route("HEAD", "/v2/", self.ping)
        r.add_route("GET", "/v2/{name:.+}/manifests/{ref}", self.manifest)
        r.add_route("HEAD", "/v2/{name:.+}/manifests/{ref}", self.manifest)
        r.add_route("GET", "/v2/{name:.+}/blobs/{digest}", self.blob)
        r.add_route("HEAD", "/v2/{name:.+}/blobs/{digest}", self.blob)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/healthz", healthz)
        r.add_get("/_remora/status", self.status)
        return app

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status_cb() if self.status_cb else {})

    # -- helpers --------------------------------------------------------------------------------------
    def _registry(self, request: web.Request) -> str:
        registry = request.query.get("ns") or request.headers.get(UPSTREAM_HEADER) or self.default_upstream
        if not registry:
            raise RegistryError("no upstream registry: containerd sends ?ns=<registry> with hosts.toml; "
                                f"otherwise send the {UPSTREAM_HEADER} header or start the peer with --upstream")
        if not re.match(r"^[A-Za-z0-9.-]+(:[0-9]+)?$|^\[[0-9a-fA-F:]+\](:[0-9]+)?$", registry):
            raise InvalidInput(f"bad upstream registry {registry!r}")
        return registry

    def _respond_error(self, kind: str, exc: Exception, head: bool) -> web.Response:
        if isinstance(exc, AccessDenied):
            # The registry's answer to this client, challenge included: containerd and the snapshotter do
            # the auth dance with the registry's realm and come back with credentials.
            status = exc.status if exc.status in (401, 403) else 401
            self.metrics.requests.labels(kind, str(status)).inc()
            log.info("%s: %d %s", kind, status, exc)
            resp = _error(status, "UNAUTHORIZED" if status == 401 else "DENIED", str(exc), head)
            if exc.challenge:
                resp.headers["WWW-Authenticate"] = exc.challenge
            return resp
        if isinstance(exc, NotFound):
            status, code = 404, "BLOB_UNKNOWN" if kind == "blob" else "MANIFEST_UNKNOWN"
        elif isinstance(exc, asyncio.TimeoutError):
            status, code = 504, "UNAVAILABLE"
        elif isinstance(exc, StorageError):
            status, code = 500, "UNKNOWN"
        elif isinstance(exc, (AuthError, RegistryError, InvalidInput)):
            # Never 401 to containerd: it would try to log in to the mirror. 502 = use the next host.
            status, code = 502, "UNAVAILABLE"
        else:
            log.exception("%s request failed", kind)
            status, code = 500, "UNKNOWN"
        log.info("%s: %d %s", kind, status, exc)
        self.metrics.requests.labels(kind, str(status)).inc()
        return _error(status, code, str(exc) or type(exc).__name__, head)

    # -- manifests ------------------------------------------------------------------------------------
    async def manifest(self, request: web.Request) -> web.Response:
        head = request.method == "HEAD"
        name, ref = request.match_info["name"], request.match_info["ref"]
        try:
            if not _REPO_RE.match(name) or not _REF_RE.match(ref):
                raise NotFound(f"bad repository or reference {name}:{ref}")
            registry = self._registry(request)
            # Registry up or down, the requester must be let in first (access.py: offline, only what the
            # registry let this requester read before).
            try:
                await self.tasks.access.check(registry, name, "manifest", ref, request.headers.get("Authorization"))
            except RegistryError:
                # No answer from the registry, and nothing it said before lets this requester read this
                # manifest (access.py logged which): counted with the other offline misses.
                self.metrics.offline.labels("digest" if ref.startswith("sha256:") else "tag",
                                            "access_unconfirmed").inc()
                raise
            extra: dict[str, str] = {}
            try:
                body, content_type, actual = await self._manifest_from_registry(request, registry, name, ref)
            except (TimeoutError, RegistryUnreachable) as exc:
                # No answer that decides anything: the kept copy (offline.py), never past the tag max age.
                body, content_type, actual, extra = await self._kept_manifest(registry, name, ref, exc)
        except (TimeoutError, RemoraError) as exc:
            return self._respond_error("manifest", exc, head)
        self.metrics.requests.labels("manifest", "200").inc()
        return web.Response(body=None if head else body, headers={
            "Content-Type": content_type, "Docker-Content-Digest": actual, "Content-Length": str(len(body)),
            "Docker-Distribution-API-Version": "registry/2.0", **extra})

    async def _manifest_from_registry(self, request: web.Request, registry: str, name: str,
                                      ref: str) -> tuple[bytes, str, str]:
        """Pass the manifest through from the registry, digest-checked, and refresh the kept record."""
        accept = request.headers.get("Accept") or MANIFEST_ACCEPT
        body, content_type, actual = await self.upstream.manifest(registry, name, ref, accept)
        try:
            await asyncio.to_thread(self.tasks.kept.keep, registry, name, ref, body, content_type)
        except (OSError, ValueError) as exc:   # keeping is a bonus: the answer stands
            log.warning("manifest %s:%s: not kept for offline use: %s", name, ref, exc)
        return body, content_type, actual

    async def _kept_manifest(self, registry: str, name: str, ref: str,
                             cause: Exception) -> tuple[bytes, str, str, dict[str, str]]:
        """The kept copy while the registry is unreachable (``cause``); else the cause is raised again.
        Counted (``remora_peer_offline_manifests_total``) and logged either way."""
        by = "digest" if ref.startswith("sha256:") else "tag"
        kept = await asyncio.to_thread(self.tasks.kept.get, registry, name, ref)
        if kept is None:
            age = None if by == "digest" else self.tasks.kept.tag_age(registry, name, ref)
            result = "no_copy" if age is None else "too_old"
            self.metrics.offline.labels(by, result).inc()
            log.warning("manifest %s/%s:%s: registry unreachable (%s) and %s", registry, name, ref, cause,
                        "no kept copy" if age is None else
                        f"the kept tag record is {age:.0f} s old (max {self.tasks.kept.tag_max_age:.0f} s)")
            raise cause
        self.metrics.offline.labels(by, "served").inc()
        if kept.age is None:
            extra = {OFFLINE_HEADER: "kept; by-digest"}
            log.warning("manifest %s/%s@%s: registry unreachable (%s): served the kept copy", registry, name,
                        kept.digest[:19], cause)
        else:
            extra = {OFFLINE_HEADER: f"stale-while-offline; age={int(kept.age)}",
                     "Warning": '110 remora "stale: the registry is unreachable"'}
            log.warning("manifest %s/%s:%s: registry unreachable (%s): served stale-while-offline -> %s, "
                        "tag seen %.0f s ago", registry, name, ref, cause, kept.digest[:19], kept.age)
        return kept.body, kept.media_type, kept.digest, extra

    # -- blobs ----------------------------------------------------------------------------------------
    async def blob(self, request: web.Request) -> web.StreamResponse:
        head = request.method == "HEAD"
        name, digest = request.match_info["name"], request.match_info["digest"]
        try:
            if not _REPO_RE.match(name):
                raise NotFound(f"bad repository name {name!r}")
            try:
                check_digest(digest)
            except InvalidInput as exc:
                raise NotFound(str(exc)) from None
            registry = self._registry(request)
            # Whatever is stored here: served only to a client the registry lets read it under ``name``.
            grant = await self.tasks.access.check(registry, name, "blob", digest,
                                                  request.headers.get("Authorization"))
            entry = self.tasks.store.get(digest)
            task = None
            if entry is not None and entry.has_layout and (entry.verified or head):
                size = entry.content_length
            elif head:
                # A HEAD must not open a task: the scheduler would make us the seed of a download that
                # nobody starts. The registry (with our credentials) says whether the blob exists.
                size = await self.tasks.head_blob(digest, [Source(registry, name)])
            else:
                task = self.tasks.task(digest, Source(registry, name), grant)
                try:
                    entry = await task.ensure_layout()
                except (TimeoutError, RemoraError):
                    self.tasks.forget_if_empty(digest)
                    raise
                size = entry.content_length
            span = _parse_range(request.headers.get("Range", ""), size)
            headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest,
                       "Accept-Ranges": "bytes", "Docker-Distribution-API-Version": "registry/2.0"}
            if span == "unsatisfiable":
                self.metrics.requests.labels("blob", "416").inc()
                return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            if head:
                self.metrics.requests.labels("blob", "200").inc()
                return web.Response(headers={**headers, "Content-Length": str(size)})
            start, end, open_ended = span if span else (0, size, True)
            if not entry.verified:
                # Whole blobs (and open-ended ranges: containerd resuming one) only once verified whole;
                # bounded ranges from the pieces that cover them, each checked with its piece digest.
                await task.ensure(None if open_ended else entry.pieces_for_range(start, end))
            entry = await self._recheck(grant, digest, entry, start, end, open_ended)
        except (TimeoutError, RemoraError) as exc:
            return self._respond_error("blob", exc, head)
        status = 206 if span else 200
        if span:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        resp = web.StreamResponse(status=status, headers=headers)
        entry.users += 1
        sent = 0
        try:
            await resp.prepare(request)
            for index in entry.pieces_for_range(start, end):
                p_start, p_end = entry.piece_span(index)
                lo, hi = max(start, p_start) - p_start, min(end, p_end) - p_start
                try:
                    fobj = await asyncio.to_thread(open, entry.piece_path(index), "rb")
                except OSError as exc:
                    raise StorageError(f"{digest}: cannot read piece {index}: {exc.strerror or exc}") from exc
                try:
                    if os.fstat(fobj.fileno()).st_size < hi:
                        raise StorageError(f"{digest}: piece {index} is short on disk")
                    await send_file(request, fobj, lo, hi - lo)  # kernel copy: no Python per byte
                finally:
                    fobj.close()
                sent += hi - lo
            await resp.write_eof()
            self.metrics.requests.labels("blob", str(status)).inc()
        except (ConnectionError, asyncio.CancelledError) as exc:
            # The client went away (containerd cancelled, a lazy reader got enough): nothing to undo,
            # the pieces stay for the next request.
            self.metrics.requests.labels("blob", "aborted").inc()
            log.info("%s: client disconnected after %d of %d bytes", digest[:19], sent, end - start)
            if isinstance(exc, asyncio.CancelledError):
                raise
        except StorageError as exc:
            # Headers are out: the only honest signal left is to cut the connection short.
            log.error("%s: %s; aborting the response", digest, exc)
            self.metrics.requests.labels("blob", "aborted").inc()
            if request.transport is not None:
                request.transport.close()
        finally:
            entry.users -= 1
            self.metrics.served_bytes.labels("range" if span else "blob").inc(sent)
            entry.touch()
        return resp


    async def _recheck(self, grant, digest: str, entry: BlobEntry, start: int, end: int,
                       open_ended: bool) -> BlobEntry:
        """Hash the stored pieces of ``[start, end)`` against their digests before serving them; pieces
        that fail are dropped and fetched again (once), so a damaged store never answers 200/206."""
        span = entry.pieces_for_range(start, end)
        for attempt in range(2):
            bad = await asyncio.to_thread(entry.verify_pieces, span)
            if not bad:
                return entry
            if attempt:
                raise StorageError(f"{digest}: pieces {bad[:8]} still fail verification after a fresh fetch")
            log.error("%s: stored piece(s) %s no longer match their digests: dropped, fetching them again",
                      digest, bad[:8])
            self.metrics.requests.labels("blob", "corrupt_store").inc()
            for index in bad:
                self.tasks.drop_corrupt(digest, index)
            task = self.tasks.task(digest, Source(grant.registry, grant.repository), grant)
            entry = await task.ensure(None if open_ended else span)
        return entry


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def _parse_range(header: str, size: int):
    """``None`` (no/ignored Range), ``"unsatisfiable"``, or ``(start, end_exclusive, open_ended)``."""
    header = header.strip()
    if not header:
        return None
    m = _RANGE_RE.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multi-range or malformed: RFC 9110 lets us ignore it and send the whole blob
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0:
            return "unsatisfiable"
        return max(0, size - n), size, False
    start = int(first)
    if start >= size:
        return "unsatisfiable"
    if not last:
        return start, size, True
    end = min(int(last) + 1, size)
    if end <= start:
        return None
    return start, end, False
