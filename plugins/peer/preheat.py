"""Preheat: the peer fetches an image's blobs into its store ahead of time, on an operator's request.

Why here: a node that already holds every byte of an image, verified, starts it without a single
registry read. The manager's job engine (plugins/manager/jobs.py), ``remora place --preheat`` and
``remora peer preheat`` drive this through a small task API on the mirror listener::

    POST   /api/v1/tasks        {"id", "type": "preheat", "image"?, "repository"?, "blobs"?: [{"digest","size"}],
                                 "priority"?: ["bootstrap","hot"], "all"?: bool, "pull"?: bool}
                                 -> 201 (409: id exists)
    GET    /api/v1/tasks/{id}   -> {"id", "state": queued|running|succeeded|failed|cancelled, "error",
                                    "blobs": [{"digest","size","role","done_bytes","verified_bytes","verified"}],
                                    "pull"?: {"state": pending|running|done|skipped|failed, "name",
                                              "manifest_digest", "remote_layers", "reused_layers", "seconds",
                                              "reason"?, "error"?}}
    DELETE /api/v1/tasks/{id}   -> 204 (404: unknown)

Blobs go through the normal download engine (``TaskManager.task(...).ensure(None)``): P2P from the
mesh first, whole-blob digest verification always. A task succeeds only when every blob it names is
complete and verified in the store; ``verified_bytes`` is the blob's size once verified, else 0 (the
bytes on disk so far are ``done_bytes``).

Order: for a remora image (annotations in remora/format/annotations.py) the bootstrap layer and the hot
blob (the data blob carrying ``remora.prefetch-bytes``) first, then the config (a few KB a pull reads
before the start); the rest only with ``"all": true`` (the
manager's jobs, which name no ``all``, get everything: a job must leave nothing to the registry). For
an OCI image: its config and layers.

Pull (``"pull": true``, remora images, a peer started with ``--runtime-pull-api``): once every blob is
here and verified, the node's remora snapshotter pulls the image into containerd through its pull
service (:mod:`remora.pullapi`, exactly what ``remora pull`` does: manifest, config and bootstrap from
this peer, the layers mounted lazily), into the namespace and containerd the peer was configured with
(``--runtime-namespace``, default ``k8s.io``: the kubelet's) -- a request cannot name another socket or
namespace. Then a kubelet with ``imagePullPolicy: IfNotPresent`` finds the image and starts the container
without a pull: the node is ready, not only warm. The task succeeds only if the pull did; for an OCI
image (nothing for ``remora pull`` to do) the pull is ``skipped`` with the reason. Kubernetes users
know this step as pre-pulling (OpenKruise's ImagePullJob, kube-fledged); here it reads only local bytes.

Manifests: the image's manifests (index and the platform manifest chosen) are kept, digest-checked,
with the tag's answer and when it was seen (:mod:`.offline`), and the registry is asked once whether
anonymous clients may read the image: together they let the node start the image with the registry
unreachable (mirror.py, access.py).

Authentication: preheat makes the node fetch images with *its own* registry credentials, so it is never
anonymous. Every request needs ``Authorization: Bearer <token>`` matching ``--preheat-token-file``;
without that file the API answers 403 (disabled). The image's registry must be one the peer fetches
from (``--upstream``/``--registry``), exactly like the mirror.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass, field

from aiohttp import web

from remora import oci
from remora.errors import InvalidInput, RemoraError
from remora.format import annotations as ann
from remora.pullapi import NoService, pull_via_service
from remora.taskapi import PreheatClient, load_token, new_task_id, progress_of, read_token  # noqa: F401 - the task API's client side lives in the core

from .access import AccessDenied, Grant
from .download import Source, TaskManager

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20
MAX_TASKS = 256                 # kept (finished ones are dropped oldest first)
TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
REPO_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MANIFEST_ACCEPT = ", ".join(oci.MANIFEST_ACCEPT)
INDEX_TYPES = tuple(oci.INDEX_MEDIA_TYPES)


def parse_reference(ref: str, default_registry: str = "") -> tuple[str, str, str]:
    """``registry/repo[:tag][@digest]`` -> (registry, repository, tag-or-digest). The first path
    component is the registry when it has a dot or a port or is ``localhost``; otherwise
    ``default_registry`` (the peer's ``--upstream``) is used."""
    if not isinstance(ref, str) or not ref or len(ref) > 512:
        raise InvalidInput("image: a reference like registry.local/app:1 is required")
    name, at, digest = ref.partition("@")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, name = first, rest
    elif default_registry:
        registry = default_registry
    else:
        raise InvalidInput(f"image {ref!r} names no registry and the peer has no --upstream")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    if not REPO_RE.match(name):
        raise InvalidInput(f"image {ref!r}: bad repository {name!r}")
    if at:
        if not DIGEST_RE.match(digest):
            raise InvalidInput(f"image {ref!r}: bad digest {digest!r}")
        return registry, name, digest
    tag = tag or "latest"
    if not TAG_RE.match(tag):
        raise InvalidInput(f"image {ref!r}: bad tag {tag!r}")
    return registry, name, tag


@dataclass
class BlobProgress:
    digest: str
    size: int
    role: str = "layer"                # bootstrap | hot | config | layer | blob
    done_bytes: int = 0
    verified: bool = False
    error: str = ""

    def view(self) -> dict:
        return {"digest": self.digest, "size": self.size, "role": self.role, "done_bytes": self.done_bytes,
                "verified_bytes": self.size if self.verified else 0, "verified": self.verified,
                **({"error": self.error} if self.error else {})}


@dataclass(frozen=True)
class RuntimePull:
    """Where a preheat with ``"pull"`` has the image pulled: the node's settings, never the request's."""
    api: str                    # the snapshotter's pull service socket (--runtime-pull-api)
    address: str                # containerd's socket
    namespace: str
    snapshotter: str


#: Longest silence of the pull service between two progress lines (one containerd call at most).
PULL_READ_TIMEOUT = 300.0


@dataclass
class PreheatTask:
    id: str
    image: str | None
    repository: str | None
    want_all: bool
    blobs: list[BlobProgress] = field(default_factory=list)
    pull: bool = False
    pulled: dict = field(default_factory=dict)   # the pull's state, for the view
    state: str = "queued"
    error: str = ""
    created: float = field(default_factory=time.time)
    finished: float = 0.0
    runner: asyncio.Task | None = None

    def view(self) -> dict:
        view = {"id": self.id, "type": "preheat", "image": self.image, "state": self.state, "error": self.error,
                "created": self.created, "finished": self.finished, "blobs": [b.view() for b in self.blobs]}
        if self.pull:
            view["pull"] = dict(self.pulled) or {"state": "pending"}
        return view


class Preheater:
    """The task table and the HTTP routes; one per daemon, sharing the daemon's TaskManager."""

    def __init__(self, tasks: TaskManager, default_upstream: str, token: str | None, concurrency: int = 2,
                 runtime: RuntimePull | None = None):
        self.tasks = tasks
        self.runtime = runtime
        self.default_upstream = default_upstream
        self.token = token
        self.jobs: dict[str, PreheatTask] = {}
        self.sem = asyncio.Semaphore(concurrency)   # blobs fetched at once across all preheat tasks

    # -- HTTP -----------------------------------------------------------------------------------------
    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/v1/tasks", self._guard(self.create))
        app.router.add_get("/api/v1/tasks", self._guard(self.list))
        app.router.add_get("/api/v1/tasks/{id}", self._guard(self.show))
        app.router.add_delete("/api/v1/tasks/{id}", self._guard(self.cancel))

    def _guard(self, handler):
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.token:
                return _err(403, "the preheat API is disabled: start the peer with --preheat-token-file")
            got = request.headers.get("Authorization", "")
            scheme, _, value = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                resp = _err(401, "a bearer token (the peer's --preheat-token-file) is required")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="remora-peer-preheat"'
                return resp
            return await handler(request)
        return guarded

    async def create(self, request: web.Request) -> web.Response:
        if (request.content_length or 0) > MAX_BODY:
            return _err(413, f"request body larger than {MAX_BODY} bytes")
        try:
            body = json.loads(await request.content.read(MAX_BODY + 1) or b"null")
            task = self._parse(body)
        except (ValueError, InvalidInput) as exc:
            return _err(400, str(exc))
        if task.id in self.jobs:
            return web.json_response(self.jobs[task.id].view(), status=409)
        self._trim()
        self.jobs[task.id] = task
        task.runner = self.tasks.spawn(self._run(task))
        log.info("preheat %s: %s (%d blobs named, all=%s)", task.id, task.image, len(task.blobs), task.want_all)
        return web.json_response(task.view(), status=201)

    async def list(self, request: web.Request) -> web.Response:
        return web.json_response({"tasks": [t.view() for t in self.jobs.values()]})

    async def show(self, request: web.Request) -> web.Response:
        task = self.jobs.get(request.match_info["id"])
        if task is None:
            return _err(404, "no such task")
        for b in task.blobs:
            self._refresh(b)
        return web.json_response(task.view())

    async def cancel(self, request: web.Request) -> web.Response:
        task = self.jobs.get(request.match_info["id"])
        if task is None:
            return _err(404, "no such task")
        if task.state in ("queued", "running"):
            task.state, task.error, task.finished = "cancelled", "cancelled by request", time.time()
            if task.runner is not None:
                task.runner.cancel()
                await asyncio.wait([task.runner], timeout=5)
            stopped = self._stop_idle_downloads(task)
            if stopped:
                await asyncio.wait(stopped, timeout=5)
        return web.Response(status=204)

    def _stop_idle_downloads(self, task: PreheatTask) -> list[asyncio.Task]:
        """Stop the downloads this task started that nobody else waits for (a pull through the mirror
        keeps its download: it holds the entry, as the driver itself does). Pieces already stored stay for
        the next request."""
        stopped = []
        for blob in task.blobs:
            dl = self.tasks.tasks.get(blob.digest)
            if dl is not None and not dl.entry.verified and dl.entry.users <= 1 and dl._driver is not None \
                    and not dl._driver.done():
                dl._driver.cancel()
                stopped.append(dl._driver)
        return stopped

    # -- parsing --------------------------------------------------------------------------------------
    def _parse(self, body) -> PreheatTask:
        if not isinstance(body, dict):
            raise InvalidInput("the body must be a JSON object")
        unknown = set(body) - {"id", "type", "image", "repository", "blobs", "priority", "all", "pull"}
        if unknown:
            raise InvalidInput(f"unknown fields: {sorted(unknown)}")
        tid = body.get("id")
        if not isinstance(tid, str) or not TASK_ID_RE.match(tid):
            raise InvalidInput("id: 1-128 characters of [A-Za-z0-9._-] required")
        if body.get("type", "preheat") != "preheat":
            raise InvalidInput(f"type {body.get('type')!r} is not supported by this peer (only preheat)")
        image, repository = body.get("image"), body.get("repository")
        blobs_in = body.get("blobs") or []
        if not isinstance(blobs_in, list) or len(blobs_in) > 10_000:
            raise InvalidInput("blobs: a list of at most 10000 {digest, size}")
        blobs = []
        for b in blobs_in:
            if not isinstance(b, dict) or not isinstance(b.get("digest"), str) or not DIGEST_RE.match(b["digest"]):
                raise InvalidInput(f"blobs: bad entry {str(b)[:100]}")
            size = b.get("size", 0)
            if not isinstance(size, int) or size < 0:
                raise InvalidInput(f"blobs: bad size for {b['digest']}")
            blobs.append(BlobProgress(b["digest"], size, "blob"))
        if not image and not blobs:
            raise InvalidInput("an image reference or a blob list is required")
        if image is not None and not isinstance(image, str):
            raise InvalidInput("image must be a string")
        if repository is not None and not isinstance(repository, str):
            raise InvalidInput("repository must be a string")
        # A blob list names its repository (or the image reference does): reject bad ones now.
        for ref in (image, repository):
            if ref:
                registry, _, _ = parse_reference(ref, self.default_upstream)
                self._check_registry(registry)
        want_all = body.get("all")
        # the manager's jobs name no "all": a job must leave nothing to the registry
        want_all = True if want_all is None else bool(want_all)
        pull = body.get("pull", False)
        if not isinstance(pull, bool):
            raise InvalidInput("pull must be true or false")
        if pull and self.runtime is None:
            raise InvalidInput("pull: this peer does not pull images into the node's container runtime (start it "
                               "with --runtime-pull-api SOCKET, the remora snapshotter's pull service)")
        if pull and not image:
            raise InvalidInput("pull needs an image reference (a blob list names no image to pull)")
        return PreheatTask(tid, image, repository, want_all, blobs, pull=pull)

    def _check_registry(self, registry: str) -> None:
        if not self.tasks.upstream.allows(registry):
            raise InvalidInput(f"registry {registry!r} is not one this peer fetches from (--registry/--upstream)")

    # -- running --------------------------------------------------------------------------------------
    async def _run(self, task: PreheatTask) -> None:
        task.state = "running"
        try:
            source = None
            ref = task.image or task.repository
            if ref:
                registry, repo, reference = parse_reference(ref, self.default_upstream)
                source = Source(registry, repo)
                if not task.blobs:
                    task.blobs = await self._resolve(registry, repo, reference, task.want_all)
            await self._fetch_all(task.blobs, source)
            missing = [b.digest for b in task.blobs if not b.verified]
            if missing:
                raise RemoraError(f"blobs not verified: {missing[:5]}")
            if task.pull:
                await self._pull(task)
            task.state = "succeeded"
        except asyncio.CancelledError:
            task.state = "cancelled"
            task.error = task.error or "cancelled"
        except (TimeoutError, RemoraError, OSError) as exc:
            task.state, task.error = "failed", str(exc) or type(exc).__name__
            log.info("preheat %s failed: %s", task.id, task.error)
        except Exception as exc:   # never leave a task "running" forever
            log.exception("preheat %s", task.id)
            task.state, task.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            task.finished = time.time()

    async def _fetch_all(self, blobs: list[BlobProgress], source: Source | None) -> None:
        """Fetch ``blobs`` up to the semaphore's count at a time, started in priority order (bootstrap
        and hot blob first: the semaphore lets waiters in first come, first served). Overlapping them
        matters on a mesh: each blob's swarm starts from one copy and ends with a tail of last pieces,
        and a node fetching one blob after the other leaves its links idle in both. The first failure
        cancels the rest and is raised."""
        fetches = [asyncio.ensure_future(self._fetch(blob, source)) for blob in blobs]
        if not fetches:
            return
        try:
            done, pending = await asyncio.wait(fetches, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for f in fetches:
                f.cancel()
            await asyncio.gather(*fetches, return_exceptions=True)
            raise
        for f in pending:
            f.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for f in fetches:   # the first failure in priority order
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()

    async def _fetch(self, blob: BlobProgress, source: Source | None) -> None:
        async with self.sem:
            # an anonymous grant names the repository to parents, which check with the registry that
            # anonymous access reads it: public images preheat peer to peer, private ones (refused, 403)
            # come from the registry with this node's credentials, as before. A client's own grant on a
            # download already running is kept.
            running = self.tasks.tasks.get(blob.digest)
            grant = None
            if source is not None and (running is None or running.grant is None):
                grant = Grant(source.registry, source.repository)
            dl = self.tasks.task(blob.digest, source, grant=grant, background=True)
            try:
                entry = await dl.ensure(None)       # the whole blob, verified against its digest
            except RemoraError as exc:
                blob.error = str(exc)
                self.tasks.forget_if_empty(blob.digest)
                raise
            if blob.size and entry.content_length != blob.size:
                blob.error = f"size {entry.content_length}, the request said {blob.size}"
                raise RemoraError(f"{blob.digest}: {blob.error}")
            blob.size = entry.content_length
            self._refresh(blob)
            if not blob.verified:
                raise RemoraError(f"{blob.digest}: stored but not verified")

    async def _pull(self, task: PreheatTask) -> None:
        """Have the node's snapshotter pull ``task.image`` into containerd (see the module's "Pull")."""
        rt = self.runtime
        assert rt is not None and task.image
        if not any(b.role == "bootstrap" for b in task.blobs):
            # `remora pull` makes remora images runnable; containerd pulls an OCI image (whose every blob is
            # now here) from this peer, its mirror. Said in the view, not hidden: a plan may mix both kinds.
            task.pulled = {"state": "skipped", "reason": "not a remora image: containerd pulls it from this "
                                                         "peer (its mirror) at start"}
            log.info("preheat %s: %s is not a remora image: blobs preheated, no pull", task.id, task.image)
            return
        registry, repo, reference = parse_reference(task.image, self.default_upstream)
        ref = f"{registry}/{repo}{'@' if reference.startswith('sha256:') else ':'}{reference}"
        request = {"reference": ref, "address": rt.address, "namespace": rt.namespace,
                   "snapshotter": rt.snapshotter,
                   "plain_http": self.tasks.upstream.endpoint(registry).startswith("http://")}
        task.pulled = {"state": "running"}
        t0 = time.monotonic()
        try:
            result = await asyncio.to_thread(pull_via_service, rt.api, request,
                                             lambda line: log.debug("preheat %s: pull: %s", task.id, line),
                                             PULL_READ_TIMEOUT)
        except NoService as exc:
            task.pulled = {"state": "failed", "error": f"no pull service at {rt.api}: {exc}"}
            raise RemoraError(f"pull: nothing answers at --runtime-pull-api {rt.api} ({exc}): is the remora "
                              f"snapshotter running with --api-address {rt.api}?") from None
        except RemoraError as exc:
            task.pulled = {"state": "failed", "error": str(exc)}
            raise RemoraError(f"pull of {ref} into containerd: {exc}") from None
        task.pulled = {"state": "done", "name": result.name, "manifest_digest": result.manifest_digest,
                       "remote_layers": result.remote_layers, "reused_layers": result.reused_layers,
                       "seconds": round(time.monotonic() - t0, 3)}
        log.info("preheat %s: %s is in containerd (namespace %s) in %.2fs", task.id, result.name, rt.namespace,
                 time.monotonic() - t0)

    def _refresh(self, blob: BlobProgress) -> None:
        entry = self.tasks.store.get(blob.digest)
        if entry is None:
            blob.done_bytes, blob.verified = 0, False
            return
        blob.verified = bool(entry.verified and entry.has_layout)
        blob.done_bytes = entry.content_length if blob.verified else entry.size_on_disk()
        if entry.has_layout and not blob.size:
            blob.size = entry.content_length

    async def _resolve(self, registry: str, repo: str, reference: str, want_all: bool) -> list[BlobProgress]:
        manifest = await self._manifest(registry, repo, reference)
        if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
            chosen = _pick_from_index(manifest)
            manifest = await self._manifest(registry, repo, chosen)
        await self._ask_anonymously(registry, repo, reference)
        layers = manifest.get("layers")
        config = manifest.get("config")
        if not isinstance(layers, list) or not isinstance(config, dict):
            raise InvalidInput(f"{registry}/{repo}:{reference}: not an image manifest")
        first, rest = [], []
        cfg = _blob(config, "config")
        is_remora = any(isinstance(layer, dict) and ann.ROLE in (layer.get("annotations") or {}) for layer in layers)
        for layer in layers:
            a = layer.get("annotations") or {} if isinstance(layer, dict) else {}
            if is_remora and a.get(ann.ROLE) == "bootstrap":
                first.insert(0, _blob(layer, "bootstrap"))
            elif is_remora and ann.prefetch_bytes(a) > 0:
                first.append(_blob(layer, "hot"))
            else:
                rest.append(_blob(layer, "layer"))
        if not is_remora:
            return [cfg, *rest]
        # the config too (a few KB): a pull reads it before the container starts, and without it that
        # read would reach the registry after the preheat
        return [*first, cfg, *(rest if want_all else [])]

    async def _ask_anonymously(self, registry: str, repo: str, reference: str) -> None:
        """Ask the registry once whether anyone may read the image (the preheat's anonymous grant): a
        yes makes the kept image readable by anyone while the registry is unreachable later (access.py),
        a no leaves it to clients whose own credentials the registry accepts."""
        try:
            await self.tasks.access.check(registry, repo, "manifest", reference, None)
        except AccessDenied:
            log.info("preheat of %s/%s:%s: private (the registry refuses anonymous clients): offline, only "
                     "clients it accepted are served", registry, repo, reference)
        except (RemoraError, TimeoutError) as exc:
            log.info("preheat of %s/%s:%s: anonymous access check failed: %s", registry, repo, reference, exc)

    async def _manifest(self, registry: str, repo: str, reference: str) -> dict:
        body, media_type, _ = await self.tasks.upstream.manifest(registry, repo, reference, MANIFEST_ACCEPT)
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise InvalidInput(f"manifest {repo}:{reference} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"manifest {repo}:{reference} is not a JSON object")
        # Kept (digest-checked above, hashed again there) with the tag's answer and when it was seen, so
        # the node can start the image while the registry is unreachable (offline.py).
        try:
            await asyncio.to_thread(self.tasks.kept.keep, registry, repo, reference, body,
                                    str(data.get("mediaType") or "") if media_type == "application/octet-stream"
                                    else media_type)
        except (OSError, ValueError) as exc:
            raise RemoraError(f"manifest {repo}:{reference}: cannot keep it for offline use: {exc}") from None
        return data

    def _trim(self) -> None:
        done = [t for t in self.jobs.values() if t.state not in ("queued", "running")]
        while len(self.jobs) >= MAX_TASKS and done:
            self.jobs.pop(done.pop(0).id, None)
        if len(self.jobs) >= MAX_TASKS:
            raise InvalidInput(f"too many preheat tasks running ({MAX_TASKS})")


def _blob(desc: dict, role: str) -> BlobProgress:
    digest, size = desc.get("digest"), desc.get("size")
    if not isinstance(digest, str) or not DIGEST_RE.match(digest) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"manifest names a bad blob: {str(desc)[:120]}")
    return BlobProgress(digest, size, role)


def _pick_from_index(index: dict) -> str:
    """The remora manifest of an index when there is one, else linux/amd64, else the first."""
    entries = [m for m in index.get("manifests") or [] if isinstance(m, dict) and DIGEST_RE.match(str(m.get("digest")))]
    if not entries:
        raise InvalidInput("image index lists no manifest")
    for m in entries:
        if ann.MANIFEST_MARKER in (m.get("annotations") or {}):
            return m["digest"]
    for m in entries:
        p = m.get("platform") or {}
        if p.get("os") == "linux" and p.get("architecture") == "amd64":
            return m["digest"]
    return entries[0]["digest"]


def _err(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
