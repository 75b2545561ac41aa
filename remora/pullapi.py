"""The thin client of the snapshotter's pull service (:mod:`remora.snapshotter.pull_service`), and the
protocol's names both sides share.

It lives in the core because two components call it: ``remora pull`` (snapshotter/pull.py) and the
peer's preheat with ``"pull": true`` (plugins/peer/preheat.py: after the blobs, the node's container
runtime gets the image, so a kubelet with ``imagePullPolicy: IfNotPresent`` starts it without a pull).
Components reach each other only through the core.

Standard library only, and not even http.client (its email/ssl imports cost ~30 ms, a tenth of what
this path saves): HTTP/1.1 to our own server is a request line, headers, and a chunked body. This
module is what ``remora pull`` imports on its fast path; nothing here may import gRPC, protobuf,
requests or any remora module that does.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Callable
from typing import NamedTuple

from remora.errors import ServiceUnavailable  # standard library only itself

DEFAULT_API_ADDRESS = "/run/remora/api.sock"
API_PULL_PATH = "/v1/pull"
API_VERSION_PATH = "/v1/version"
NDJSON = "application/x-ndjson"


class PullResult(NamedTuple):
    """What a pull did; the pull service sends it as ``{"result": PullResult._asdict()}``.

    A NamedTuple, not a dataclass: this module is imported on every ``remora pull``, also on the
    thin path, and ``dataclasses`` pulls in ``inspect`` (~10 ms of a cold start)."""

    name: str
    manifest_digest: str
    chain_ids: list[str]
    remote_layers: int
    reused_layers: int
    seconds: float


class NoService(ServiceUnavailable):
    """Nothing serves the pull API at that socket (the reason is the message): pull in-process."""


def service_request(args: argparse.Namespace) -> dict:
    """The ``POST /v1/pull`` body for these arguments (paths absolute: the service has its own cwd)."""
    return {"reference": args.image, "address": os.path.abspath(args.address), "namespace": args.namespace,
            "snapshotter": args.snapshotter, "plain_http": args.plain_http,
            "annotations_only": args.annotations_only, "platform": args.platform, "timeout": args.timeout}


def pull_via_service(api: str, request: dict, say: Callable[[str], None], read_timeout: float = 180.0) -> PullResult:
    """Have the snapshotter's pull service at ``api`` do the pull; relay its progress to ``say``.

    Raises :class:`NoService` if nothing accepts the connection (the caller pulls in-process), and
    a :class:`remora.errors.RemoraError` with the service's message and exit code if the service
    reports an error or dies mid-pull: once the service answered, its outcome is THE outcome (a
    local retry could race the pull the service is still finishing).
    """
    from remora.errors import RemoraError

    def failed(message: str, exit_code: int = 7) -> RemoraError:
        exc = RemoraError(message)
        exc.exit_code = exit_code
        return exc

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(api)
    except OSError as exc:
        sock.close()
        raise NoService(exc.strerror or str(exc)) from None
    gone = (f"the pull service at {api} stopped answering before the pull finished (see the snapshotter's "
            "log); the image may be partly pulled: pull it again")
    try:
        sock.settimeout(read_timeout)  # between two progress lines: at most one containerd call
        body = json.dumps(request).encode()
        sock.sendall(f"POST {API_PULL_PATH} HTTP/1.1\r\nHost: remora\r\nContent-Type: application/json\r\n"
                     f"Accept: {NDJSON}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                     + body)
        stream = sock.makefile("rb")
        status, headers = _read_head(stream)
        lines = _ndjson(_read_body(stream, headers))
        if status != 200:
            text = b"".join(lines)
            try:
                err = json.loads(text)["error"]
                raise failed(err["message"], int(err["exit_code"]))
            except (ValueError, KeyError, TypeError):
                raise failed(f"the pull service at {api} answered HTTP {status}: {text[:300]!r}") from None
        for line in lines:
            msg = json.loads(line)
            if "status" in msg:
                say(str(msg["status"]))
            elif "result" in msg:
                return PullResult(*(msg["result"][f] for f in PullResult._fields))
            elif "error" in msg:
                err = msg["error"]
                raise failed(str(err["message"]), int(err["exit_code"]))
        raise failed(gone)
    except (ValueError, KeyError, TypeError) as exc:
        raise failed(f"the pull service at {api} sent something that is not its protocol ({exc}): "
                     "is it an older or newer remora? see the snapshotter's log") from None
    except OSError as exc:  # reset, timeout, or a response cut short
        raise failed(f"{gone} ({exc})") from None
    finally:
        sock.close()


def _read_head(stream) -> tuple[int, dict[str, str]]:
    """Status code and headers (names lower-cased) of an HTTP/1.x response."""
    line = stream.readline(8192)
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ConnectionError(f"not an HTTP response: {line[:100]!r}")
    headers: dict[str, str] = {}
    while True:
        h = stream.readline(8192)
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _read_body(stream, headers: dict[str, str]):
    """The body's bytes as they arrive: chunked, Content-Length, or up to EOF."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = stream.readline(1024)
            if not size_line:
                raise ConnectionError("chunked body cut short")
            size = int(size_line.split(b";")[0], 16)  # ValueError: not our protocol
            if size == 0:
                return
            data = stream.read(size)
            if len(data) < size or stream.readline(8) not in (b"\r\n", b"\n"):
                raise ConnectionError("chunked body cut short")
            yield data
    elif "content-length" in headers:
        n = int(headers["content-length"])
        data = stream.read(n)
        if len(data) < n:
            raise ConnectionError("body cut short")
        yield data
    else:
        while data := stream.read1(65536):
            yield data


def _ndjson(pieces):
    """Complete lines from a stream of byte pieces (a line may span pieces); a last unterminated one too."""
    buf = b""
    for piece in pieces:
        buf += piece
        *complete, buf = buf.split(b"\n")
        yield from (line for line in complete if line.strip())
    if buf.strip():
        yield buf
