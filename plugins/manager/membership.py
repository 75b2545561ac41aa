"""Registration, keepalives and the state of schedulers, seed peers and peers.

State is derived, never stored, so no sweeper has to run for it to be right:

* ``offline``  an operator took the member out by hand (it stays out until put back online, even if
  it keeps sending keepalives);
* ``inactive`` its last keepalive is older than ``MISSED_KEEPALIVES`` intervals;
* ``active``   otherwise.

A peer asking for schedulers only ever receives active schedulers, so a dead scheduler leaves every
peer's list at the peer's next refresh after 3 missed keepalives.
"""
from __future__ import annotations

import logging
import threading
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress, StringConstraints
from remora.plugins.manager import clusters as clusters_mod
from remora.plugins.manager.db import Cluster, JoinToken, Member
from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

MISSED_KEEPALIVES = 3
TYPES = ("scheduler", "seed_peer", "peer")
HOSTNAME_RE = r"^[A-Za-z0-9]([A-Za-z0-9.\-_]{0,253}[A-Za-z0-9])?$"


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(pattern="^(scheduler|seed_peer|peer)$")
    hostname: str = Field(pattern=HOSTNAME_RE, max_length=255)
    ip: IPvAnyAddress
    port: int = Field(ge=1, le=65535, description="service port (scheduler gRPC, peer upload)")
    api_port: int = Field(0, ge=0, le=65535, description="peer HTTP API port for jobs, 0 = none")
    idc: str = Field("", max_length=128)
    location: str = Field("", max_length=255)
    version: str = Field("", max_length=64)
    cluster: str | None = Field(None, max_length=64, description="cluster name (schedulers/seed peers)")


class KeepaliveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    load: float = Field(0.0, ge=0.0, le=1e6, description="current uploads / load figure")
    config_version: int = Field(0, ge=0, le=2**31, description="dynamic config version applied")
    fallbacks: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)],
                    Annotated[int, Field(ge=0, le=2**62)]] = Field(default_factory=dict, max_length=32,
                                      description="registry fallbacks by cause since start")


def state_of(m: Member, now: float, interval: float) -> str:
    if m.offline:
        return "offline"
    if now - m.last_seen > MISSED_KEEPALIVES * interval:
        return "inactive"
    return "active"


def member_view(m: Member, now: float, interval: float) -> dict:
    return {"id": m.id, "type": m.type, "hostname": m.hostname, "ip": m.ip, "port": m.port,
            "api_port": m.api_port, "idc": m.idc, "location": m.location, "version": m.version,
            "cluster_id": m.cluster_id, "state": state_of(m, now, interval), "offline_reason": m.offline_reason,
            "last_seen": m.last_seen, "registered_at": m.registered_at, "stats": m.stats or {}}


def resolve_cluster(session: Session, req: RegisterRequest, join: JoinToken) -> int | None:
    """The cluster a scheduler/seed peer joins: the join token's, else the named one, else default."""
    if join.cluster_id is not None:
        if req.cluster is not None:
            named = session.scalar(select(Cluster).where(Cluster.name == req.cluster))
            if named is None or named.id != join.cluster_id:
                raise PermissionError(f"this join token is bound to another cluster than {req.cluster!r}")
        return join.cluster_id
    if req.cluster is not None:
        named = session.scalar(select(Cluster).where(Cluster.name == req.cluster))
        if named is None:
            raise LookupError(f"no cluster named {req.cluster!r}")
        return named.id
    default = session.scalar(select(Cluster).where(Cluster.is_default.is_(True)).order_by(Cluster.id))
    return default.id if default else None


def register(session: Session, req: RegisterRequest, join: JoinToken, now: float) -> tuple[Member, bool]:
    """Insert or refresh a member keyed by (type, hostname, ip, port); returns (member, created)."""
    ip = str(req.ip)
    cluster_id = resolve_cluster(session, req, join) if req.type != "peer" else join.cluster_id
    m = session.scalar(select(Member).where(Member.type == req.type, Member.hostname == req.hostname,
                                            Member.ip == ip, Member.port == req.port))
    created = m is None
    if created:
        m = Member(type=req.type, hostname=req.hostname, ip=ip, port=req.port, offline=False, offline_reason="",
                   registered_at=now, stats={})
        session.add(m)
    m.api_port, m.idc, m.location, m.version = req.api_port, req.idc, req.location, req.version
    m.cluster_id = cluster_id if (cluster_id is not None or created) else m.cluster_id
    m.last_seen = now
    session.flush()
    return m, created


def schedulers_for(session: Session, peer: clusters_mod.PeerInfo, now: float, interval: float,
                   bound_cluster: int | None = None) -> dict:
    """The best cluster for ``peer`` among those with an active scheduler, and its members."""
    horizon = now - MISSED_KEEPALIVES * interval
    live = session.execute(select(Member).where(Member.type.in_(("scheduler", "seed_peer")),
                                                Member.offline.is_(False), Member.last_seen >= horizon)).scalars().all()
    by_cluster: dict[int, dict[str, list[Member]]] = {}
    for m in live:
        if m.cluster_id is not None:
            by_cluster.setdefault(m.cluster_id, {"scheduler": [], "seed_peer": []})[m.type].append(m)
    candidates = [c for c in session.scalars(select(Cluster)).all()
                  if by_cluster.get(c.id, {}).get("scheduler") and (bound_cluster is None or c.id == bound_cluster)]
    ranked = clusters_mod.rank(candidates, peer)
    if not ranked:
        return {"cluster": None, "score": 0.0, "schedulers": [], "seed_peers": [],
                "reason": "no cluster has an active scheduler"}
    best_score, best = ranked[0]
    members = by_cluster[best.id]
    return {"cluster": {"id": best.id, "name": best.name}, "score": best_score,
            "schedulers": [member_view(m, now, interval) for m in sorted(members["scheduler"], key=lambda m: m.id)],
            "seed_peers": [member_view(m, now, interval) for m in sorted(members["seed_peer"], key=lambda m: m.id)],
            "reason": ""}


class KeepaliveBuffer:
    """Keepalives batched in memory and written every ``flush_every`` seconds in one statement.

    A keepalive is the manager's hottest request (every member, every interval); answering it from
    memory and writing ``last_seen`` in batches is what lets one replica answer thousands per second
    on SQLite and PostgreSQL alike. The state a member is judged by stays in the database, so other
    replicas see it after at most one flush (``flush_every`` is far below the 3-interval threshold).
    ``known`` maps member id -> offline flag; it is refreshed from the database at each flush, so a
    member deleted or taken offline through another replica is noticed within one flush.
    """

    def __init__(self, sessions, flush_every: float):
        self.sessions, self.flush_every = sessions, flush_every
        self.pending: dict[int, dict] = {}
        self.known: dict[int, bool] = {}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="keepalive-flush", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)
        self.flush()

    def note(self, member_id: int, req: KeepaliveRequest, now: float) -> bool | None:
        """Buffer one keepalive; returns the member's offline flag, or None if it is not known here."""
        with self.lock:
            offline = self.known.get(member_id)
            if offline is not None:
                self.pending[member_id] = {"id": member_id, "last_seen": now, "stats": {
                    "load": req.load, "config_version": req.config_version, "fallbacks": req.fallbacks}}
            return offline

    def learn(self, member_id: int, offline: bool) -> None:
        with self.lock:
            self.known[member_id] = offline

    def forget(self, member_id: int) -> None:
        with self.lock:
            self.known.pop(member_id, None)
            self.pending.pop(member_id, None)

    def flush(self) -> None:
        with self.lock:
            batch, self.pending = list(self.pending.values()), {}
        if not batch:
            return
        ids = [b["id"] for b in batch]
        with self.sessions.begin() as s:
            present = dict(s.execute(select(Member.id, Member.offline).where(Member.id.in_(ids))).all())
            rows = [{"b_id": b["id"], "b_seen": b["last_seen"], "b_stats": b["stats"]} for b in batch if b["id"] in present]
            if rows:  # one Core executemany: the DBAPI runs it in C, no ORM work per row
                s.execute(update(Member.__table__).where(Member.__table__.c.id == bindparam("b_id"))
                          .values(last_seen=bindparam("b_seen"), stats=bindparam("b_stats")), rows)
        with self.lock:
            for mid in ids:
                if mid in present:
                    self.known[mid] = present[mid]
                else:
                    self.known.pop(mid, None)

    def _run(self) -> None:
        while not self.stop_event.wait(self.flush_every):
            try:
                self.flush()
            except Exception:
                logging.getLogger("remora.manager.membership").exception("keepalive flush failed")
