"""A CRI gRPC pass-through that records each image pull's credentials for the snapshotter.

Why: kubelet sends a pod's imagePullSecrets to the runtime in ``PullImageRequest.auth``; containerd
uses them for its own fetches but passes nothing to a proxy snapshotter, so the lazy mount of a
private remora image finds no credentials. kubelet is pointed at this proxy instead
(``--image-service-endpoint unix:///run/remora/cri.sock``); the proxy stores the pull's auth in the
snapshotter's :class:`~.store.CredentialStore`, scoped to the pulled repository, *before* it forwards
the call to containerd, so the remote-snapshot Prepares that the pull causes find them.

Every other call (all of ImageService, and RuntimeService too if kubelet uses one endpoint for both)
is forwarded byte for byte, whatever its method or streaming kind: gRPC frames unary and streaming
calls alike, so one stream-stream pass-through serves them all, including methods this proxy has
never heard of. Status codes, details and deadlines go through unchanged.

The socket is created 0600 (root): whoever can talk to it can make the node pull images.
"""
from __future__ import annotations

import base64
import logging
import os
import shutil
import tempfile
from concurrent import futures
from pathlib import Path

import grpc

from remora.errors import UsageError
from remora.registry.auth import Credentials

from .store import CredentialStore, scope_of

log = logging.getLogger(__name__)

PULL_METHODS = frozenset({"/runtime.v1.ImageService/PullImage", "/runtime.v1alpha2.ImageService/PullImage"})
MAX_MESSAGE = 64 << 20  # kubelet allows 16 MiB; ListImages/ListContainers on a busy node get large
_GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
SOURCE = "CRI PullImage auth (imagePullSecrets)"


def credentials_from_auth(auth) -> Credentials | None:
    """A CRI ``AuthConfig`` as :class:`Credentials` (None when it carries nothing usable).

    ``username``/``password`` win, then ``auth`` (base64 ``user:password``), then ``identity_token``.
    A bare ``registry_token`` (a bearer token for the registry itself) is not supported by remora's
    registry client: it is ignored with a warning, and the lazy mount then reports missing credentials.
    """
    if auth.username and auth.password:
        return Credentials(username=auth.username, password=auth.password, source=SOURCE)
    if auth.auth:
        try:
            user, sep, password = base64.b64decode(auth.auth, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            log.warning("CRI PullImage: the auth field is not base64 'user:password'; ignored")
            user, sep, password = "", "", ""
        if sep and user:
            return Credentials(username=user, password=password, source=SOURCE)
    if auth.identity_token:
        return Credentials(username=auth.username or None, identity_token=auth.identity_token, source=SOURCE)
    if auth.registry_token:
        log.warning("CRI PullImage: a registry_token is not supported for lazy pulls; nothing captured")
    return None


class CRIProxy:
    """Serve ``listen`` (a unix socket path), forward to ``upstream`` (containerd's socket path)."""

    def __init__(self, listen: Path | str, upstream: Path | str, store: CredentialStore, workers: int = 32):
        self.listen = Path(listen)
        self.upstream = str(upstream)
        self.store = store
        self.captured = 0
        self._channel = grpc.insecure_channel(f"unix://{self.upstream}", options=_GRPC_OPTIONS)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cri-proxy"),
                                   handlers=[_PassThrough(self)], options=_GRPC_OPTIONS)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> CRIProxy:
        _bind_private(self._server, self.listen)
        self._server.start()
        log.info("CRI proxy on %s -> %s (PullImage credentials go to the snapshotter)", self.listen, self.upstream)
        return self

    def stop(self, grace: float = 2.0) -> None:
        self._server.stop(grace).wait(grace + 1)
        self._channel.close()
        try:
            if self.listen.is_socket():
                self.listen.unlink()
        except OSError:
            pass

    def __enter__(self) -> CRIProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- calls --------------------------------------------------------------------------------------
    def capture(self, request: bytes):
        """Store the credentials of a serialized PullImageRequest; never fails the pull. Returns an
        undo (restore what the scope held before) for a pull that then fails, or None."""
        from remora._proto.cri.runtime.v1 import api_pb2

        try:
            req = api_pb2.PullImageRequest.FromString(request)
        except Exception:  # noqa: BLE001 - containerd will tell kubelet what is wrong with it
            return None
        if not req.HasField("auth") or not req.image.image:
            return None
        creds = credentials_from_auth(req.auth)
        if creds is None:
            return None
        try:
            host, repo = scope_of(req.image.image)
        except UsageError as exc:
            log.info("CRI PullImage of %r: no credentials captured: %s", req.image.image[:300], exc)
            return None
        before = self.store.get(host, repo)
        self.store.put(req.image.image, creds)
        self.captured += 1
        log.info("captured pull credentials for %s/%s (%r)", host, repo, creds)

        def undo() -> None:
            # a failed pull's credentials (maybe wrong) must not replace ones that worked for an earlier pod
            if self.store.get(host, repo) is creds:
                if before is not None:
                    self.store.put(req.image.image, before)
                else:
                    self.store.forget(host, repo)
        return undo

    def pull(self, method: str, request: bytes, context):
        undo = self.capture(request)
        try:
            response, call = self._channel.unary_unary(method).with_call(
                request, timeout=_remaining(context), metadata=_metadata(context))
        except grpc.RpcError as err:
            if undo is not None:
                undo()
            context.abort(err.code(), err.details() or "")
        context.set_trailing_metadata(call.trailing_metadata() or ())
        return response

    def stream(self, method: str, requests, context):
        call = self._channel.stream_stream(method)(requests, timeout=_remaining(context), metadata=_metadata(context))
        context.add_callback(call.cancel)  # kubelet gave up: so does the upstream call
        try:
            yield from call
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED or context.is_active():
                context.abort(err.code(), err.details() or "")
        context.set_trailing_metadata(call.trailing_metadata() or ())


class _PassThrough(grpc.GenericRpcHandler):
    """Every method: raw bytes in, raw bytes out (no (de)serializers), PullImage seen on the way."""

    def __init__(self, proxy: CRIProxy):
        self.proxy = proxy

    def service(self, details):
        method = details.method
        if method in PULL_METHODS:
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self.proxy.pull(method, req, ctx))
        return grpc.stream_stream_rpc_method_handler(lambda reqs, ctx: self.proxy.stream(method, reqs, ctx))


def _remaining(context) -> float | None:
    left = context.time_remaining()
    return left if left is not None and left < 10 * 365 * 86400 else None


def _metadata(context) -> list[tuple[str, str | bytes]]:
    """The caller's metadata minus what gRPC sets itself."""
    return [(k, v) for k, v in (context.invocation_metadata() or ())
            if not k.startswith((":", "grpc-")) and k not in ("user-agent", "content-type", "te")]


def _bind_private(server: grpc.Server, path: Path) -> None:
    """Bind ``server`` to unix socket ``path`` with mode 0600 from the first moment: bound inside a
    private (0700) directory, chmod-ed, then renamed into place, so nobody can connect in between."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.is_socket():
        path.unlink()  # left by a crash
    elif path.exists():
        raise UsageError(f"--cri-proxy {path}: exists and is not a socket")
    if len(str(path)) > 100:
        raise UsageError(f"--cri-proxy {path}: a unix socket path must be under 100 bytes")
    private = Path(tempfile.mkdtemp(prefix=".cri-", dir=path.parent))
    try:
        tmp = private / "s"
        try:
            server.add_insecure_port(f"unix:{tmp}")
        except RuntimeError as exc:
            raise UsageError(f"--cri-proxy {path}: cannot listen: {exc}") from None
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(private, ignore_errors=True)
