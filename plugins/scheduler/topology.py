"""A read-only view of the edge network as the mesh sees it: ``remora.scheduler.v1.Topology/GetTopology``.

Why: ``remora place plan --from-scheduler`` plans on the live cluster — the hosts that run a peer, the
RTTs their probes measured, the goodput their piece transfers showed, and which blobs they already
hold. The scheduler has all of that in :class:`.state.SchedulerState`; this module only reads it.

The method is served on the scheduler's own gRPC port (same mutual TLS, same member rule as every other
call: :meth:`.server.SchedulerService.refuse`; a ``client`` certificate is refused), as a *generic*
handler whose messages are UTF-8 JSON documents instead of protobuf: the answer is a nested, versioned
document that only the planner reads, and a JSON body keeps the wire contract in docs/placement.md §4.3
instead of a new protobuf message. The client is :func:`remora.meshapi.read_topology`.

Request ``{"digests": [blob digests, <= 1024], "max_hosts": N}``; answer (``version`` 1)::

    {"version": 1, "hosts": [{"host_id", "peer_ids", "ip", "upload_port", "labels", "upload_slots",
                              "declared_upload_bandwidth", "measured_upload_bandwidth", "measured_samples",
                              "seen_s_ago", "tasks" (blobs its peers take part in),
                              "holds": [asked digests a peer of the host has whole]}],
     "rtts": [{"from", "to", "rtt_s", "reachable", "age_s"}],          # host -> host probe RTTs (EWMA)
     "goodput": [{"from", "to", "bytes_per_s", "samples", "age_s"}],   # parent host -> child host
     "truncated": bool}

Bounded whatever the cluster's size: at most ``MAX_HOSTS`` hosts and ``MAX_PAIRS`` entries of each pair
list go out (``truncated`` says so), ``MAX_DIGESTS`` asked digests, a request body of at most 1 MiB.
"""
from __future__ import annotations

import json
import time

import grpc

from remora._proto import remora_scheduler_pb2 as pb

SERVICE = "remora.scheduler.v1.Topology"
METHOD = "GetTopology"
VERSION = 1
MAX_HOSTS = 5000
MAX_PAIRS = 50_000
MAX_DIGESTS = 1024
MAX_REQUEST = 1 << 20


class TopologyRequestError(ValueError):
    """A malformed request: INVALID_ARGUMENT."""


def parse_request(raw: bytes) -> dict:
    """The validated request: ``{"digests": set, "max_hosts": int}``."""
    if len(raw) > MAX_REQUEST:
        raise TopologyRequestError(f"request larger than {MAX_REQUEST} bytes")
    try:
        doc = json.loads(raw.decode("utf-8")) if raw else {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise TopologyRequestError(f"request is not a JSON document: {exc}") from None
    if not isinstance(doc, dict) or set(doc) - {"digests", "max_hosts"}:
        raise TopologyRequestError("request must be an object with optional 'digests' and 'max_hosts'")
    digests = doc.get("digests", [])
    if not isinstance(digests, list) or len(digests) > MAX_DIGESTS or not all(
            isinstance(d, str) and 0 < len(d) <= 200 for d in digests):
        raise TopologyRequestError(f"'digests' must be a list of at most {MAX_DIGESTS} digest strings")
    max_hosts = doc.get("max_hosts", MAX_HOSTS)
    if isinstance(max_hosts, bool) or not isinstance(max_hosts, int) or max_hosts < 1:
        raise TopologyRequestError("'max_hosts' must be a positive integer")
    return {"digests": set(digests), "max_hosts": min(max_hosts, MAX_HOSTS)}


def snapshot(state, digests: set[str] = frozenset(), max_hosts: int = MAX_HOSTS) -> dict:
    """The topology document of ``state`` (a :class:`.state.SchedulerState`), see the module doc."""
    now = state.clock()
    hosts: dict[str, dict] = {}
    truncated = False
    # Newest peer of a host first: its address and labels describe the host now.
    for peer in sorted(state.peers.values(), key=lambda p: -p.last_seen):
        h = peer.host
        entry = hosts.get(h.host_id)
        if entry is None:
            if len(hosts) >= max_hosts:
                truncated = True
                continue
            est = state.bandwidth.capacity(h.host_id)
            entry = hosts[h.host_id] = {
                "host_id": h.host_id, "peer_ids": [], "ip": h.ip, "upload_port": h.upload_port,
                "labels": dict(h.labels), "upload_slots": peer.upload_slots,
                "declared_upload_bandwidth": h.upload_bandwidth,
                "measured_upload_bandwidth": est.goodput if est else None,
                "measured_samples": est.samples if est else 0,
                "seen_s_ago": round(max(0.0, now - peer.last_seen), 3), "tasks": 0, "holds": set()}
        entry["peer_ids"].append(h.peer_id)
        entry["tasks"] += len(peer.tasks)
    # Only the asked digests are looked at: work bounded by MAX_DIGESTS x MAX_PEERS_PER_TASK, never by
    # every task of every peer.
    for digest in digests:
        task = state.tasks.get(digest)
        for peer_id, tp in (task.peers.items() if task is not None else ()):
            peer = state.peers.get(peer_id)
            if peer is None or not tp.done or state.is_isolated(task, peer_id):
                continue
            entry = hosts.get(peer.host.host_id)
            if entry is not None:
                entry["holds"].add(digest)
    for entry in hosts.values():
        entry["holds"] = sorted(entry["holds"])
        entry["peer_ids"].sort()

    rtts = []
    for (a, b), s in state.rtt.items():
        if a in hosts and b in hosts:
            if len(rtts) >= MAX_PAIRS:
                truncated = True
                break
            rtts.append({"from": a, "to": b, "rtt_s": s.rtt_s, "reachable": s.reachable,
                         "age_s": round(max(0.0, now - s.updated_at), 3)})
    goodput = []
    for (a, b), est in state.bandwidth.pairs.items():
        if a in hosts and b in hosts:
            if len(goodput) >= MAX_PAIRS:
                truncated = True
                break
            goodput.append({"from": a, "to": b, "bytes_per_s": est.goodput, "samples": est.samples,
                            "age_s": round(max(0.0, now - est.updated_at), 3)})
    return {"version": VERSION, "hosts": sorted(hosts.values(), key=lambda e: e["host_id"]), "rtts": rtts,
            "goodput": goodput, "truncated": truncated}


def add_topology_service(service, server) -> None:
    """Serve GetTopology for ``service`` (a :class:`.server.SchedulerService`) on grpc.aio ``server``."""

    async def get_topology(raw: bytes, context) -> bytes:
        start = time.perf_counter()
        try:
            if service.members_only:
                # The member rule of every scheduler call (a request without peer_id: any member role).
                refused = service.refuse(METHOD, pb.Empty(), context)
                if refused:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, refused)
            try:
                req = parse_request(raw)
            except TopologyRequestError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            doc = snapshot(service.state, req["digests"], req["max_hosts"])
            return json.dumps(doc, separators=(",", ":")).encode()
        finally:
            service.metrics.rpc_seconds.labels(METHOD).observe(time.perf_counter() - start)

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        METHOD: grpc.unary_unary_rpc_method_handler(get_topology, request_deserializer=None,
                                                    response_serializer=None)})
    server.add_generic_rpc_handlers((handler,))
