"""A client that tries its luck against the mesh, run INSIDE a lab namespace (the lab's safety rule).

The two-tenant test (tests/plugins/test_two_tenants_netns.py) drives it: one process per namespace and
batch, requests as JSON on stdin, one JSON document of outcomes on stdout. It does nothing clever; it
only reports exactly what came back (status, size, digest, the start of the body), so the test decides
what is a leak.

``python -m remora_testing.netlab.intruder http < [{"url", "method", "headers", "tls"}, ...]``
    ``tls``: absent/None for plain HTTP, else ``{"ca": PEM path, "cert": path, "key": path}`` (cert/key
    optional: a TLS client without a certificate). Hostnames are not checked (lab addresses).
``python -m remora_testing.netlab.intruder scheduler < {"target", "tls", "peer_id", "host_id", "ip",
    "task_id", "upload_port", "announce_task", "content_length", "piece_size"}``
    RegisterPeer, AnnouncePieces (a claim to hold piece 0 of ``announce_task``, default ``task_id``, with
    that layout) and GetParents of ``task_id`` with that
    identity; ``tls`` None means a plaintext channel. Each call's gRPC status, and the parents named.
"""
from __future__ import annotations

import base64
import hashlib
import json
import ssl
import sys
import urllib.error
import urllib.request

#: body bytes returned to the caller in full (enough for any error page; more is hashed only)
KEEP = 1 << 16


def _ssl(tls: dict | None) -> ssl.SSLContext | None:
    if not tls:
        return None
    ctx = ssl.create_default_context(cafile=tls["ca"])
    ctx.check_hostname = False
    if tls.get("cert"):
        ctx.load_cert_chain(tls["cert"], tls["key"])
    return ctx


def http_one(req: dict) -> dict:
    r = urllib.request.Request(req["url"], method=req.get("method", "GET"), headers=req.get("headers") or {})
    out = {"status": 0, "bytes": 0, "sha256": "", "body_b64": "", "error": ""}
    try:
        try:
            resp = urllib.request.urlopen(r, timeout=req.get("timeout", 30), context=_ssl(req.get("tls")))
        except urllib.error.HTTPError as exc:
            resp = exc
        with resp:
            body = resp.read()
            out["status"] = resp.status if hasattr(resp, "status") else resp.code
            out["headers"] = {k.lower(): v for k, v in resp.headers.items()}
    except (OSError, ValueError, urllib.error.URLError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
        return out
    out.update(bytes=len(body), sha256="sha256:" + hashlib.sha256(body).hexdigest(),
               body_b64=base64.b64encode(body[:KEEP]).decode())
    return out


def scheduler(spec: dict) -> dict:
    import grpc

    from remora._proto import remora_scheduler_pb2 as pb
    from remora._proto import remora_scheduler_pb2_grpc as pb_grpc

    tls = spec.get("tls")
    if tls:
        read = lambda key: open(tls[key], "rb").read() if tls.get(key) else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(root_certificates=read("ca"), private_key=read("key"),
                                             certificate_chain=read("cert"))
        channel = grpc.secure_channel(spec["target"], creds)
    else:
        channel = grpc.insecure_channel(spec["target"])
    stub = pb_grpc.SchedulerStub(channel)
    host = pb.PeerHost(peer_id=spec["peer_id"], host_id=spec["host_id"], ip=spec["ip"],
                       upload_port=spec.get("upload_port", 65002))
    calls = [("RegisterPeer", pb.RegisterPeerRequest(host=host)),
             ("AnnouncePieces", pb.AnnouncePiecesRequest(
                 peer_id=spec["peer_id"], task_id=spec.get("announce_task", spec["task_id"]), finished=[0],
                 content_length=spec.get("content_length", 0), piece_size=spec.get("piece_size", 0))),
             ("GetParents", pb.GetParentsRequest(peer_id=spec["peer_id"], task_id=spec["task_id"]))]
    out = {}
    with channel:
        for name, request in calls:
            try:
                resp = getattr(stub, name)(request, timeout=10)
            except grpc.RpcError as exc:
                out[name] = {"code": exc.code().name, "detail": (exc.details() or "")[:200]}
                continue
            got = {"code": "OK"}
            if name == "GetParents":
                got["parents"] = [{"peer_id": p.host.peer_id, "ip": p.host.ip, "port": p.host.upload_port,
                                   "pieces": list(p.pieces)} for p in resp.parents]
            out[name] = got
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["http"] and argv != ["scheduler"]:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.load(sys.stdin)
    out = [http_one(r) for r in spec] if argv == ["http"] else scheduler(spec)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
