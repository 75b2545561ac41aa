"""Registration, keepalives and the state of schedulers, seed peers and peers.

State is derived, never stored, so no sweeper has to run for it to be right:

* ``offline``  an operator took the member out by hand (it stays out until put back online, even if
  it keeps sending keepalives);
* ``inactive`` it missed ``MISSED_KEEPALIVES`` keepalives: its last one is older than 3 of its periods;
* ``active``   otherwise.

Periods: peers keep alive every ``interval``; schedulers and seed peers, which every peer depends on
(and of which there are few), every ``interval / 2``. A dead scheduler is therefore inactive at most
1.5 intervals after it died, and peers, which refresh their scheduler list every ``interval / 2``,
drop it within 2 intervals (+ one request) — inside the 3 intervals the mesh promises. A peer asking
for schedulers only ever receives active schedulers.
"""
from __future__ import annotations

import logging
import threading
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress, StringConstraints
from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from remora.plugins.manager import clusters as clusters_mod
from remora.plugins.manager.db import Cluster, JoinToken, Member

MISSED_KEEPALIVES = 3
TYPES = ("scheduler", "seed_peer", "peer")
#: members every peer depends on: they keep alive (and peers refresh their list of them) twice per interval
FAST_TYPES = ("scheduler", "seed_peer")


def period_of(member_type: str, interval: float) -> float:
    """How often a member of this type keeps alive (told to it when it registers)."""
    return interval / 2 if member_type in FAST_TYPES else interval


def expiry_of(member_type: str, interval: float) -> float:
    """Seconds without a keepalive after which a member of this type is inactive (3 missed)."""
    return MISSED_KEEPALIVES * period_of(member_type, interval)


def refresh_period(interval: float) -> float:
    """How often peers ask for their schedulers: expiry (1.5 I) + refresh (I/2) stays within 3 I."""
    return interval / 2
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


class Outage:
    """Keepalives sent while no manager was up could not arrive: nobody is judged on them.

    At a start, the newest ``last_seen`` in the database says when the last manager stopped taking
    keepalives; the gap to our start is credited to every member last seen before the start, so a
    scheduler alive when the managers went down stays in peers' lists until its next keepalive, while
    one that was already dead before the outage stays dead. With other replicas up, the newest
    ``last_seen`` is a moment ago and the credit is nil.
    """

    def __init__(self, started: float = 0.0, newest_seen: float | None = None):
        self.started = started
        self.gap = max(0.0, started - newest_seen) if newest_seen else 0.0

    def seen(self, last_seen: float) -> float:
        return last_seen + self.gap if last_seen < self.started else last_seen


NO_OUTAGE = Outage()


def state_of(m: Member, now: float, interval: float, outage: Outage = NO_OUTAGE) -> str:
    if m.offline:
        return "offline"
    if now - outage.seen(m.last_seen) > expiry_of(m.type, interval):
        return "inactive"
    return "active"


def member_view(m: Member, now: float, interval: float, outage: Outage = NO_OUTAGE) -> dict:
    return {"id": m.id, "type": m.type, "hostname": m.hostname, "ip": m.ip, "port": m.port,
            "api_port": m.api_port, "idc": m.idc, "location": m.location, "version": m.version,
            "cluster_id": m.cluster_id, "state": state_of(m, now, interval, outage), "offline_reason": m.offline_reason,
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
                   bound_cluster: int | None = None, outage: Outage = NO_OUTAGE) -> dict:
    """The best cluster for ``peer`` among those with an active scheduler, and its members.

    Right after a manager restart every scheduler's last keepalive is old — it could not reach us —
    and answering "none" would send every peer to the registry: ``outage`` credits that (:class:`Outage`)."""
    horizon = now - expiry_of("scheduler", interval) - outage.gap
    live = [m for m in session.execute(select(Member).where(
                Member.type.in_(("scheduler", "seed_peer")), Member.offline.is_(False), Member.last_seen >= horizon))
            .scalars().all() if state_of(m, now, interval, outage) == "active"]
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

    def by_id(m: Member) -> int:
        return m.id
    return {"cluster": {"id": best.id, "name": best.name}, "score": best_score,
            "schedulers": [member_view(m, now, interval, outage) for m in sorted(members["scheduler"], key=by_id)],
            "seed_peers": [member_view(m, now, interval, outage) for m in sorted(members["seed_peer"], key=by_id)],
            "reason": ""}


class KeepaliveBuffer:
    """Keepalives batched in memory and written every ``flush_every`` seconds in one statement.

    A keepalive is the manager's hottest request (every member, every interval); answering it from
    memory and writing ``last_seen`` in batches is what lets one replica answer thousands per second
    on SQLite and PostgreSQL alike. The state a member is judged by stays in the database, so other
    replicas see it after at most one flush (``flush_every`` is far below the expiry of any member
    type, so a live member is never judged on data older than that).
    ``known`` maps member id -> (offline flag, type); it is refreshed from the database at each
    flush, so a member deleted or taken offline through another replica is noticed within one flush.
    A flush never moves ``last_seen`` backwards (a replica flushing an older keepalive of a member
    that now talks to another replica leaves the newer time alone).
    """

    def __init__(self, sessions, flush_every: float):
        self.sessions, self.flush_every = sessions, flush_every
        self.pending: dict[int, dict] = {}
        self.known: dict[int, tuple[bool, str]] = {}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="keepalive-flush", daemon=True)
        table = Member.__table__
        self._update = (update(table).where(table.c.id == bindparam("b_id"), table.c.last_seen < bindparam("b_seen"))
                        .values(last_seen=bindparam("b_seen"), stats=bindparam("b_stats")))

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)
        self.flush()

    def note(self, member_id: int, req: KeepaliveRequest, now: float) -> tuple[bool, str] | None:
        """Buffer one keepalive; returns the member's (offline flag, type), or None if not known here."""
        with self.lock:
            known = self.known.get(member_id)
            if known is not None:
                self.pending[member_id] = {"b_id": member_id, "b_seen": now, "b_stats": {
                    "load": req.load, "config_version": req.config_version, "fallbacks": req.fallbacks}}
            return known

    def learn(self, member_id: int, offline: bool, member_type: str) -> None:
        with self.lock:
            self.known[member_id] = (offline, member_type)

    def forget(self, member_id: int) -> None:
        with self.lock:
            self.known.pop(member_id, None)
            self.pending.pop(member_id, None)

    def flush(self) -> None:
        with self.lock:
            batch, self.pending = list(self.pending.values()), {}
        if not batch:
            return
        ids = [b["b_id"] for b in batch]
        with self.sessions.begin() as s:
            present = {mid: (offline, typ) for mid, offline, typ in
                       s.execute(select(Member.id, Member.offline, Member.type).where(Member.id.in_(ids)))}
            rows = [b for b in batch if b["b_id"] in present]
            if rows:  # one Core executemany: the DBAPI runs it in C, no ORM work per row
                s.execute(self._update, rows)
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
