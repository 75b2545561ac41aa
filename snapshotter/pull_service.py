"""The snapshotter's pull service: ``remora pull`` done by the daemon that is already warm.

Why. A cold start is timed from the start of ``remora pull`` to the workload's output. Measured on
the benchmark's image: the CLI took 0.92-1.44 s of wall time, of which the pull's own work was
0.58-0.84 s; the rest was a fresh interpreter importing grpc, protobuf and requests. The running
snapshotter has all of that loaded, so ``remora pull`` sends it the request and relays the progress,
and imports nothing but the standard library (containerd 2's Transfer service has the same shape: a
thin ``ctr`` and a daemon that pulls).

Protocol, version 1: HTTP/1.1 on a unix socket (like Docker's API socket or nydus-snapshotter's
system controller socket). The socket is mode 0600: whoever can use it makes this root daemon pull
into any containerd socket it names, which is root's power.

``GET /v1/version``
    ``{"api": 1, "version": "<remora version>", "pid": N, "lazy": true|false}``: a cheap liveness check.

``POST /v1/pull`` with a JSON body
    ``{"reference": str, "address": str (absolute), "namespace": str, "snapshotter": str,
    "plain_http": bool, "annotations_only": bool, "platform": str, "timeout": number}`` (only
    ``reference`` is required; the others default like ``remora pull``'s options; an unknown field
    is refused, so a newer client never has an option silently ignored). The answer is
    ``application/x-ndjson``, streamed: ``{"status": "..."}`` lines as the pull goes, then exactly one
    ``{"result": {name, manifest_digest, chain_ids, remote_layers, reused_layers, seconds}}`` or
    ``{"error": {"message": str, "exit_code": N, "type": "<exception class>"}}``, where ``exit_code``
    is what ``remora pull`` in-process exits with for that error (:mod:`remora.errors`). A malformed
    request gets HTTP 400 with a single ``{"error": {...}}`` (exit code 2).

The pull is :func:`remora.snapshotter.pull.pull`, synchronous, run on a thread pool of this
service's own: its containerd Prepare calls come back into this process's gRPC server, so the event
loop must stay free, and the pool is not the loop's default executor, which the remote-layer
handler needs for those very Prepares (pulls filling it would deadlock them). A client that
disconnects does not stop its pull: the pull finishes and its outcome is logged. On shutdown the
socket closes first and pulls in flight get a grace period to finish while gRPC still serves.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

from aiohttp import web

from remora.errors import RemoraError, UsageError
from remora.procutil import unix_socket_answers

from .pull import pull
from .pull_service_client import API_PULL_PATH, API_VERSION_PATH, NDJSON, PullResult

log = logging.getLogger(__name__)

API_VERSION = 1
MAX_CONCURRENT_PULLS = 8
# Request fields: (type, default); None = required.
_FIELDS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "reference": (str, None),
    "address": (str, "/run/containerd/containerd.sock"),
    "namespace": (str, "default"),
    "snapshotter": (str, "remora"),
    "plain_http": (bool, False),
    "annotations_only": (bool, False),
    "platform": (str, "linux/amd64"),
    "timeout": ((int, float), 120.0),
}
# What a pull imports, and what the lazy layers' warm-up and Prepares import (the bootstrap's fetch
# alone loads ~60 ms of modules); loaded before the socket opens so the first pull finds them warm.
_PULL_MODULES = (
    "remora.converter.image",
    "remora.snapshotter.remote",
    "remora.snapshotter.sources",
    "remora.snapshotter.staging",
    "remora.snapshotter.mount",
    "remora.snapshotter.containerd_client",
    "remora._proto.containerd.services.content.v1.content_pb2_grpc",
    "remora._proto.containerd.services.images.v1.images_pb2_grpc",
    "remora._proto.containerd.services.leases.v1.leases_pb2_grpc",
    "remora._proto.containerd.services.snapshots.v1.snapshots_pb2_grpc",
    "remora.imagestore",
    "remora.registry.client",
    "remora.oci",
    "remora.reference",
    "remora.format.annotations",
)


def parse_request(body: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`pull` from a ``POST /v1/pull`` body; UsageError if malformed."""
    if not isinstance(body, dict):
        raise UsageError("the pull request must be a JSON object")
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise UsageError(f"unknown pull request field(s) {', '.join(unknown)}: is remora pull newer than "
                         "the snapshotter? restart the snapshotter, or pull with --local")
    out: dict[str, Any] = {}
    for name, (kind, default) in _FIELDS.items():
        value = body.get(name, default)
        if value is None:
            raise UsageError(f"the pull request has no {name!r}")
        if not isinstance(value, kind) or (kind != bool and isinstance(value, bool)):
            raise UsageError(f"pull request field {name!r} has the wrong type ({type(value).__name__})")
        out[name] = value
    if not os.path.isabs(out["address"]):
        raise UsageError(f"containerd address {out['address']!r} must be an absolute path (the "
                         "snapshotter's working directory is not the client's)")
    if not out["timeout"] > 0:
        raise UsageError("pull request timeout must be > 0")
    return out


def error_body(exc: BaseException) -> dict[str, Any]:
    """``{"error": ...}`` for an exception: RemoraErrors keep their exit code; anything else is a bug (1)."""
    if isinstance(exc, RemoraError):
        return {"error": {"message": str(exc), "exit_code": exc.exit_code, "type": type(exc).__name__}}
    return {"error": {"message": f"the pull service failed unexpectedly: {type(exc).__name__}: {exc} "
                                 "(see the snapshotter's log)", "exit_code": 1, "type": type(exc).__name__}}


class PullService:
    """The HTTP API on ``address``; ``handler`` is the snapshotter's RemoraLayerHandler (None: no warm-up).

    ``start()`` returns False (and logs) if another live process serves that socket: the gRPC
    snapshotter is what containerd depends on, so this accelerator never keeps it from running.
    """

    def __init__(self, address: Path | str, handler=None, max_pulls: int = MAX_CONCURRENT_PULLS):
        self.address = Path(address)
        self._tmp = self.address.with_name(f".{self.address.name}.{os.getpid()}")  # see _bind_private
        self.handler = handler
        self._executor = ThreadPoolExecutor(max_workers=max_pulls, thread_name_prefix="remora-pull")
        self._runner: web.AppRunner | None = None
        self._inode: int | None = None
        self._pulls: set[asyncio.Future] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> bool:
        if len(os.fsencode(self._tmp)) > 107:  # sun_path is 108 bytes with the NUL
            raise UsageError(f"--api-address: socket path too long for a unix socket ({len(str(self.address))} "
                             f"bytes; at most {107 - len(str(self._tmp)) + len(str(self.address))}): {self.address}")
        if self.address.exists() and unix_socket_answers(self.address):
            log.error("pull service disabled: %s is in use by another process (another snapshotter?); "
                      "'remora pull' will use that one. Give this one its own --api-address", self.address)
            return False
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(self._executor, _preload)
        sock = _bind_private(self.address, self._tmp)
        self._inode = os.stat(self.address).st_ino
        try:
            app = web.Application()
            app.router.add_get(API_VERSION_PATH, self._version)
            app.router.add_post(API_PULL_PATH, self._pull)
            # shutdown_timeout: stop() has already waited for the pulls; handlers left after that are cut.
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            sock.close()
            self._unlink()
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
            self._executor.shutdown(wait=False)
            raise
        log.info("pull service on %s", self.address)
        return True

    async def stop(self, grace: float = 10.0) -> None:
        """Close the socket, give pulls in flight ``grace`` seconds (gRPC still serves), then go."""
        if self._runner is None:
            return
        for site in list(self._runner.sites):
            await site.stop()
        self._unlink()
        if self._pulls:
            log.info("waiting up to %.0fs for %d pull(s) in flight", grace, len(self._pulls))
            await asyncio.wait(list(self._pulls), timeout=grace)
        await self._runner.cleanup()
        self._runner = None
        self._executor.shutdown(wait=False)

    def _unlink(self) -> None:
        """Remove our socket file, unless a newer server has replaced it meanwhile."""
        try:
            if os.stat(self.address).st_ino == self._inode:
                self.address.unlink()
        except FileNotFoundError:
            pass

    # -- handlers -----------------------------------------------------------------------------
    async def _version(self, request: web.Request) -> web.Response:
        from remora import __version__

        return web.json_response({"api": API_VERSION, "version": __version__, "pid": os.getpid(),
                                  "lazy": self.handler is not None})

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        try:
            params = parse_request(await request.json())
        except ValueError as exc:  # JSON syntax
            return web.json_response(error_body(UsageError(f"the pull request is not JSON: {exc}")), status=400)
        except UsageError as exc:
            return web.json_response(error_body(exc), status=400)
        ref = params.pop("reference")
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[dict] = asyncio.Queue()

        def post(msg: dict) -> None:
            try:
                loop.call_soon_threadsafe(lines.put_nowait, msg)
            except RuntimeError:  # the loop is closed (process exiting): nobody is listening
                pass
        job = functools.partial(self._run_pull, ref, params, post)
        fut = loop.run_in_executor(self._executor, job)
        self._pulls.add(fut)
        fut.add_done_callback(self._pulls.discard)

        resp = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
        try:
            await resp.prepare(request)
            while True:
                msg = await lines.get()
                await resp.write(json.dumps(msg).encode() + b"\n")
                if "status" not in msg:  # the final line
                    break
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError) as exc:
            # The client went away (or the server is stopping): the pull goes on in its thread and
            # logs its own outcome; nothing of it depends on this response.
            log.warning("pull of %s: client gone (%s); the pull continues", ref, type(exc).__name__)
            if isinstance(exc, asyncio.CancelledError):
                raise
        return resp

    def _run_pull(self, ref: str, params: dict[str, Any], post) -> None:
        """In a pool thread: the pull, its progress and its final line sent to the event loop."""
        on_manifest = self._warm_hook()
        preconnect = getattr(self.handler, "preconnect", None)
        if preconnect is not None:
            from remora.reference import ImageRef, parse_reference

            try:
                parsed = parse_reference(ref)
            except RemoraError:
                parsed = None  # pull() reports the bad reference
            if isinstance(parsed, ImageRef):
                preconnect(parsed.host)
        try:
            result: PullResult = pull(ref, **params, say=lambda m: post({"status": m}), on_manifest=on_manifest)
        except BaseException as exc:  # noqa: BLE001 - every outcome must reach the client as a line
            if isinstance(exc, RemoraError):
                log.info("pull of %s failed (exit code %d): %s", ref, exc.exit_code, exc)
            else:
                log.exception("pull of %s failed unexpectedly", ref)
            post(error_body(exc))
            if not isinstance(exc, Exception):
                raise
            return
        log.info("pulled %s (%s) in %.2fs: %d remote, %d already present", result.name,
                 result.manifest_digest[:19], result.seconds, result.remote_layers, result.reused_layers)
        post({"result": result._asdict()})

    def _warm_hook(self):
        """``on_manifest`` for :func:`pull`: hand every layer's labels to ``handler.warm`` (thread-safe
        and non-blocking: it only starts background fetches), so the bootstrap and hot data are
        already on their way when the Prepares arrive. None when there is no lazy handler."""
        warm = getattr(self.handler, "warm", None)
        if warm is None:
            return None

        def start_warming(layers: list[tuple[str, Mapping[str, str]]]) -> None:
            for digest, labels in layers:
                _warm_one(warm, labels, digest)
        return start_warming


def _warm_one(warm, labels: Mapping[str, str], digest: str) -> None:
    """A failed warm-up is only a lost head start: the Prepare does the real work and reports."""
    try:
        warm(labels, digest, reason="the pull service")
    except Exception as exc:  # noqa: BLE001
        log.warning("warm-up of layer %s failed: %s", digest[:19], exc)


def _preload() -> None:
    """What the first pull would otherwise pay for on its critical path: the imports, and gRPC's
    synchronous client stack (its first channel in a process starts gRPC's own threads)."""
    import importlib

    import grpc

    for name in _PULL_MODULES:
        importlib.import_module(name)
    grpc.insecure_channel("unix:///nonexistent/remora-preload").close()  # never connects


def _bind_private(address: Path, tmp: Path) -> socket.socket:
    """A listening socket at ``address`` that is mode 0600 from the first moment anyone can see it.

    Bound under the temporary name ``tmp`` (same directory), chmod-ed, then renamed over ``address``
    (which also replaces a stale socket atomically); changing the umask instead would race with the
    process's other threads."""
    address.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tmp.unlink(missing_ok=True)
        sock.bind(os.fspath(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp, address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot serve the pull API on {address}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock
