"""The client side of the scheduler's read-only topology view (``remora.scheduler.v1.Topology``).

It lives in the core because the placement planner (``remora place plan --from-scheduler``) reads what
the scheduler (a plugin) serves, and components meet only through the core. The server side and the
document's fields are in plugins/scheduler/topology.py; the mapping into a placement network is
docs/placement.md §4.3.

The call goes to the scheduler's gRPC port with the mesh's security: mutual TLS with a member
certificate of the cluster (role peer, scheduler or manager; ``remora certs issue --role manager`` for
an operator's machine), or a plain channel to a scheduler run with ``--insecure-plain-mesh``.
"""
from __future__ import annotations

import json

from remora.errors import AuthError, InvalidInput, RegistryError, UsageError

METHOD = "/remora.scheduler.v1.Topology/GetTopology"
VERSION = 1
MAX_ANSWER = 64 << 20
MAX_DIGESTS = 1024   # per call (plugins/scheduler/topology.py)


def read_topology(address: str, tls_dir=None, insecure_plain: bool = False, digests=(), max_hosts: int | None = None,
                  timeout: float = 10.0) -> dict:
    """The scheduler's topology document (version 1), asking which hosts hold ``digests`` (blob digests).

    Errors: no TLS choice → :class:`UsageError`; refused (not a member) → :class:`AuthError`; unreachable or
    a scheduler without the method → :class:`RegistryError`; an answer this client cannot read →
    :class:`InvalidInput`.
    """
    import grpc

    if (tls_dir is None) == (not insecure_plain):
        raise UsageError("reading the scheduler needs --tls-dir DIR (a member certificate of the cluster: ca.pem, "
                         "cert.pem, key.pem) or, for a plain lab mesh, --insecure-plain-mesh (not both)")
    options = [("grpc.max_receive_message_length", MAX_ANSWER), ("grpc.enable_http_proxy", 0)]
    if tls_dir is not None:
        from remora.pki.tls import TLSFiles, grpc_channel_credentials

        channel = grpc.secure_channel(address, grpc_channel_credentials(TLSFiles.in_dir(tls_dir)), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    wanted = sorted(set(digests))
    # The scheduler answers about at most MAX_DIGESTS digests per call: more are asked in batches, and
    # the hosts' holdings merged into the first answer.
    batches = [wanted[i:i + MAX_DIGESTS] for i in range(0, len(wanted), MAX_DIGESTS)] or [[]]
    try:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        doc: dict | None = None
        for batch in batches:
            request: dict[str, object] = {"digests": batch}
            if max_hosts is not None:
                request["max_hosts"] = int(max_hosts)
            part = _parse(address, call(json.dumps(request).encode(), timeout=timeout))
            if doc is None:
                doc = part
                continue
            holds = {h["host_id"]: h.get("holds", []) for h in part.get("hosts", [])}
            for h in doc.get("hosts", []):
                h["holds"] = sorted(set(h.get("holds", [])) | set(holds.get(h["host_id"], [])))
        assert doc is not None  # batches is never empty
        return doc
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.PERMISSION_DENIED:
            raise AuthError(f"scheduler {address} refused the topology read: {details}") from None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise RegistryError(f"scheduler {address} has no topology view (an older remora scheduler)") from None
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise InvalidInput(f"scheduler {address}: {details}") from None
        raise RegistryError(f"cannot read the topology from scheduler {address}: {code.name} {details}") from None
    finally:
        channel.close()


def _parse(address: str, raw: bytes) -> dict:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise InvalidInput(f"scheduler {address} answered something that is not JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        version = doc.get("version") if isinstance(doc, dict) else "?"
        raise InvalidInput(f"scheduler {address}: topology version {version}, this remora reads version {VERSION}")
    return doc
