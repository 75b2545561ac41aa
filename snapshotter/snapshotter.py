"""The snapshotter itself, with no transport: containerd's Snapshotter interface plus the remote handshake.

Shaped like containerd's ``core/snapshots.Snapshotter`` (Stat, Update, Usage, Mounts, Prepare, View,
Commit, Remove, Walk, Close, and ``Cleaner.Cleanup``) so that :mod:`remora.snapshotter.server` is a
thin adapter (protobuf in, one call, protobuf out, one error→status table), as containerd's
``contrib/snapshotservice`` is, and so the logic is testable without gRPC. It takes and returns the
store's :class:`~remora.snapshotter.storage.Info` / :class:`~remora.snapshotter.storage.Usage` and
:class:`~remora.snapshotter.overlay.Mount` objects and raises the domain errors, which the adapter maps:

* ``NotFound``, ``AlreadyExists`` (also "the remote snapshot is ready" from Prepare),
  ``FailedPrecondition`` (removing a parent, committing a view, a refused remote layer),
  ``InvalidInput`` (bad key, filter, field, parent kind), :class:`Unimplemented` (commit with rebase),
  ``LayerUnavailable`` (a lazy layer below the snapshot is dead) and ``StorageError``.

What it owns beyond the store (:mod:`remora.snapshotter.storage`, which owns keys, kinds, parents,
labels and crash safety): the interplay with the :class:`~remora.snapshotter.remote.RemoteLayerHandler`.
That is stargz-snapshotter's split too (its ``snapshot/snapshot.go`` does the handshake inside the
snapshotter, its ``fs/`` only mounts):

* Prepare with ``containerd.io/snapshot.ref`` and remora annotations offers the new active snapshot
  to the handler; mounted → committed under the target name, answered with ``AlreadyExists``;
  declined or failed → ordinary mounts (containerd applies the layer itself); refused
  (:class:`RemoteLayerRefused`) → the snapshot is removed and Prepare fails (no fallback).
* Mounts handed out for a snapshot stacked on lazy layers are checked first: a dead filesystem is
  restored by the handler or reported as ``LayerUnavailable`` instead of a container start that hangs.
* Remove releases a remote layer's mount before its directory goes.
* Start of a run (:meth:`recover`, :meth:`restore`): detach mounts nobody owns, remove orphans, hand
  every remote snapshot to the handler to adopt or re-mount (stargz's ``restoreRemoteSnapshot``).

Threads: writes (which fsync) and directory walks run in worker threads; point reads (Stat, Mounts:
one indexed SELECT on a WAL reader, ~0.1 ms) run on the caller's event loop, which saves the thread
hand-off that would otherwise dominate their latency.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from remora.errors import AlreadyExists, NotFound, RemoraError, StorageError
from remora.mounts import detach_mount, mountpoints_under

from . import overlay
from .remote import TARGET_REF_LABEL, RemoteLayer, RemoteLayerHandler, RemoteLayerRefused, is_remote_candidate
from .storage import FailedPrecondition, Info, Kind, Snapshot, SnapshotStore, Usage, remove_tree

log = logging.getLogger(__name__)

T = TypeVar("T")


def namespace_of_key(key: str) -> str | None:
    """The containerd namespace in a backend key: containerd's metadata layer names every snapshot it
    asks a snapshotter for ``<namespace>/<sequence>/<key>``. containerd 1.6 sends no
    ``containerd-namespace`` header to proxy snapshotters, so this is where the handler learns the
    namespace (cache isolation) then; None for a key of another shape."""
    ns, sep, rest = key.partition("/")
    seq, sep2, _ = rest.partition("/")
    return ns if sep and sep2 and ns and seq.isdigit() else None


class Unimplemented(RemoraError):
    """A request for a feature this snapshotter does not have (gRPC UNIMPLEMENTED)."""


async def _thread(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kw)


class Snapshotter:
    """containerd's Snapshotter over a :class:`SnapshotStore`, with lazy layers through ``handler``.

    The store is the caller's: :meth:`close` closes it and the handler (containerd's ``Close``).
    """

    def __init__(self, store: SnapshotStore, handler: RemoteLayerHandler | None = None):
        self.store = store
        self.handler = handler or RemoteLayerHandler()

    # -- reads ------------------------------------------------------------------------------------
    async def stat(self, key: str) -> Info:
        return self.store.stat(key)

    async def usage(self, key: str) -> Usage:
        """Committed: as recorded at commit; active: the upper directory walked now (in a thread)."""
        return await _thread(self.store.usage, key)

    async def mounts(self, key: str) -> list[overlay.Mount]:
        """The mounts of an active or view snapshot, after the liveness check of its lazy layers."""
        return await self._checked_mounts(self.store.snapshot(key))

    async def walk(self, filters: Sequence[str] = ()) -> list[Info]:
        """Every snapshot matching containerd's filters (:mod:`remora.snapshotter.filters`: OR over
        the strings, AND within one); a bad filter raises ``InvalidInput`` before anything is returned."""
        return await _thread(lambda: list(self.store.walk(list(filters))))

    # -- writes -----------------------------------------------------------------------------------
    async def update(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str] = ()) -> Info:
        """Only labels are mutable: no paths or ``labels`` replace all, ``labels.K`` sets or deletes one."""
        return await _thread(self.store.update, name, dict(labels), list(fieldpaths))

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None, *,
                      namespace: str | None = None) -> list[overlay.Mount]:
        """An active snapshot on ``parent``, or the remote handshake.

        Raises ``AlreadyExists`` when the label ``containerd.io/snapshot.ref`` names a snapshot that
        exists already or that the handler just mounted and this call committed under that name:
        containerd then Stats the target and skips the layer. ``namespace`` is only handed to the
        handler (the store is namespace-agnostic, as containerd's metadata layer namespaces keys).
        """
        labels = dict(labels or {})
        remote = is_remote_candidate(labels)
        target = labels.get(TARGET_REF_LABEL, "")
        namespace = namespace or namespace_of_key(key)
        if remote and self._exists(target):
            await self._may_share(target, namespace, labels)
            raise AlreadyExists(f"target snapshot {target!r} already exists")
        snap = await _thread(self.store.create, Kind.ACTIVE, key, parent, labels)
        if remote and await self._prepare_remote(key, parent, namespace, snap.id, target, labels):
            raise AlreadyExists(f"target snapshot {target!r} already exists")
        return await self._checked_mounts(snap)

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[overlay.Mount]:
        """A read-only snapshot of ``parent``."""
        snap = await _thread(self.store.create, Kind.VIEW, key, parent, dict(labels or {}))
        return await self._checked_mounts(snap)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None, *, parent: str = "") -> None:
        """Commit the active ``key`` as ``name``. ``parent`` (containerd 2.0's rebase-on-commit) is
        accepted only when it is the snapshot's own parent: there is no rebase."""
        if parent:
            info = self.store.stat(key)
            if parent != info.parent:
                raise Unimplemented(f"commit of {key} onto a different parent ({parent}) "
                                    "is not supported (no rebase)")
        await _thread(self.store.commit, name, key, dict(labels or {}))

    async def remove(self, key: str) -> None:
        """Delete ``key`` (not one with children); a remote layer is unmounted before its directory
        goes. A directory that cannot be deleted now is left to :meth:`cleanup` (the row is gone)."""
        removed = await _thread(self.store.remove, key)
        if removed.remote:
            await self._release(removed.id)
        try:
            await _thread(remove_tree, removed.path)
        except (OSError, StorageError) as exc:
            log.warning("remove %s: directory %s left for cleanup: %s", key, removed.path, exc)

    async def cleanup(self) -> list[Path]:
        """containerd's ``Cleaner``: delete directories no snapshot references; returns them."""
        removed = await _thread(self.store.cleanup)
        if removed:
            log.info("cleanup removed %d orphaned snapshot directories", len(removed))
        return removed

    async def close(self) -> None:
        """Stop the handler's background work and close the store. Lazy mounts stay: containers use them."""
        await self.handler.close()
        self.store.close()

    # -- start of a run ---------------------------------------------------------------------------
    async def recover(self) -> None:
        """Detach what a crashed predecessor left mounted under the root, except remote snapshots'
        mounts (lazy mounts outlive the snapshotter on purpose: running containers use them as lower
        layers; :meth:`restore` adopts or re-mounts them), then remove orphaned directories."""
        await _thread(self._recover)

    def _recover(self) -> None:
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

    async def restore(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Hand every remote snapshot of the store to the handler to adopt or re-mount.

        ``progress(done, total)`` is called before the first and after each one (the server reports
        a slow restore while it does not listen yet). A failure is logged, not raised: the snapshot
        stays, containers using it fail until the handler can restore it."""
        remote = await _thread(self.store.remote_snapshots)
        if remote and type(self.handler) is RemoteLayerHandler:
            log.error("%d lazily mounted snapshots cannot be restored without a remote-layer handler "
                      "(started with --no-lazy?): containers using them will fail until it is enabled",
                      len(remote))
            return
        if progress:
            progress(0, len(remote))
        for done, (sid, key, labels) in enumerate(remote, 1):
            try:
                await self.handler.restore(sid, self.store.fs_path(sid), labels)
            except Exception as exc:  # noqa: BLE001 - one layer's failure must not stop the others' restore
                log.error("remote snapshot %s (%s) could not be restored: %s", key, sid, exc)
            if progress:
                progress(done, len(remote))

    # -- the remote handshake ---------------------------------------------------------------------
    def _exists(self, name: str) -> bool:
        try:
            self.store.stat(name)
            return True
        except NotFound:
            return False

    async def _may_share(self, target: str, namespace: str | None, labels: dict[str, str]) -> None:
        """The handler's say (``may_share``, optional) before an existing remote snapshot answers a Prepare:
        the target name is global, so this Prepare may come from another namespace than the one the
        layer was mounted for (cache isolation, see snapshotter/isolation.py). Refused: FAILED_PRECONDITION."""
        check = getattr(self.handler, "may_share", None)
        if check is None:
            return
        sid = next((i for i, k, _ in await _thread(self.store.remote_snapshots) if k == target), None)
        if sid is None:
            return
        try:
            await check(sid, namespace, labels)
        except RemoteLayerRefused as exc:
            log.warning("remote layer %s: %s", target, exc)
            raise FailedPrecondition(str(exc)) from None

    async def _prepare_remote(self, key: str, parent: str, namespace: str | None, sid: str, target: str,
                              labels: dict[str, str]) -> bool:
        """Offer the layer to the handler; True when it is mounted and committed as ``target``."""
        layer = RemoteLayer(snapshot_id=sid, mountpoint=self.store.fs_path(sid), key=key, target=target,
                            parent=parent, namespace=namespace, labels=labels)
        try:
            if not await self.handler.mount(layer):
                return False
        except RemoteLayerRefused as exc:  # no local fallback: the Prepare fails, the snapshot goes
            log.warning("remote layer %s: %s", target, exc)
            await self._release(sid)
            await self._drop(key)
            raise FailedPrecondition(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any other failure: the layer is pulled the ordinary way
            log.warning("remote layer %s: mount failed, falling back to a local layer: %s", target, exc)
            return False
        try:
            await _thread(self.store.commit, target, key, labels, usage=Usage(), remote=True)
            log.info("remote layer %s mounted lazily (snapshot %s)", target, sid)
            return True
        except AlreadyExists:
            # Someone committed the same chain ID meanwhile: theirs wins, ours goes away.
            await self._release(sid)
            await self._drop(key)
            return True
        except Exception as exc:  # noqa: BLE001 - as above: fall back, never leave a half-made snapshot
            log.warning("remote layer %s: commit failed, falling back to a local layer: %s", target, exc)
            await self._release(sid)
            return False

    async def _drop(self, key: str) -> None:
        removed = await _thread(self.store.remove, key)
        await _thread(remove_tree, removed.path)

    async def _release(self, sid: str) -> None:
        try:
            await self.handler.unmount(sid, self.store.fs_path(sid))
        except Exception as exc:  # noqa: BLE001 - best effort: the snapshot goes whatever the handler says
            log.warning("remote layer of snapshot %s: unmount failed: %s", sid, exc)

    async def _checked_mounts(self, snap: Snapshot) -> list[overlay.Mount]:
        """Mounts of ``snap``, after checking that every lazily mounted layer below it is alive."""
        chain = set(snap.parent_ids)
        if chain:
            for sid, _, _ in await _thread(self.store.remote_snapshots):
                if sid in chain:
                    await self.handler.ensure_healthy(sid, self.store.fs_path(sid))
        return overlay.mounts_for(snap, self.store.fs_path, self.store.work_path)
