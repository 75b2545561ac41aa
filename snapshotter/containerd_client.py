"""A minimal containerd client over gRPC: just what ``remora pull`` needs.

Why not shell out to ``ctr``: ``ctr images pull`` cannot trigger a remote snapshot (it sends no
labels to the snapshotter, see docs/snapshotter.md), and nothing else in a Debian 12 install can. So
``remora pull`` talks to containerd's own services, the way containerd's Go client does:

* **content** (``containerd.services.content.v1``): store the manifest and config, with the GC
  labels that keep an image's pieces alive (``containerd.io/gc.ref.content.*``,
  ``containerd.io/gc.ref.snapshot.<snapshotter>``);
* **snapshots** (``containerd.services.snapshots.v1`` served by containerd itself, the request names
  the snapshotter): ``Prepare`` with ``containerd.io/snapshot.ref``, to which a remote snapshotter
  answers ALREADY_EXISTS once the layer is mounted;
* **images** (``containerd.services.images.v1``): the image record (name -> manifest descriptor);
* **leases** (``containerd.services.leases.v1``): everything above is created under a lease, so
  containerd's garbage collector cannot remove a half-pulled image's pieces before the image record
  references them. The lease expires by itself (``containerd.io/gc.expire``) if we die mid-pull.

Every call carries the ``containerd-namespace`` header (and ``containerd-lease`` inside a lease)
and a deadline; gRPC failures become :mod:`remora.errors` exceptions naming the call and carrying
containerd's message.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import secrets
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from remora.errors import AlreadyExists, InvalidInput, NotFound, RemoraError, StorageError, UsageError

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
GC_EXPIRE_LABEL = "containerd.io/gc.expire"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"


class Unavailable(UsageError):
    """containerd, or the proxy snapshotter behind it, cannot be reached (gRPC UNAVAILABLE)."""


_CODES = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.FAILED_PRECONDITION: StorageError,
    grpc.StatusCode.UNIMPLEMENTED: UsageError,
}


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    parent: str
    kind: int
    labels: dict[str, str]


def _check_socket(address: str) -> None:
    """Fail fast and clearly when containerd is not there (gRPC would only say UNAVAILABLE)."""
    path = Path(address)
    if not path.exists():
        raise UsageError(f"containerd socket {address} does not exist: is containerd running? "
                         "(pass its socket with --address)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        s.connect(os.fspath(path))
    except PermissionError:
        raise UsageError(f"permission denied on containerd socket {address} (run as root)") from None
    except OSError as exc:
        raise UsageError(f"cannot connect to containerd at {address}: {exc.strerror or exc}: "
                         "is containerd running?") from None
    finally:
        s.close()


class ContainerdClient:
    """containerd's content, images, leases and snapshots services on ``address`` in ``namespace``.

    ``timeout`` bounds every call (seconds). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, address: str | Path = DEFAULT_ADDRESS, namespace: str = "default", timeout: float = 60.0):
        from remora._proto.containerd.services.content.v1 import content_pb2_grpc
        from remora._proto.containerd.services.images.v1 import images_pb2_grpc
        from remora._proto.containerd.services.leases.v1 import leases_pb2_grpc
        from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc

        self.address = str(address)
        self.namespace = namespace
        self.timeout = timeout
        self.lease: str | None = None
        _check_socket(self.address)
        self._channel = grpc.insecure_channel(f"unix://{self.address}",
                                              options=[("grpc.max_receive_message_length", 64 << 20)])
        self._content = content_pb2_grpc.ContentStub(self._channel)
        self._images = images_pb2_grpc.ImagesStub(self._channel)
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)

    # -- plumbing -----------------------------------------------------------------------------
    def _metadata(self) -> list[tuple[str, str]]:
        md = [(NAMESPACE_HEADER, self.namespace)]
        if self.lease:
            md.append((LEASE_HEADER, self.lease))
        return md

    def _call(self, what: str, fn, request):
        try:
            return fn(request, metadata=self._metadata(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._error(what, e) from None

    def _error(self, what: str, e: grpc.RpcError) -> RemoraError:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"containerd {what}: UNAVAILABLE: {e.details()}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return StorageError(f"containerd {what}: no answer within {self.timeout:.0f}s")
        cls = _CODES.get(code, StorageError)
        return cls(f"containerd {what}: {code.name}: {e.details()}")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- leases -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def leased(self, expire: float = 3600.0) -> Iterator[str]:
        """Create a lease, send it with every call inside the block, delete it afterwards.

        The lease carries ``containerd.io/gc.expire`` so that a process killed mid-pull does not pin
        content and snapshots forever.
        """
        from remora._proto.containerd.services.leases.v1 import leases_pb2 as pb

        until = _dt.datetime.now(_dt.UTC) + _dt.timedelta(seconds=expire)
        labels = {GC_EXPIRE_LABEL: until.strftime("%Y-%m-%dT%H:%M:%SZ")}
        lease_id = f"remora-pull-{secrets.token_hex(6)}"
        resp = self._call("lease create", self._leases.Create, pb.CreateRequest(id=lease_id, labels=labels))
        self.lease = resp.lease.id
        try:
            yield self.lease
        finally:
            held, self.lease = self.lease, None
            try:
                self._call("lease delete", self._leases.Delete, pb.DeleteRequest(id=held))
            except RemoraError:
                pass  # it expires by itself

    # -- content ------------------------------------------------------------------------------
    def content_info(self, digest: str):
        """The content ``Info`` (digest, size, labels) or None if containerd does not have it."""
        from remora._proto.containerd.services.content.v1 import content_pb2 as pb

        try:
            return self._call("content info", self._content.Info, pb.InfoRequest(digest=digest)).info
        except NotFound:
            return None

    def write_content(self, digest: str, data: bytes, labels: Mapping[str, str] | None = None) -> bool:
        """Store ``data`` (verified by containerd against ``digest``) with ``labels``.

        Returns True if written, False if containerd already had it (its labels are then updated).
        """
        from remora._proto.containerd.services.content.v1 import content_pb2 as pb

        labels = dict(labels or {})
        req = pb.WriteContentRequest(action=pb.COMMIT, ref=f"remora-{digest}", total=len(data), expected=digest,
                                     offset=0, data=data, labels=labels)
        try:
            responses = self._content.Write(iter([req]), metadata=self._metadata(), timeout=self.timeout)
            for resp in responses:
                if resp.action == pb.COMMIT and resp.digest and resp.digest != digest:
                    raise InvalidInput(f"containerd committed {resp.digest}, expected {digest}")
            return True
        except grpc.RpcError as e:
            err = self._error(f"content write {digest}", e)
            if not isinstance(err, AlreadyExists):
                raise err from None
        if labels:
            self.update_content_labels(digest, labels)
        return False

    def update_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        """Set (only) these labels on existing content, leaving its other labels alone."""
        from google.protobuf import field_mask_pb2

        from remora._proto.containerd.services.content.v1 import content_pb2 as pb

        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        self._call("content update", self._content.Update,
                   pb.UpdateRequest(info=pb.Info(digest=digest, labels=dict(labels)), update_mask=mask))

    # -- snapshots ----------------------------------------------------------------------------
    def prepare(self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]) -> list:
        """Prepare an active snapshot; returns its mounts. Raises :class:`AlreadyExists` when the
        snapshotter reports the target (``containerd.io/snapshot.ref``) as already there."""
        from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

        req = pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels))
        return list(self._call(f"prepare snapshot {key!r} on {snapshotter}", self._snapshots.Prepare, req).mounts)

    def stat(self, snapshotter: str, key: str) -> SnapshotInfo | None:
        from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

        try:
            info = self._call(f"stat snapshot {key!r}", self._snapshots.Stat,
                              pb.StatSnapshotRequest(snapshotter=snapshotter, key=key)).info
        except NotFound:
            return None
        return SnapshotInfo(info.name, info.parent, int(info.kind), dict(info.labels))

    def remove(self, snapshotter: str, key: str) -> None:
        from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

        try:
            self._call(f"remove snapshot {key!r}", self._snapshots.Remove,
                       pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key))
        except NotFound:
            pass

    # -- images -------------------------------------------------------------------------------
    def get_image(self, name: str):
        from remora._proto.containerd.services.images.v1 import images_pb2 as pb

        try:
            return self._call(f"get image {name}", self._images.Get, pb.GetImageRequest(name=name)).image
        except NotFound:
            return None

    def put_image(self, name: str, media_type: str, digest: str, size: int,
                  labels: Mapping[str, str] | None = None) -> None:
        """Create the image record ``name`` -> target, or point an existing one at the new target."""
        from google.protobuf import field_mask_pb2

        from remora._proto.containerd.services.images.v1 import images_pb2 as pb
        from remora._proto.containerd.types import descriptor_pb2

        image = pb.Image(name=name, labels=dict(labels or {}),
                         target=descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size))
        try:
            self._call(f"create image {name}", self._images.Create, pb.CreateImageRequest(image=image))
        except AlreadyExists:
            paths = ["target"] + [f"labels.{k}" for k in (labels or {})]
            self._call(f"update image {name}", self._images.Update,
                       pb.UpdateImageRequest(image=image, update_mask=field_mask_pb2.FieldMask(paths=paths)))

    def delete_image(self, name: str) -> None:
        from remora._proto.containerd.services.images.v1 import images_pb2 as pb

        try:
            self._call(f"delete image {name}", self._images.Delete, pb.DeleteImageRequest(name=name))
        except NotFound:
            pass
