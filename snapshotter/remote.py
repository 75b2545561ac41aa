"""The seam between the snapshotter core and lazily mounted remote layers.

The core (:mod:`remora.snapshotter.snapshotter`) owns everything containerd sees: keys, names, parents,
labels, kinds, the commit-under-the-target-name handshake and crash safety. A remote-layer handler
only mounts and unmounts filesystems. The handshake, as containerd 1.6/1.7/2.x and stargz expect it:

1. containerd calls ``Prepare(key, parent, labels)`` whose labels carry
   ``containerd.io/snapshot.ref`` (the chain ID the layer will be committed as) and, for remora
   images, the layer annotations ``containerd.io/snapshot/remora.*``;
2. the core creates the active snapshot ``key`` (a row + an empty ``<root>/snapshots/<id>/fs``) and
   calls :meth:`RemoteLayerHandler.mount` with a :class:`RemoteLayer` describing it;
3. if the handler mounted the layer on ``layer.mountpoint``, the core commits ``key`` under the
   target name with the same labels and parent, marks it remote, and answers ALREADY_EXISTS:
   containerd then Stats the target and skips downloading the layer. If the handler declines
   (returns False) or fails (raises), the core answers with normal overlay mounts and containerd
   downloads and applies the layer itself: a broken remote path costs speed, never correctness;
4. ``unmount`` is called before a remote snapshot's directory is removed, and ``restore`` on
   start for each remote snapshot recorded in the store. The core never detaches a remote
   snapshot's mount at start: lazy mounts outlive the snapshotter (running containers use them
   as lower layers), so ``restore`` must adopt a live mount and re-mount only a dead or missing one.

Committed remote snapshots are lower layers of overlay mounts like any other: children use
``<root>/snapshots/<id>/fs`` (the mountpoint) as a lowerdir.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from remora.errors import RemoraError, ServiceUnavailable

# Set by containerd (unpacker, CRI, ctr-remote, moby) to the chain ID the layer becomes.
TARGET_REF_LABEL = "containerd.io/snapshot.ref"
# Layer annotations with this prefix are passed through as snapshot labels by containerd.
REMORA_LABEL_PREFIX = "containerd.io/snapshot/remora."


def is_remote_candidate(labels: Mapping[str, str]) -> bool:
    """A Prepare worth offering to the handler: it names a target and carries remora annotations."""
    return bool(labels.get(TARGET_REF_LABEL)) and any(k.startswith(REMORA_LABEL_PREFIX) for k in labels)


@dataclass(frozen=True)
class RemoteLayer:
    """One layer to mount lazily.

    ``snapshot_id`` names the directory ``<root>/snapshots/<snapshot_id>``; ``mountpoint`` is its
    empty ``fs`` directory, where the handler mounts the layer's root. ``key`` is containerd's key
    of the active snapshot, ``target`` the name it is committed as, ``parent`` the committed parent
    name ("" for a base layer), ``namespace`` the containerd namespace of the request (None when
    containerd sent none), ``labels`` every label of the Prepare (snapshot.ref, remora.*, cri.*).
    """

    snapshot_id: str
    mountpoint: Path
    key: str
    target: str
    parent: str
    namespace: str | None
    labels: Mapping[str, str]


class RemoteLayerHandler:
    """Interface for lazy mounts; this default declines everything (plain overlay snapshotter)."""

    async def mount(self, layer: RemoteLayer) -> bool:
        """Mount ``layer`` on ``layer.mountpoint``; True if mounted, False if it is not remote.

        Raising also means "not mounted": the core logs it and falls back to a local layer.
        """
        return False

    async def unmount(self, snapshot_id: str, mountpoint: Path) -> None:
        """Release a layer mounted by :meth:`mount` or :meth:`restore` (its snapshot is removed)."""

    async def restore(self, snapshot_id: str, mountpoint: Path, labels: Mapping[str, str]) -> None:
        """After a restart: adopt a committed remote layer's mount if it is still live, else mount
        it again (labels as committed).

        Raising leaves the snapshot in place without a mount: containers using it will fail to start
        until the handler can restore it, which is logged loudly.
        """

    async def ensure_healthy(self, snapshot_id: str, mountpoint: Path) -> None:
        """Raise :class:`LayerUnavailable` if the layer's filesystem is dead or hung and cannot be
        brought back; called before handing out mounts that stack on a remote layer, so containerd gets
        UNAVAILABLE at once instead of a container start that hangs on a dead FUSE mount."""

    async def close(self) -> None:
        """Stop background work; called once when the server shuts down."""


class LayerUnavailable(ServiceUnavailable):
    """A remote layer's filesystem is dead or hung and could not be restored (gRPC UNAVAILABLE)."""


class RemoteLayerRefused(RemoraError):
    """A remote layer that must not fall back to a local one: its Prepare fails with this message.

    A remora bootstrap layer applied as a plain tar gives a root fs holding ``remora/bootstrap.db``,
    not the application, so when it cannot be mounted for a reason a retry will not fix by itself
    (no credentials the registry accepts) the pull fails with a clear error (gRPC FAILED_PRECONDITION)
    and the snapshot is removed: nothing half-mounted is left behind.
    """
