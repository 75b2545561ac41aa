"""The snapshotter's pull service: ``remora pull`` done by the daemon that is already warm.

Why. A cold start is timed from the start of ``remora pull`` to the workload's output. Measured on
the benchmark's image: the CLI took 0.92-1.44 s of wall time, of which the pull's own work was
0.58-0.84 s; the rest was a fresh interpreter importing grpc, protobuf and requests. The running
snapshotter has all of that loaded, so ``remora pull`` sends it the request and relays the progress,
and imports nothing but the standard library (containerd 2's Transfer service has the same shape: a
thin ``ctr`` and a daemon that pulls).

Protocol, version 1: HTTP/1.1 on a unix socket (like Docker's API socket or nydus-snapshotter's
system controller socket), served by a small asyncio server of the standard library: two routes,
one request per connection (every answer says ``Connection: close``). It used aiohttp, whose import
(its client, ssl contexts and all) cost 0.2-0.45 s of the daemon's start-up, before the socket could
open, for a protocol that needs none of it. The socket is mode 0600: whoever can use it makes this root daemon pull
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
import contextlib
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from remora.errors import RemoraError, UsageError
from remora.procutil import unix_socket_answers
from remora.pullapi import API_PULL_PATH, API_VERSION_PATH, NDJSON, PullResult

from .pull import pull

log = logging.getLogger(__name__)

API_VERSION = 1
MAX_CONCURRENT_PULLS = 8
MAX_HEAD = 16 << 10        # request line + headers: our client sends ~150 bytes
MAX_BODY = 1 << 20         # a pull request is a few hundred bytes of JSON
HEAD_TIMEOUT = 30.0        # a connection that sends no complete request within this is dropped
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error"}
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
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
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
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()
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
        ready = getattr(self.handler, "wait_ready", None)
        if ready is not None:  # e.g. the warm spare fs process: open only once a pull finds all warm
            await self._loop.run_in_executor(self._executor, ready)
        sock = _bind_private(self.address, self._tmp)
        self._inode = os.stat(self.address).st_ino
        try:
            self._server = await asyncio.start_unix_server(self._connection, sock=sock, limit=MAX_HEAD)
        except BaseException:
            sock.close()
            self._unlink()
            self._executor.shutdown(wait=False)
            raise
        log.info("pull service on %s", self.address)
        return True

    async def stop(self, grace: float = 10.0) -> None:
        """Close the socket, give pulls in flight ``grace`` seconds (gRPC still serves), then go."""
        if self._server is None:
            return
        self._server.close()
        self._unlink()
        if self._pulls:
            log.info("waiting up to %.0fs for %d pull(s) in flight", grace, len(self._pulls))
            await asyncio.wait(list(self._pulls), timeout=grace)
        if self._conns:  # responses still being written after the grace: cut (their pulls are logged)
            await asyncio.wait(list(self._conns), timeout=1.0)
            for task in list(self._conns):
                task.cancel()
        self._server = None
        self._executor.shutdown(wait=False)

    def _unlink(self) -> None:
        """Remove our socket file, unless a newer server has replaced it meanwhile."""
        try:
            if os.stat(self.address).st_ino == self._inode:
                self.address.unlink()
        except FileNotFoundError:
            pass

    # -- HTTP ---------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, one answer, then the connection closes."""
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            try:
                method, path, body = await asyncio.wait_for(_read_request(reader), HEAD_TIMEOUT)
            except _BadRequest as exc:
                await _respond(writer, exc.status, error_body(UsageError(str(exc))))
                return
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            if path == API_VERSION_PATH and method == "GET":
                from remora import __version__

                await _respond(writer, 200, {"api": API_VERSION, "version": __version__, "pid": os.getpid(),
                                             "lazy": self.handler is not None})
            elif path == API_PULL_PATH and method == "POST":
                await self._pull(body, reader, writer)
            elif path in (API_VERSION_PATH, API_PULL_PATH):
                await _respond(writer, 405, error_body(UsageError(f"{method} is not allowed on {path}")))
            else:
                await _respond(writer, 404, error_body(UsageError(f"no such endpoint: {path}")))
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # one broken exchange must not take the service down
            log.exception("pull service: request failed")
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()

    async def _pull(self, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t_received = time.monotonic()
        try:
            params = parse_request(json.loads(body))
        except ValueError as exc:  # JSON syntax
            await _respond(writer, 400, error_body(UsageError(f"the pull request is not JSON: {exc}")))
            return
        except UsageError as exc:
            await _respond(writer, 400, error_body(exc))
            return
        ref = params.pop("reference")
        log.info("pull of %s: request received", ref)
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[dict] = asyncio.Queue()

        def post(msg: dict) -> None:
            try:
                loop.call_soon_threadsafe(lines.put_nowait, msg)
            except RuntimeError:  # the loop is closed (process exiting): nobody is listening
                pass
        job = functools.partial(self._run_pull, ref, params, post, t_received)
        fut = loop.run_in_executor(self._executor, job)
        self._pulls.add(fut)
        fut.add_done_callback(self._pulls.discard)

        # The client never sends more after its request: EOF (or a reset) on the read side means it
        # hung up. Writes alone would notice only at the next progress line.
        gone = asyncio.ensure_future(reader.read(1))
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + NDJSON.encode() + b"\r\nCache-Control: no-store\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            await writer.drain()
            while True:
                get = asyncio.ensure_future(lines.get())
                await asyncio.wait([get, gone], return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise ConnectionResetError("the client closed the connection")
                msg = get.result()
                data = json.dumps(msg).encode() + b"\n"
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
                if "status" not in msg:  # the final line: the client may hang up as soon as it has it
                    break
            writer.write(b"0\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError) as exc:
            # The client went away (or the server is stopping): the pull goes on in its thread and
            # logs its own outcome; nothing of it depends on this response.
            log.warning("pull of %s: client gone (%s); the pull continues", ref, type(exc).__name__)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            gone.cancel()

    def _run_pull(self, ref: str, params: dict[str, Any], post, t_received: float | None = None) -> None:
        """In a pool thread: the pull, its progress and its final line sent to the event loop."""
        if t_received is not None and time.monotonic() - t_received > 0.05:  # a full pool: say so
            log.info("pull of %s: waited %.3fs for a pull thread", ref, time.monotonic() - t_received)
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
            # manifest and config from the snapshotter's --mirror peers first (MirrorFirstStore)
            result: PullResult = pull(ref, **params, say=lambda m: post({"status": m}), on_manifest=on_manifest,
                                      mirrors=tuple(getattr(self.handler, "mirrors", ()) or ()))
        except BaseException as exc:
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


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    """(method, path, body) of one HTTP/1.x request; :class:`_BadRequest` for what this API refuses."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(400, f"request head longer than {MAX_HEAD} bytes") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, f"not an HTTP/1.x request line: {lines[0][:80]!r}")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400, f"malformed header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _BadRequest(400, "a chunked request body is not supported: send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _BadRequest(400, "bad Content-Length") from None
    if length < 0 or length > MAX_BODY:
        raise _BadRequest(413 if length > 0 else 400, f"request body of {length} bytes (at most {MAX_BODY})")
    body = await reader.readexactly(length) if length else b""
    return method, target.split("?", 1)[0], body


async def _respond(writer: asyncio.StreamWriter, status: int, doc: dict) -> None:
    """A whole JSON answer, then the connection closes."""
    data = json.dumps(doc).encode()
    writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json; charset=utf-8"
                 f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    await writer.drain()


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
