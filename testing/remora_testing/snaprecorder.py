"""A transparent recording proxy for containerd's snapshots API, to see what each client sends.

Why: whether a pull can take remora's remote path depends entirely on the labels containerd puts on
``Prepare`` (``containerd.io/snapshot.ref``, the ``cri.*`` labels, layer annotations under
``containerd.io/snapshot/``), and those differ per client and version (ctr 1.6, Transfer service,
CRI, moby). Put this between containerd's proxy plugin and ANY snapshotter socket: every RPC is
forwarded byte for byte (status codes such as ALREADY_EXISTS included), and each ``Prepare`` is
recorded with its containerd namespace, key and labels.

Example::

    with SnapshotRecorder(short_dir / "rec.sock", snap.address) as rec, \\
            PrivateContainerd2(tmp / "ctd", rec.address) as ctd:
        ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "remora", ref)
        labels = rec.take(ctd.namespace)[0].labels
"""
from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

SERVICE = "/containerd.services.snapshots.v1.Snapshots/"


@dataclass(frozen=True)
class PrepareCall:
    namespace: str  # containerd namespace the call was made in
    key: str
    parent: str
    labels: dict[str, str]


class SnapshotRecorder(grpc.GenericRpcHandler):
    """Serve the snapshots API on ``address`` by forwarding to ``upstream``; record every Prepare."""

    def __init__(self, address: Path | str, upstream: Path | str, timeout: float = 120.0):
        self.address, self.upstream, self.timeout = Path(address), Path(upstream), timeout
        self._calls: list[PrepareCall] = []
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._server: grpc.Server | None = None

    def start(self) -> SnapshotRecorder:
        self._channel = grpc.insecure_channel(f"unix://{self.upstream}")
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[self])
        if not self._server.add_insecure_port(f"unix://{self.address}"):
            self.stop()
            raise OSError(f"cannot listen on {self.address}")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.stop(1).wait()
            self._server = None
        if self._channel:
            self._channel.close()
            self._channel = None

    def take(self, namespace: str | None = None) -> list[PrepareCall]:
        """Remove and return the Prepare calls recorded so far (of one containerd namespace, if given)."""
        taken, kept = [], []
        with self._lock:
            for call in self._calls:
                (taken if namespace is None or call.namespace == namespace else kept).append(call)
            self._calls = kept
        return taken

    def _record(self, request: bytes, metadata) -> None:
        from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2

        req = snapshots_pb2.PrepareSnapshotRequest.FromString(request)
        # containerd's metadata layer names backend keys "<namespace>/<seq>/<key>"; the namespace
        # header is not sent by every version (1.6 omits it for some callers), the key prefix always is.
        ns = req.key.split("/", 1)[0] if "/" in req.key else dict(metadata).get("containerd-namespace", "")
        with self._lock:
            self._calls.append(PrepareCall(ns, req.key, req.parent, dict(req.labels)))

    def service(self, details):  # grpc.GenericRpcHandler: called once per incoming RPC
        method = details.method
        if not method.startswith(SERVICE):
            return None
        if method == SERVICE + "List":  # the one server-streaming RPC
            upstream_stream = self._channel.unary_stream(method)

            def stream(request, context):
                try:
                    yield from upstream_stream(request, metadata=context.invocation_metadata(),
                                               timeout=self.timeout)
                except grpc.RpcError as e:
                    context.abort(e.code(), e.details())
            return grpc.unary_stream_rpc_method_handler(stream)

        upstream_unary = self._channel.unary_unary(method)

        def unary(request, context):
            metadata = context.invocation_metadata()
            if method == SERVICE + "Prepare":
                self._record(request, metadata)
            try:
                return upstream_unary(request, metadata=metadata, timeout=self.timeout)
            except grpc.RpcError as e:
                context.abort(e.code(), e.details())
        return grpc.unary_unary_rpc_method_handler(unary)

    def __enter__(self) -> SnapshotRecorder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
