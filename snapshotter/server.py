"""containerd's snapshots gRPC API served on a unix socket (a containerd "proxy plugin").

containerd talks to us through ``[proxy_plugins.remora] type = "snapshot"``. Its metadata layer
already namespaces keys (``<namespace>/<seq>/<key>``) and its garbage collector lists and removes
snapshots WITHOUT a namespace, so the store is deliberately namespace-agnostic like containerd's
built-in snapshotters; the ``containerd-namespace`` header is read for logs and handed to the
remote-layer handler.

Errors carry the gRPC codes containerd's ``errdefs.FromGRPC`` turns back into its error kinds:
NOT_FOUND, ALREADY_EXISTS (also the "remote snapshot is ready" answer to Prepare), FAILED_PRECONDITION
(removing a parent, committing a view), INVALID_ARGUMENT (bad filter, bad field, non-committed
parent), UNIMPLEMENTED (commit with rebase) and UNAVAILABLE (server shutting down).
"""
from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from remora._proto.containerd.types import mount_pb2
from remora.errors import InvalidInput, NotFound, UsageError
from remora.procutil import unix_socket_answers

from . import overlay
from .remote import TARGET_REF_LABEL, LayerUnavailable, RemoteLayer, RemoteLayerHandler, is_remote_candidate
from .storage import (AlreadyExists, FailedPrecondition, Info, Kind, SnapshotStore, StorageError, Usage,
                      remove_tree)

log = logging.getLogger(__name__)

NAMESPACE_HEADER = "containerd-namespace"
LIST_BATCH = 100  # containerd's own snapshots service streams List in batches of 100


class Unimplemented(Exception):
    """A request for a feature this snapshotter does not have (gRPC UNIMPLEMENTED)."""


_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (LayerUnavailable, grpc.StatusCode.UNAVAILABLE),
]


def _rpc(fn: Callable) -> Callable:
    """Map store errors to gRPC codes; anything unexpected is INTERNAL and logged with a traceback."""

    @functools.wraps(fn)
    async def wrapper(self: "SnapshotsService", request, context: grpc.aio.ServicerContext):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "snapshotter is shutting down")
        try:
            return await fn(self, request, context)
        except tuple(c for c, _ in _CODES) as exc:
            code = next(code for cls, code in _CODES if isinstance(exc, cls))
            log.debug("%s: %s: %s", fn.__name__, code.name, exc)
            await context.abort(code, str(exc))
        except StorageError as exc:
            log.error("%s: %s", fn.__name__, exc)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # a bug: keep serving, tell the client what happened
            log.exception("%s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    return wrapper


def _namespace(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_HEADER:
            return value
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
    """The RPC handlers. Writes (which fsync) and directory walks run in worker threads; point reads
    (Stat, Mounts: one indexed SELECT on a WAL reader, ~0.1 ms) run on the event loop, which saves
    the thread hand-off that would otherwise dominate their latency."""

    def __init__(self, store: SnapshotStore, handler: RemoteLayerHandler):
        self.store = store
        self.handler = handler
        self.draining = False

    async def _call(self, fn: Callable, *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    def _mounts(self, snap) -> list[mount_pb2.Mount]:
        return mounts_to_pb(overlay.mounts_for(snap, self.store.fs_path, self.store.work_path))

    async def _checked_mounts(self, snap) -> list[mount_pb2.Mount]:
        """Mounts of ``snap``, after checking that every lazily mounted layer below it is alive."""
        chain = set(snap.parent_ids)
        if chain:
            for sid, _, _ in await self._call(self.store.remote_snapshots):
                if sid in chain:
                    await self.handler.ensure_healthy(sid, self.store.fs_path(sid))
        return self._mounts(snap)

    @_rpc
    async def Prepare(self, request: pb.PrepareSnapshotRequest, context) -> pb.PrepareSnapshotResponse:
        labels = dict(request.labels)
        remote = is_remote_candidate(labels)
        target = labels.get(TARGET_REF_LABEL, "")
        if remote and await self._exists(target):
            raise AlreadyExists(f"target snapshot {target!r} already exists")
        snap = await self._call(self.store.create, Kind.ACTIVE, request.key, request.parent, labels)
        if remote and await self._prepare_remote(request, context, snap.id, target, labels):
            raise AlreadyExists(f"target snapshot {target!r} already exists")
        return pb.PrepareSnapshotResponse(mounts=await self._checked_mounts(snap))

    async def _exists(self, name: str) -> bool:
        try:
            self.store.stat(name)
            return True
        except NotFound:
            return False

    async def _prepare_remote(self, request, context, sid: str, target: str, labels: dict[str, str]) -> bool:
        """Offer the layer to the handler; True when it is mounted and committed as ``target``."""
        layer = RemoteLayer(snapshot_id=sid, mountpoint=self.store.fs_path(sid), key=request.key, target=target,
                            parent=request.parent, namespace=_namespace(context), labels=labels)
        try:
            if not await self.handler.mount(layer):
                return False
        except Exception as exc:
            log.warning("remote layer %s: mount failed, falling back to a local layer: %s", target, exc)
            return False
        try:
            await self._call(self.store.commit, target, request.key, labels, usage=Usage(), remote=True)
            log.info("remote layer %s mounted lazily (snapshot %s)", target, sid)
            return True
        except AlreadyExists:
            # Someone committed the same chain ID meanwhile: theirs wins, ours goes away.
            await self._release(sid)
            removed = await self._call(self.store.remove, request.key)
            await self._call(remove_tree, removed.path)
            return True
        except Exception as exc:
            log.warning("remote layer %s: commit failed, falling back to a local layer: %s", target, exc)
            await self._release(sid)
            return False

    async def _release(self, sid: str) -> None:
        try:
            await self.handler.unmount(sid, self.store.fs_path(sid))
        except Exception as exc:
            log.warning("remote layer of snapshot %s: unmount failed: %s", sid, exc)

    @_rpc
    async def View(self, request: pb.ViewSnapshotRequest, context) -> pb.ViewSnapshotResponse:
        snap = await self._call(self.store.create, Kind.VIEW, request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=await self._checked_mounts(snap))

    @_rpc
    async def Mounts(self, request: pb.MountsRequest, context) -> pb.MountsResponse:
        snap = self.store.snapshot(request.key)
        return pb.MountsResponse(mounts=await self._checked_mounts(snap))

    @_rpc
    async def Commit(self, request: pb.CommitSnapshotRequest, context) -> empty_pb2.Empty:
        if request.parent:
            info = self.store.stat(request.key)
            if request.parent != info.parent:
                raise Unimplemented(f"commit of {request.key} onto a different parent ({request.parent}) "
                                    "is not supported (no rebase)")
        await self._call(self.store.commit, request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_rpc
    async def Remove(self, request: pb.RemoveSnapshotRequest, context) -> empty_pb2.Empty:
        removed = await self._call(self.store.remove, request.key)
        if removed.remote:
            await self._release(removed.id)
        try:
            await self._call(remove_tree, removed.path)
        except (OSError, StorageError) as exc:  # the row is gone: Cleanup retries the directory
            log.warning("remove %s: directory %s left for cleanup: %s", request.key, removed.path, exc)
        return empty_pb2.Empty()

    @_rpc
    async def Stat(self, request: pb.StatSnapshotRequest, context) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=info_to_pb(self.store.stat(request.key)))

    @_rpc
    async def Update(self, request: pb.UpdateSnapshotRequest, context) -> pb.UpdateSnapshotResponse:
        info = await self._call(self.store.update, request.info.name, dict(request.info.labels),
                                list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    @_rpc
    async def List(self, request: pb.ListSnapshotsRequest, context):
        infos = await self._call(lambda: list(self.store.walk(list(request.filters))))
        for i in range(0, len(infos), LIST_BATCH):
            await context.write(pb.ListSnapshotsResponse(info=[info_to_pb(x) for x in infos[i:i + LIST_BATCH]]))

    @_rpc
    async def Usage(self, request: pb.UsageRequest, context) -> pb.UsageResponse:
        usage = await self._call(self.store.usage, request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_rpc
    async def Cleanup(self, request: pb.CleanupRequest, context) -> empty_pb2.Empty:
        removed = await self._call(self.store.cleanup)
        if removed:
            log.info("cleanup removed %d orphaned snapshot directories", len(removed))
        return empty_pb2.Empty()


RESTORE_REPORT_EVERY = 1.0  # seconds


async def _report_restore(done: list[int], total: int) -> None:
    """While the lazy mounts of the previous run are restored (re-mounting a dead one starts a
    process; many of them take seconds), say how far it got every second: the snapshotter does not
    listen yet, and its log must not look hung. Silent when the restore is quick. WARNING level: the
    default, and a snapshotter that is slow to come up is worth a line."""
    t0 = time.monotonic()
    while True:
        await asyncio.sleep(RESTORE_REPORT_EVERY)
        log.warning("restoring the lazy mounts of the previous run before serving: %d/%d done (%.0fs)",
                    done[0], total, time.monotonic() - t0)


class SnapshotterServer:
    """Store + service + gRPC server on a unix socket; restart-safe.

    ``start()`` unmounts what a crashed predecessor left mounted under the root, removes orphaned
    directories, restores remote-layer mounts through the handler, then listens.
    """

    def __init__(self, root: Path | str, address: Path | str, handler: RemoteLayerHandler | None = None):
        self.root = Path(root)
        self.address = Path(address)
        self.handler = handler or RemoteLayerHandler()
        self.store: SnapshotStore | None = None
        self.service: SnapshotsService | None = None
        self._server: grpc.aio.Server | None = None
        self._lock_fd: int | None = None

    async def start(self) -> "SnapshotterServer":
        if len(os.fsencode(self.address)) > 107:  # sun_path is 108 bytes including the NUL
            raise UsageError(f"socket path too long for a unix socket ({len(str(self.address))} > 107 bytes): "
                             f"{self.address}")
        # Before touching anything: recovery would detach the mounts of a live server on this root.
        if (self.address.exists() or self.address.is_symlink()) and unix_socket_answers(self.address):
            raise UsageError(f"{self.address} is in use: is another snapshotter running?")
        self._lock_root()
        try:
            self.store = await asyncio.to_thread(SnapshotStore, self.root)
            await asyncio.to_thread(self._recover)
            await self._restore_remote()
            if self.address.exists() or self.address.is_symlink():
                self.address.unlink()  # stale: its server died without cleaning up
            self.address.parent.mkdir(parents=True, exist_ok=True)
            self.service = SnapshotsService(self.store, self.handler)
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
        os.chmod(self.address, 0o660)
        log.info("snapshotter serving on %s (root %s)", self.address, self.root)
        return self

    def _lock_root(self) -> None:
        """One server per root (an flock the kernel drops when the process dies, even by kill -9)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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

    def _recover(self) -> None:
        from .storage import detach_mount, mountpoints_under

        # Lazy mounts of remote snapshots outlive the snapshotter on purpose (running containers use
        # them as lower layers): the handler adopts or re-mounts them in _restore_remote. Only
        # detach what nothing owns.
        remote = {os.path.realpath(self.store.fs_path(sid)) for sid, _, _ in self.store.remote_snapshots()}
        for mp in mountpoints_under(self.store.snapshots_dir):
            if mp in remote:
                continue
            log.warning("detaching stale mount %s left by a previous run", mp)
            try:
                detach_mount(mp)
            except StorageError as exc:
                log.error("%s", exc)
        removed = self.store.cleanup()
        if removed:
            log.info("removed %d orphaned snapshot directories", len(removed))

    async def _restore_remote(self) -> None:
        remote = await asyncio.to_thread(self.store.remote_snapshots)
        if remote and type(self.handler) is RemoteLayerHandler:
            log.error("%d lazily mounted snapshots cannot be restored without a remote-layer handler "
                      "(started with --no-lazy?): containers using them will fail until it is enabled",
                      len(remote))
            return
        done = [0]
        ticker = asyncio.create_task(_report_restore(done, len(remote))) if remote else None
        try:
            for sid, key, labels in remote:
                try:
                    await self.handler.restore(sid, self.store.fs_path(sid), labels)
                except Exception as exc:
                    log.error("remote snapshot %s (%s) could not be restored: %s", key, sid, exc)
                done[0] += 1
        finally:
            if ticker is not None:
                ticker.cancel()

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace: float = 5.0) -> None:
        if self.service:
            self.service.draining = True
        if self._server:
            await self._server.stop(grace)
        await self.handler.close()
        if self.store:
            self.store.close()
            self.store = None
        try:
            self.address.unlink()
        except FileNotFoundError:
            pass
        self._unlock_root()


async def serve(root: Path | str, address: Path | str, handler: RemoteLayerHandler | None = None,
                api_address: Path | str | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain in-flight RPCs and exit.

    ``api_address``: also serve the pull service (:mod:`remora.snapshotter.api`) there, from when
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
        from .api import PullService

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
