"""containerd's snapshots gRPC API served on a unix socket (a containerd "proxy plugin").

containerd talks to us through ``[proxy_plugins.remora] type = "snapshot"``. This module is only the
transport, like containerd's ``contrib/snapshotservice``: each RPC turns its protobuf request into one
call of :class:`~remora.snapshotter.snapshotter.Snapshotter` (which holds the logic, the remote
handshake included) and its answer back into protobuf; errors go through one table (:data:`_CODES`).

containerd's metadata layer already namespaces keys (``<namespace>/<seq>/<key>``) and its garbage
collector lists and removes snapshots WITHOUT a namespace, so the store is deliberately
namespace-agnostic like containerd's built-in snapshotters; the ``containerd-namespace`` header is
read here for the remote-layer handler only.

The codes are the ones containerd's ``errdefs.FromGRPC`` turns back into its error kinds:
NOT_FOUND, ALREADY_EXISTS (also the "remote snapshot is ready" answer to Prepare), FAILED_PRECONDITION
(removing a parent, committing a view, a refused remote layer), INVALID_ARGUMENT (bad filter, bad
field, non-committed parent), UNIMPLEMENTED (commit with rebase), UNAVAILABLE (a dead lazy layer, the
server shutting down) and INTERNAL (storage failures, bugs).
"""
from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from remora._proto.containerd.types import mount_pb2
from remora.errors import InvalidInput, NotFound, StorageError, UsageError
from remora.procutil import unix_socket_answers

from . import overlay
from .layout import StateLayout
from .remote import LayerUnavailable, RemoteLayerHandler
from .snapshotter import Snapshotter, Unimplemented
from .storage import AlreadyExists, FailedPrecondition, Info, SnapshotStore

__all__ = ["SnapshotsService", "SnapshotterServer", "Unimplemented", "serve"]

log = logging.getLogger(__name__)

NAMESPACE_HEADER = "containerd-namespace"
LIST_BATCH = 100  # containerd's own snapshots service streams List in batches of 100

# The one error -> status table (first match wins). INTERNAL ones are logged as errors: the client
# cannot fix them. Anything not in the table is a bug: INTERNAL, logged with its traceback.
_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (LayerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StorageError, grpc.StatusCode.INTERNAL),
]

R = TypeVar("R")
Handler = Callable[["SnapshotsService", Any, grpc.aio.ServicerContext], Awaitable[R]]


def _rpc(fn: Handler[R]) -> Handler[R]:
    """Refuse while draining; map domain errors through :data:`_CODES`; anything else is INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: SnapshotsService, request: Any, context: grpc.aio.ServicerContext) -> R:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "snapshotter is shutting down")
        try:
            return await fn(self, request, context)
        except tuple(c for c, _ in _CODES) as exc:
            code = next(code for cls, code in _CODES if isinstance(exc, cls))
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s: %s", fn.__name__, exc)
            else:
                log.debug("%s: %s: %s", fn.__name__, code.name, exc)
            await context.abort(code, str(exc))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # a bug: keep serving, tell the client what happened
            log.exception("%s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def _namespace(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_HEADER:
            return str(value)
    return None


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=int(info.kind), created_at=_timestamp(info.created_ns),
                   updated_at=_timestamp(info.updated_ns), labels=info.labels)


def mounts_to_pb(mounts: list[overlay.Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


class SnapshotsService(pb_grpc.SnapshotsServicer):
    """The RPC handlers: protobuf -> one :class:`Snapshotter` call -> protobuf. ``draining`` makes
    every RPC answer UNAVAILABLE (set by :meth:`SnapshotterServer.stop`)."""

    def __init__(self, snapshotter: Snapshotter):
        self.snapshotter = snapshotter
        self.draining = False

    @_rpc
    async def Prepare(self, request: pb.PrepareSnapshotRequest, context: Any) -> pb.PrepareSnapshotResponse:
        mounts = await self.snapshotter.prepare(request.key, request.parent, dict(request.labels),
                                                namespace=_namespace(context))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    @_rpc
    async def View(self, request: pb.ViewSnapshotRequest, context: Any) -> pb.ViewSnapshotResponse:
        mounts = await self.snapshotter.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    @_rpc
    async def Mounts(self, request: pb.MountsRequest, context: Any) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=mounts_to_pb(await self.snapshotter.mounts(request.key)))

    @_rpc
    async def Commit(self, request: pb.CommitSnapshotRequest, context: Any) -> empty_pb2.Empty:
        await self.snapshotter.commit(request.name, request.key, dict(request.labels), parent=request.parent)
        return empty_pb2.Empty()

    @_rpc
    async def Remove(self, request: pb.RemoveSnapshotRequest, context: Any) -> empty_pb2.Empty:
        await self.snapshotter.remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    async def Stat(self, request: pb.StatSnapshotRequest, context: Any) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=info_to_pb(await self.snapshotter.stat(request.key)))

    @_rpc
    async def Update(self, request: pb.UpdateSnapshotRequest, context: Any) -> pb.UpdateSnapshotResponse:
        info = await self.snapshotter.update(request.info.name, dict(request.info.labels),
                                             list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    @_rpc
    async def List(self, request: pb.ListSnapshotsRequest, context: Any) -> None:
        infos = await self.snapshotter.walk(list(request.filters))
        for i in range(0, len(infos), LIST_BATCH):
            await context.write(pb.ListSnapshotsResponse(info=[info_to_pb(x) for x in infos[i:i + LIST_BATCH]]))

    @_rpc
    async def Usage(self, request: pb.UsageRequest, context: Any) -> pb.UsageResponse:
        usage = await self.snapshotter.usage(request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_rpc
    async def Cleanup(self, request: pb.CleanupRequest, context: Any) -> empty_pb2.Empty:
        await self.snapshotter.cleanup()
        return empty_pb2.Empty()


RESTORE_REPORT_EVERY = 1.0  # seconds


async def _report_restore(state: list[int]) -> None:
    """While the lazy mounts of the previous run are restored (re-mounting a dead one starts a
    process; many of them take seconds), say how far it got every second: the snapshotter does not
    listen yet, and its log must not look hung. Silent when the restore is quick or has nothing to
    do. WARNING level: the default, and a snapshotter that is slow to come up is worth a line.
    ``state`` is ``[done, total]``, kept current by :meth:`Snapshotter.restore`'s progress callback."""
    t0 = time.monotonic()
    while True:
        await asyncio.sleep(RESTORE_REPORT_EVERY)
        if state[1]:
            log.warning("restoring the lazy mounts of the previous run before serving: %d/%d done (%.0fs)",
                        state[0], state[1], time.monotonic() - t0)


class SnapshotterServer:
    """Root lock + store + :class:`Snapshotter` + gRPC server on a unix socket; restart-safe.

    ``start()`` locks the root, opens the store, lets the snapshotter recover (detach what a crashed
    predecessor left mounted, remove orphaned directories) and restore the remote-layer mounts through
    the handler, then listens. ``store`` and ``snapshotter`` are set while it runs.
    """

    def __init__(self, root: Path | str, address: Path | str, handler: RemoteLayerHandler | None = None):
        self.root = Path(root)
        self.address = Path(address)
        self.handler = handler or RemoteLayerHandler()
        self.store: SnapshotStore | None = None
        self.snapshotter: Snapshotter | None = None
        self.service: SnapshotsService | None = None
        self._server: grpc.aio.Server | None = None
        self._lock_fd: int | None = None

    async def start(self) -> SnapshotterServer:
        if len(os.fsencode(self.address)) > 107:  # sun_path is 108 bytes including the NUL
            raise UsageError(f"socket path too long for a unix socket ({len(str(self.address))} > 107 bytes): "
                             f"{self.address}")
        # Before touching anything: recovery would detach the mounts of a live server on this root.
        if (self.address.exists() or self.address.is_symlink()) and unix_socket_answers(self.address):
            raise UsageError(f"{self.address} is in use: is another snapshotter running?")
        self._lock_root()
        try:
            self.store = await asyncio.to_thread(SnapshotStore, self.root)
            snapshotter = Snapshotter(self.store, self.handler)
            await snapshotter.recover()
            await self._restore(snapshotter)
            if self.address.exists() or self.address.is_symlink():
                self.address.unlink()  # stale: its server died without cleaning up
            self.address.parent.mkdir(parents=True, exist_ok=True)
            self.service = SnapshotsService(snapshotter)
            self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)])
            pb_grpc.add_SnapshotsServicer_to_server(self.service, self._server)
            if self._server.add_insecure_port(f"unix://{self.address}") == 0:
                raise UsageError(f"cannot listen on {self.address}")
            await self._server.start()
        except BaseException:
            if self.store:
                self.store.close()
                self.store = None
            self._unlock_root()
            raise
        self.snapshotter = snapshotter
        os.chmod(self.address, 0o660)
        log.info("snapshotter serving on %s (root %s)", self.address, self.root)
        return self

    def _lock_root(self) -> None:
        """One server per root (an flock the kernel drops when the process dies, even by kill -9)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(StateLayout(self.root).lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot create snapshotter root {self.root}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"{self.root} is in use by another snapshotter") from None
        self._lock_fd = fd

    def _unlock_root(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    async def _restore(snapshotter: Snapshotter) -> None:
        """The snapshotter's restore, with a progress line every second while it takes long."""
        state = [0, 0]

        def progress(done: int, total: int) -> None:
            state[:] = [done, total]

        ticker = asyncio.create_task(_report_restore(state))
        try:
            await snapshotter.restore(progress)
        finally:
            ticker.cancel()

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace: float = 5.0) -> None:
        if self.service:
            self.service.draining = True
        if self._server:
            await self._server.stop(grace)
        if self.snapshotter:
            await self.snapshotter.close()  # the handler's background work, then the store
            self.snapshotter = None
            self.store = None
        else:
            await self.handler.close()
        try:
            self.address.unlink()
        except FileNotFoundError:
            pass
        self._unlock_root()


async def serve(root: Path | str, address: Path | str, handler: RemoteLayerHandler | None = None,
                api_address: Path | str | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain in-flight RPCs and exit.

    ``api_address``: also serve the pull service (:mod:`remora.snapshotter.pull_service`) there, from when
    gRPC serves (its pulls come back as Prepares) until just before gRPC stops (pulls in flight get
    to finish first)."""
    # Signal handlers first: a SIGTERM that arrives as soon as the socket answers must still mean a
    # clean stop (exit 0), not death by signal.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await SnapshotterServer(root, address, handler).start()
    api = None
    if api_address:
        from .pull_service import PullService

        try:
            api = PullService(api_address, handler)
            if not await api.start():
                api = None
        except BaseException:
            await server.stop()
            raise
    waiter = asyncio.ensure_future(server.wait())
    await asyncio.wait([waiter, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    log.info("snapshotter stopping")
    if api:
        await api.stop()
    await server.stop()
    waiter.cancel()
