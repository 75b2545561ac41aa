"""A minimal CRI ImageService client: pull, inspect, list and remove images the way kubelet does.

Why: the CRI plugin is the path Kubernetes takes, and it is the one client of containerd 1.6 that
passes the ``containerd.io/snapshot/cri.*`` labels to a proxy snapshotter (``ctr images pull`` passes
none). There is no crictl package on Debian 12, so tests drive containerd's CRI socket (the main gRPC
socket; CRI registers ``runtime.v1.ImageService`` there) with this client. The messages come from
``protos/cri/runtime/v1/api.proto``, the published ``runtime.v1`` package trimmed to ImageService.

Example::

    with CRIImageClient(ctd.address) as cri:
        image_id = cri.pull(f"{registry.host}/app:1")
        assert cri.status(image_id).size > 0
"""
from __future__ import annotations

from pathlib import Path

import grpc

from remora.errors import AuthError, NotFound, RegistryError, UsageError

_CODES = {grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.UNAUTHENTICATED: AuthError,
          grpc.StatusCode.PERMISSION_DENIED: AuthError, grpc.StatusCode.INVALID_ARGUMENT: UsageError,
          grpc.StatusCode.UNIMPLEMENTED: UsageError}


class CRIImageClient:
    """``runtime.v1.ImageService`` over containerd's unix socket ``address``.

    Every call takes ``timeout`` seconds at most; a gRPC failure becomes a RemoraError naming the call
    and carrying containerd's message (UNIMPLEMENTED usually means the CRI plugin is disabled).
    """

    def __init__(self, address: Path | str, timeout: float = 120.0):
        from remora._proto.cri.runtime.v1 import api_pb2, api_pb2_grpc

        self.address = str(address)
        self.timeout = timeout
        self._pb = api_pb2
        self._channel = grpc.insecure_channel(f"unix://{self.address}")
        self._stub = api_pb2_grpc.ImageServiceStub(self._channel)

    def _call(self, name: str, request):
        try:
            return getattr(self._stub, name)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            cls = _CODES.get(e.code(), RegistryError)
            raise cls(f"CRI {name} on {self.address}: {e.code().name}: {e.details()}") from None

    def pull(self, image: str, *, username: str = "", password: str = "",
             annotations: dict[str, str] | None = None) -> str:
        """PullImage; returns the image reference containerd reports (the image ID, ``sha256:…``)."""
        pb = self._pb
        req = pb.PullImageRequest(image=pb.ImageSpec(image=image, annotations=annotations or {}))
        if username or password:
            req.auth.CopyFrom(pb.AuthConfig(username=username, password=password))
        return self._call("PullImage", req).image_ref

    def status(self, image: str):
        """ImageStatus: the ``runtime.v1.Image`` (id, repo_tags, repo_digests, size), or None if absent."""
        pb = self._pb
        resp = self._call("ImageStatus", pb.ImageStatusRequest(image=pb.ImageSpec(image=image)))
        return resp.image if resp.HasField("image") else None

    def list(self, image: str = "") -> list:
        """ListImages, optionally filtered to one reference."""
        pb = self._pb
        req = pb.ListImagesRequest()
        if image:
            req.filter.image.image = image
        return list(self._call("ListImages", req).images)

    def remove(self, image: str) -> None:
        """RemoveImage (idempotent: removing an absent image succeeds)."""
        pb = self._pb
        self._call("RemoveImage", pb.RemoveImageRequest(image=pb.ImageSpec(image=image)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CRIImageClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
