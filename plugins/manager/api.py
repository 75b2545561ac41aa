"""The manager's REST API (FastAPI; OpenAPI document at /openapi.json) and its console.

Two kinds of callers:

* operators, with a personal access token: clusters, members, dynamic config, jobs, users, tokens,
  audit log (``/api/v1/...``); every change writes an audit row in the same transaction;
* schedulers and peers, with a join token: register, keep alive, ask for schedulers, fetch the
  dynamic config (``/api/v1/agent/...``; :mod:`remora.plugins.manager.client` is their client).

Every request body and query field is validated by pydantic: an absurd value is a 422 that names
the field, before anything is stored.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress, field_validator
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from remora import __version__
from remora.plugins.manager import auth, fastpath, membership
from remora.plugins.manager import config as config_mod
from remora.plugins.manager import jobs as jobs_mod
from remora.plugins.manager.clusters import PeerInfo, Scopes
from remora.plugins.manager.db import (
    AuditEntry,
    Clock,
    Cluster,
    ConfigVersion,
    Job,
    JobNode,
    JoinToken,
    Member,
    Token,
    User,
    open_db,
)
from remora.plugins.manager.metrics import Metrics

log = logging.getLogger("remora.manager.api")
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_BODY = 4 << 20  # no request body is larger (10,000 blobs or nodes fit easily)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``MAX_BODY`` (413), declared or chunked."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                return await self._refuse(send)
        seen, too_large = 0, False

        async def limited():
            nonlocal seen, too_large
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                too_large = True
                raise _TooLarge()
            return message

        started = False

        async def guarded_send(message):
            # the app may turn our exception into its own error answer (FastAPI: 400): answer 413 instead
            nonlocal started
            if too_large:
                if not started:
                    started = True
                    await self._refuse(send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"detail": f"request body over {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
MAX_TTL = 10 * 365 * 86_400


@dataclass
class Settings:
    db_url: str
    keepalive_interval: float = 10.0
    root_token_file: Path | None = None
    clock: Clock = field(default_factory=Clock)
    engine: jobs_mod.EngineSettings = field(default_factory=jobs_mod.EngineSettings)
    run_jobs: bool = True
    join_cache_seconds: float = 5.0  # a join token revoked on another replica is refused after this
    ca_dir: Path | None = None       # a remora.pki CA: the manager then issues member certificates
    tls_dir: Path | None = None      # HTTPS with this manager certificate; agents need member certificates

    @property
    def flush_every(self) -> float:
        """Keepalive batch period: well inside one interval, so expiry is judged on fresh data."""
        return min(2.0, self.keepalive_interval / 5)


# ---------------------------------------------------------------- request bodies

class ClusterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE)
    description: str = Field("", max_length=1000)
    scopes: Scopes = Field(default_factory=Scopes)
    is_default: bool = False


class ClusterPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = Field(None, max_length=1000)
    scopes: Scopes | None = None
    is_default: bool | None = None


class OfflineIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("taken offline by operator", max_length=500)


class ConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: config_mod.DynamicConfig
    expected_version: int | None = Field(None, ge=0, le=2**31, description="fail with 409 unless current")


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE)
    role: str = Field(pattern="^(root|guest)$")


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE)
    scopes: list[str] = Field(default_factory=list, max_length=2)
    ttl_seconds: float | None = Field(None, gt=0, le=MAX_TTL, description="expiry; none = never")

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in auth.SCOPES]
        if bad:
            raise ValueError(f"unknown scopes {bad}; known: {list(auth.SCOPES)}")
        return v


class CertificateIn(BaseModel):
    """A member certificate request: the manager acting as the cluster CA (remora.pki)."""

    model_config = ConfigDict(extra="forbid")
    role: str = Field(pattern="^(peer|scheduler)$", description="seed peers are peers")
    host_id: str = Field(pattern=NAME_RE.replace("{0,63}", "{0,127}"))
    dns: list[str] = Field(default_factory=list, max_length=16)
    ips: list[IPvAnyAddress] = Field(default_factory=list, max_length=16)
    days: int = Field(30, ge=1, le=365)


class JoinTokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE)
    cluster_id: int | None = Field(None, ge=1, le=2**31)
    ttl_seconds: float | None = Field(None, gt=0, le=MAX_TTL)


# ---------------------------------------------------------------- views

def cluster_view(c: Cluster) -> dict:
    return {"id": c.id, "name": c.name, "description": c.description, "scopes": c.scopes, "is_default": c.is_default,
            "created_at": c.created_at, "updated_at": c.updated_at}


def token_view(t) -> dict:
    out = {"id": t.id, "name": t.name, "prefix": t.prefix, "expires_at": t.expires_at, "revoked": t.revoked,
           "created_at": t.created_at}
    if isinstance(t, Token):
        out.update(user_id=t.user_id, scopes=t.scopes)
    else:
        out.update(cluster_id=t.cluster_id)
    return out


def create_app(settings: Settings) -> FastAPI:
    engine, sessions = open_db(settings.db_url)
    clock, interval = settings.clock, settings.keepalive_interval
    with sessions() as s:   # members are not judged on keepalives they sent while no manager was up
        outage = membership.Outage(clock.now(), s.scalar(select(func.max(Member.last_seen))))
    metrics = Metrics(sessions, clock, interval)
    with sessions.begin() as s:
        try:
            root_token = auth.bootstrap_root(s, settings.root_token_file, clock.now())
        except IntegrityError:  # another replica bootstrapped at the same moment
            root_token = None
    if root_token and settings.root_token_file:
        log.warning("created user root; its token is in %s", settings.root_token_file)
    job_engine = jobs_mod.Engine(sessions, clock, settings.engine, metrics) if settings.run_jobs else None
    buffer = membership.KeepaliveBuffer(sessions, settings.flush_every)
    ca = None
    if settings.ca_dir is not None:
        from remora.pki.ca import load_ca

        ca = load_ca(settings.ca_dir)
    join_cache: dict[str, tuple[float, JoinToken]] = {}
    member_cluster = None
    if settings.tls_dir is not None:
        from remora.plugins.manager import tls as tls_mod

        member_cluster = tls_mod.reloader(settings.tls_dir).identity.cluster

    def member(request: Request, member_type: str | None = None):
        """Over mutual TLS, the caller must hold a member certificate of our cluster (403 otherwise)."""
        if settings.tls_dir is None:
            return None
        try:
            return tls_mod.require_member(request, member_cluster, member_type)
        except PermissionError as exc:
            metrics.requests.labels("403").inc()
            raise HTTPException(403, str(exc)) from None

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        buffer.start()
        if job_engine is not None:
            job_engine.start()
        yield
        if job_engine is not None:
            job_engine.stop()
        buffer.stop()
        engine.dispose()

    app = FastAPI(title="remora manager", version=__version__, lifespan=lifespan,
                  description="Control plane of a remora cluster: clusters, membership, dynamic config, jobs.")
    app.state.sessions, app.state.settings, app.state.metrics = sessions, settings, metrics
    app.add_middleware(fastpath.SecurityHeaders)
    app.add_middleware(BodyLimit)

    @app.exception_handler(auth.AuthFailure)
    async def _auth_failure(_req, exc: auth.AuthFailure):
        metrics.requests.labels(str(exc.status)).inc()
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    def bearer(authorization: str | None) -> str | None:
        if authorization and authorization.lower().startswith("bearer "):
            return authorization[7:].strip()
        return None

    def principal(authorization: str | None = Header(None)) -> auth.Principal:
        with sessions() as s:
            return auth.authenticate(s, bearer(authorization), clock.now())

    def _lookup_join(token: str | None) -> JoinToken:
        with sessions() as s:
            row = auth.check_join(s, token, clock.now())
            s.expunge(row)
        return row

    async def join_token(authorization: str | None = Header(None)) -> JoinToken:
        """The caller's join token; cached briefly in memory (agents call several times a second)."""
        token, now = bearer(authorization), clock.now()
        key = auth.hash_token(token) if token else ""
        hit = join_cache.get(key)
        if hit is not None and hit[0] > now and (hit[1].expires_at is None or hit[1].expires_at > now):
            return hit[1]
        row = await run_in_threadpool(_lookup_join, token)
        if len(join_cache) > 10_000:
            join_cache.clear()
        join_cache[key] = (now + settings.join_cache_seconds, row)
        return row

    def writer(scope: str | None):
        def dep(p: auth.Principal = Depends(principal)) -> auth.Principal:
            auth.require(p, scope, write=True)
            return p
        return dep

    # one dependency object per scope, made once (FastAPI's own advice for shared dependencies)
    cluster_writer = Depends(writer("cluster"))
    job_writer = Depends(writer("job"))

    def root_only(p: auth.Principal = Depends(principal)) -> auth.Principal:
        if p.role != "root":
            raise auth.AuthFailure(403, f"user {p.user} is not root")
        return p

    # ------------------------------------------------------------ plumbing
    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict:
        with sessions() as s:
            s.execute(select(1))
        return {"ok": True, "version": __version__}

    @app.get("/metrics", tags=["meta"], include_in_schema=False)
    def prom() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def index() -> RedirectResponse:
        return RedirectResponse("/console/")

    app.mount("/console", StaticFiles(directory=Path(__file__).parent / "console", html=True), name="console")

    @app.get("/api/v1/whoami", tags=["auth"])
    def whoami(p: auth.Principal = Depends(principal)) -> dict:
        return {"user": p.user, "role": p.role, "scopes": list(p.scopes)}

    # ------------------------------------------------------------ agents (join token)
    @app.post("/api/v1/agent/register", tags=["agent"])
    def agent_register(req: membership.RegisterRequest, request: Request,
                       jt: JoinToken = Depends(join_token)) -> dict:
        ident = member(request, req.type)
        if ident is not None and req.hostname != ident.host_id:
            metrics.requests.labels("403").inc()
            raise HTTPException(403, f"this certificate is for host {ident.host_id!r}: register as hostname "
                                     f"{ident.host_id!r}, not {req.hostname!r}")
        now = clock.now()
        with sessions.begin() as s:
            try:
                m, created = membership.register(s, req, jt, now)
            except PermissionError as exc:
                raise HTTPException(403, str(exc)) from None
            except LookupError as exc:
                raise HTTPException(404, str(exc)) from None
            if created:
                auth.audit(s, now, f"join-token:{jt.name}", "member.register", f"member:{m.id}",
                           {"type": m.type, "hostname": m.hostname, "ip": m.ip, "port": m.port,
                            "certificate": {"host_id": ident.host_id, "fingerprint": ident.fingerprint}
                            if ident is not None else None})
            buffer.learn(m.id, m.offline, m.type)
            owners[m.id] = m.hostname
            return {"id": m.id, "cluster_id": m.cluster_id,
                    "keepalive_interval": membership.period_of(m.type, interval),
                    "state": membership.state_of(m, now, interval)}

    def _known_offline(member_id: int) -> bool | None:
        with sessions() as s:
            row = s.execute(select(Member.offline, Member.type).where(Member.id == member_id)).first()
        if row is None:
            return None
        buffer.learn(member_id, row.offline, row.type)
        return row.offline

    #: member id -> hostname (= the host id of the certificate that registered it, over mutual TLS):
    #: a member certificate keeps alive only its own member ids (a cache per replica, read on a miss)
    owners: dict[int, str] = {}

    def _owner(member_id: int) -> str | None:
        with sessions() as s:
            host = s.scalar(select(Member.hostname).where(Member.id == member_id))
        if host is not None:
            if len(owners) > 1_000_000:
                owners.clear()
            owners[member_id] = host
        return host

    answers = {(flag, typ): json.dumps({"state": "offline" if flag else "active",
                                        "keepalive_interval": membership.period_of(typ, interval)}).encode()
               for flag in (False, True) for typ in membership.TYPES}

    class KeepaliveOut(BaseModel):
        state: str = Field(description="active or offline (taken out by an operator)")
        keepalive_interval: float

    @app.post("/api/v1/agent/{member_id}/keepalive", tags=["agent"], response_model=KeepaliveOut)
    async def agent_keepalive(member_id: int, req: membership.KeepaliveRequest, request: Request,
                              jt: JoinToken = Depends(join_token)) -> Response:
        """Answered from memory; the keepalive buffer writes last_seen in batches."""
        ident = member(request)
        if ident is not None:
            owner = owners.get(member_id)
            if owner is None:
                owner = await run_in_threadpool(_owner, member_id)
            if owner is not None and owner != ident.host_id:
                metrics.requests.labels("403").inc()
                raise HTTPException(403, f"member {member_id} is not host {ident.host_id!r}'s")
        now = clock.now()
        known = buffer.note(member_id, req, now)
        if known is None:
            if await run_in_threadpool(_known_offline, member_id) is None:
                raise HTTPException(404, f"member {member_id} is not registered: register again")
            known = buffer.note(member_id, req, now)
        return Response(answers[known], media_type="application/json")  # pre-encoded: hottest path

    def fast_keepalive(scope: dict, member_id: int, body: bytes) -> bytes | None:
        """The route's common case without FastAPI (:mod:`fastpath`); None = let the route decide."""
        token = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = bearer(value.decode("latin-1"))
        now = clock.now()
        hit = join_cache.get(auth.hash_token(token)) if token else None
        if hit is None or hit[0] <= now or (hit[1].expires_at is not None and hit[1].expires_at <= now):
            return None
        if settings.tls_dir is not None:
            ident = (scope.get("state") or {}).get(tls_mod.STATE_KEY)
            if ident is None or not ident.is_member(member_cluster, tls_mod.AGENT_ROLES) \
                    or owners.get(member_id) != ident.host_id:
                return None
        try:
            req = membership.KeepaliveRequest.model_validate_json(body)
        except ValueError:  # pydantic's ValidationError: the route answers 422 with the details
            return None
        known = buffer.note(member_id, req, now)
        return answers[known] if known is not None else None

    app.add_middleware(fastpath.KeepaliveFastPath, answer=fast_keepalive)

    @app.get("/api/v1/agent/schedulers", tags=["agent"])
    def agent_schedulers(request: Request, ip: str = Query("", max_length=64),
                         hostname: str = Query("", max_length=255),
                         idc: str = Query("", max_length=128), location: str = Query("", max_length=255),
                         member_id: int | None = Query(None, ge=1, le=2**31),
                         jt: JoinToken = Depends(join_token)) -> dict:
        member(request)
        now = clock.now()
        with sessions.begin() as s:
            out = membership.schedulers_for(s, PeerInfo(ip=ip, hostname=hostname, idc=idc, location=location),
                                            now, interval, bound_cluster=jt.cluster_id, outage=outage)
            if member_id is not None and out["cluster"] is not None:
                m = s.get(Member, member_id)
                # only the peer itself (same hostname) moves its record to the cluster it was matched to
                if m is not None and m.type == "peer" and m.hostname == hostname \
                        and m.cluster_id != out["cluster"]["id"]:
                    m.cluster_id = out["cluster"]["id"]
        out["refresh_interval"] = membership.refresh_period(interval)
        return out

    @app.post("/api/v1/agent/certificate", tags=["agent"], status_code=201)
    def agent_certificate(body: CertificateIn, jt: JoinToken = Depends(join_token)) -> dict:
        """Issue a member certificate (key generated here: serve the manager over TLS or a trusted net)."""
        if ca is None:
            raise HTTPException(404, "this manager is not a CA (start it with --ca-dir)")
        from remora.errors import RemoraError
        from remora.pki.ca import fingerprint

        try:
            issued = ca.issue(body.role, body.host_id, dns=body.dns, ips=[str(i) for i in body.ips], days=body.days)
        except RemoraError as exc:
            raise HTTPException(422, str(exc)) from None
        now = clock.now()
        with sessions.begin() as s:
            auth.audit(s, now, f"join-token:{jt.name}", "certificate.issue", f"{body.role}:{body.host_id}",
                       {"fingerprint": fingerprint(issued.cert), "dns": body.dns, "ips": [str(i) for i in body.ips],
                        "not_after": issued.cert.not_valid_after_utc.isoformat()})
        return {"cert_pem": issued.cert_pem.decode(), "key_pem": issued.key_pem.decode(),
                "ca_pem": ca.bundle_pem.decode(), "not_after": issued.cert.not_valid_after_utc.timestamp()}

    @app.get("/api/v1/agent/config", tags=["agent"])
    def agent_config(request: Request, cluster_id: int | None = Query(None, ge=1, le=2**31),
                     version: int = Query(-1, ge=-1, le=2**31), scope: str = Query("", max_length=64),
                     jt: JoinToken = Depends(join_token)) -> dict:
        """The config a member of ``cluster_id`` runs; the body only when (scope, version) changed
        (versions count per scope: a peer moved to a cluster with a config of its own gets it)."""
        member(request)
        known_scope = scope
        with sessions() as s:
            scope, ver, body = config_mod.effective(s, cluster_id)
        if ver == version and known_scope in ("", scope):
            return {"scope": scope, "version": ver, "unchanged": True, "config": None}
        return {"scope": scope, "version": ver, "unchanged": False, "config": body}

    # ------------------------------------------------------------ clusters
    @app.get("/api/v1/clusters", tags=["clusters"])
    def list_clusters(p: auth.Principal = Depends(principal)) -> list[dict]:
        with sessions() as s:
            return [cluster_view(c) for c in s.scalars(select(Cluster).order_by(Cluster.id))]

    @app.post("/api/v1/clusters", tags=["clusters"], status_code=201)
    def create_cluster(body: ClusterIn, p: auth.Principal = cluster_writer) -> dict:
        now = clock.now()
        try:
            with sessions.begin() as s:
                if body.is_default:
                    for other in s.scalars(select(Cluster).where(Cluster.is_default.is_(True))):
                        other.is_default = False
                c = Cluster(name=body.name, description=body.description, scopes=body.scopes.model_dump(),
                            is_default=body.is_default, created_at=now, updated_at=now)
                s.add(c)
                s.flush()
                auth.audit(s, now, p.user, "cluster.create", f"cluster:{c.id}", body.model_dump())
                return cluster_view(c)
        except IntegrityError:
            raise HTTPException(409, f"a cluster named {body.name!r} exists") from None

    def get_cluster(s, cluster_id: int) -> Cluster:
        c = s.get(Cluster, cluster_id)
        if c is None:
            raise HTTPException(404, f"no cluster {cluster_id}")
        return c

    @app.get("/api/v1/clusters/{cluster_id}", tags=["clusters"])
    def show_cluster(cluster_id: int, p: auth.Principal = Depends(principal)) -> dict:
        with sessions() as s:
            c = get_cluster(s, cluster_id)
            now = clock.now()
            out = cluster_view(c)
            out["members"] = [membership.member_view(m, now, interval, outage) for m in
                              s.scalars(select(Member).where(Member.cluster_id == c.id).order_by(Member.id))]
            return out

    @app.patch("/api/v1/clusters/{cluster_id}", tags=["clusters"])
    def patch_cluster(cluster_id: int, body: ClusterPatch, p: auth.Principal = cluster_writer) -> dict:
        now = clock.now()
        with sessions.begin() as s:
            c = get_cluster(s, cluster_id)
            if body.description is not None:
                c.description = body.description
            if body.scopes is not None:
                c.scopes = body.scopes.model_dump()
            if body.is_default:
                for other in s.scalars(select(Cluster).where(Cluster.is_default.is_(True), Cluster.id != c.id)):
                    other.is_default = False
            if body.is_default is not None:
                c.is_default = body.is_default
            c.updated_at = now
            auth.audit(s, now, p.user, "cluster.update", f"cluster:{c.id}", body.model_dump(exclude_none=True))
            return cluster_view(c)

    @app.delete("/api/v1/clusters/{cluster_id}", tags=["clusters"], status_code=204)
    def delete_cluster(cluster_id: int, p: auth.Principal = cluster_writer) -> Response:
        now = clock.now()
        with sessions.begin() as s:
            c = get_cluster(s, cluster_id)
            s.delete(c)
            auth.audit(s, now, p.user, "cluster.delete", f"cluster:{cluster_id}", {"name": c.name})
        return Response(status_code=204)

    # ------------------------------------------------------------ members
    @app.get("/api/v1/members", tags=["members"])
    def list_members(type: str | None = Query(None, pattern="^(scheduler|seed_peer|peer)$"),
                     cluster_id: int | None = Query(None, ge=1, le=2**31),
                     state: str | None = Query(None, pattern="^(active|inactive|offline)$"),
                     p: auth.Principal = Depends(principal)) -> list[dict]:
        now = clock.now()
        with sessions() as s:
            q = select(Member).order_by(Member.id)
            if type:
                q = q.where(Member.type == type)
            if cluster_id:
                q = q.where(Member.cluster_id == cluster_id)
            out = [membership.member_view(m, now, interval, outage) for m in s.scalars(q)]
        return [m for m in out if state is None or m["state"] == state]

    def set_offline(member_id: int, offline: bool, reason: str, p: auth.Principal) -> dict:
        now = clock.now()
        with sessions.begin() as s:
            m = s.get(Member, member_id)
            if m is None:
                raise HTTPException(404, f"no member {member_id}")
            m.offline, m.offline_reason = offline, reason if offline else ""
            buffer.learn(m.id, offline, m.type)
            auth.audit(s, now, p.user, "member.offline" if offline else "member.online", f"member:{m.id}",
                       {"reason": reason} if offline else {})
            return membership.member_view(m, now, interval, outage)

    @app.post("/api/v1/members/{member_id}/offline", tags=["members"])
    def member_offline(member_id: int, body: OfflineIn, p: auth.Principal = cluster_writer) -> dict:
        return set_offline(member_id, True, body.reason, p)

    @app.post("/api/v1/members/{member_id}/online", tags=["members"])
    def member_online(member_id: int, p: auth.Principal = cluster_writer) -> dict:
        return set_offline(member_id, False, "", p)

    @app.delete("/api/v1/members/{member_id}", tags=["members"], status_code=204)
    def member_delete(member_id: int, p: auth.Principal = cluster_writer) -> Response:
        now = clock.now()
        with sessions.begin() as s:
            m = s.get(Member, member_id)
            if m is None:
                raise HTTPException(404, f"no member {member_id}")
            s.delete(m)
            auth.audit(s, now, p.user, "member.delete", f"member:{member_id}", {"hostname": m.hostname})
        buffer.forget(member_id)
        return Response(status_code=204)

    # ------------------------------------------------------------ dynamic config
    @app.get("/api/v1/config", tags=["config"])
    def get_config(cluster_id: int | None = Query(None, ge=1, le=2**31),
                   p: auth.Principal = Depends(principal)) -> dict:
        with sessions() as s:
            scope, ver, body = config_mod.effective(s, cluster_id)
            history = [{"scope": r.scope, "version": r.version, "created_by": r.created_by, "created_at": r.created_at}
                       for r in s.scalars(select(ConfigVersion).where(
                           ConfigVersion.scope == config_mod.scope_key(cluster_id))
                           .order_by(ConfigVersion.version.desc()).limit(50))]
        return {"scope": scope, "version": ver, "config": body, "history": history}

    @app.put("/api/v1/config", tags=["config"])
    def put_config(body: ConfigIn, cluster_id: int | None = Query(None, ge=1, le=2**31),
                   p: auth.Principal = cluster_writer) -> dict:
        now = clock.now()
        with sessions.begin() as s:
            if cluster_id is not None:
                get_cluster(s, cluster_id)
            scope = config_mod.scope_key(cluster_id)
            try:
                row = config_mod.put(s, scope, body.config, p.user, now, body.expected_version)
            except ValueError as exc:
                raise HTTPException(409, str(exc)) from None
            auth.audit(s, now, p.user, "config.update", scope, {"version": row.version, "config": row.body})
            return {"scope": scope, "version": row.version, "config": row.body}

    # ------------------------------------------------------------ jobs
    @app.get("/api/v1/jobs", tags=["jobs"])
    def list_jobs(state: str | None = Query(None, pattern="^(running|succeeded|failed|cancelled)$"),
                  limit: int = Query(100, ge=1, le=1000), p: auth.Principal = Depends(principal)) -> list[dict]:
        with sessions() as s:
            q = select(Job).order_by(Job.id.desc()).limit(limit)
            if state:
                q = q.where(Job.state == state)
            jobs = s.scalars(q).all()
            nodes: dict[int, list[JobNode]] = {}
            if jobs:
                query = select(JobNode).where(JobNode.job_id.in_([j.id for j in jobs])).order_by(JobNode.id)
                for n in s.scalars(query):
                    nodes.setdefault(n.job_id, []).append(n)
            return [jobs_mod.job_view(j, nodes.get(j.id, [])) for j in jobs]

    @app.post("/api/v1/jobs", tags=["jobs"], status_code=201)
    def create_job(body: jobs_mod.JobRequest, p: auth.Principal = job_writer) -> dict:
        now = clock.now()
        with sessions.begin() as s:
            try:
                job = jobs_mod.create_job(s, body, p.user, now, interval)
            except jobs_mod.ScopeError as exc:
                raise HTTPException(422, str(exc)) from None
            auth.audit(s, now, p.user, "job.create", f"job:{job.id}", body.model_dump())
            nodes = s.scalars(select(JobNode).where(JobNode.job_id == job.id).order_by(JobNode.id)).all()
            return jobs_mod.job_view(job, nodes)

    def get_job(s, job_id: int, lock: bool = False) -> Job:
        job = jobs_mod.lock_job(s, job_id) if lock else s.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    @app.get("/api/v1/jobs/{job_id}", tags=["jobs"])
    def show_job(job_id: int, p: auth.Principal = Depends(principal)) -> dict:
        with sessions() as s:
            job = get_job(s, job_id)
            return jobs_mod.job_view(job, s.scalars(select(JobNode).where(JobNode.job_id == job_id)
                                                    .order_by(JobNode.id)).all())

    @app.post("/api/v1/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel_job(job_id: int, p: auth.Principal = job_writer) -> dict:
        now = clock.now()
        with sessions.begin() as s:
            job = get_job(s, job_id, lock=True)
            if job.state in jobs_mod.TERMINAL:
                raise HTTPException(409, f"job {job_id} is already {job.state}")
            jobs_mod.cancel_job(s, job, now)
            auth.audit(s, now, p.user, "job.cancel", f"job:{job_id}", {})
            return jobs_mod.job_view(job, None)

    @app.post("/api/v1/jobs/{job_id}/retry", tags=["jobs"])
    def retry_job(job_id: int, p: auth.Principal = job_writer) -> dict:
        now = clock.now()
        with sessions.begin() as s:
            job = get_job(s, job_id, lock=True)
            if job.state != "failed":
                raise HTTPException(409, f"job {job_id} is {job.state}; only failed jobs are retried")
            n = jobs_mod.retry_job(s, job, now)
            auth.audit(s, now, p.user, "job.retry", f"job:{job_id}", {"nodes": n})
            return jobs_mod.job_view(job, None)

    @app.get("/api/v1/blobs", tags=["jobs"])
    def blob_locations(p: auth.Principal = Depends(principal)) -> list[dict]:
        """Where preheated blobs are: every node that reported a blob verified, by digest."""
        where: dict[str, dict] = {}
        with sessions() as s:
            for n in s.scalars(select(JobNode).where(JobNode.state == "succeeded")):
                for b in n.blobs or []:
                    if isinstance(b, dict) and b.get("verified"):
                        e = where.setdefault(b.get("digest", "?"), {"digest": b.get("digest"), "size": b.get("size"),
                                                                     "nodes": []})
                        if n.hostname not in e["nodes"]:
                            e["nodes"].append(n.hostname)
        return sorted(where.values(), key=lambda e: str(e["digest"]))

    # ------------------------------------------------------------ users, tokens, audit
    @app.get("/api/v1/users", tags=["auth"])
    def list_users(p: auth.Principal = Depends(root_only)) -> list[dict]:
        with sessions() as s:
            return [{"id": u.id, "name": u.name, "role": u.role, "created_at": u.created_at}
                    for u in s.scalars(select(User).order_by(User.id))]

    @app.post("/api/v1/users", tags=["auth"], status_code=201)
    def create_user(body: UserIn, p: auth.Principal = Depends(root_only)) -> dict:
        now = clock.now()
        try:
            with sessions.begin() as s:
                u = User(name=body.name, role=body.role, created_at=now)
                s.add(u)
                s.flush()
                auth.audit(s, now, p.user, "user.create", f"user:{u.id}", body.model_dump())
                return {"id": u.id, "name": u.name, "role": u.role, "created_at": u.created_at}
        except IntegrityError:
            raise HTTPException(409, f"a user named {body.name!r} exists") from None

    @app.post("/api/v1/users/{user_id}/tokens", tags=["auth"], status_code=201)
    def create_token(user_id: int, body: TokenIn, p: auth.Principal = Depends(root_only)) -> dict:
        now = clock.now()
        with sessions.begin() as s:
            u = s.get(User, user_id)
            if u is None:
                raise HTTPException(404, f"no user {user_id}")
            exp = now + body.ttl_seconds if body.ttl_seconds else None
            secret, row = auth.create_token(s, u, body.name, body.scopes, exp, now)
            auth.audit(s, now, p.user, "token.create", f"token:{row.id}",
                       {"user": u.name, "scopes": row.scopes, "expires_at": exp})
            return {**token_view(row), "token": secret}

    @app.get("/api/v1/tokens", tags=["auth"])
    def list_tokens(p: auth.Principal = Depends(root_only)) -> list[dict]:
        with sessions() as s:
            return [token_view(t) for t in s.scalars(select(Token).order_by(Token.id))]

    @app.delete("/api/v1/tokens/{token_id}", tags=["auth"], status_code=204)
    def revoke_token(token_id: int, p: auth.Principal = Depends(root_only)) -> Response:
        now = clock.now()
        with sessions.begin() as s:
            t = s.get(Token, token_id)
            if t is None:
                raise HTTPException(404, f"no token {token_id}")
            t.revoked = True
            auth.audit(s, now, p.user, "token.revoke", f"token:{token_id}", {})
        return Response(status_code=204)

    @app.get("/api/v1/join-tokens", tags=["auth"])
    def list_join_tokens(p: auth.Principal = Depends(principal)) -> list[dict]:
        with sessions() as s:
            return [token_view(t) for t in s.scalars(select(JoinToken).order_by(JoinToken.id))]

    @app.post("/api/v1/join-tokens", tags=["auth"], status_code=201)
    def create_join_token(body: JoinTokenIn, p: auth.Principal = cluster_writer) -> dict:
        now = clock.now()
        with sessions.begin() as s:
            if body.cluster_id is not None:
                get_cluster(s, body.cluster_id)
            exp = now + body.ttl_seconds if body.ttl_seconds else None
            secret, row = auth.create_join_token(s, body.name, body.cluster_id, exp, now)
            auth.audit(s, now, p.user, "join_token.create", f"join_token:{row.id}",
                       {"cluster_id": body.cluster_id, "expires_at": exp})
            return {**token_view(row), "token": secret}

    @app.delete("/api/v1/join-tokens/{token_id}", tags=["auth"], status_code=204)
    def revoke_join_token(token_id: int, p: auth.Principal = cluster_writer) -> Response:
        now = clock.now()
        with sessions.begin() as s:
            t = s.get(JoinToken, token_id)
            if t is None:
                raise HTTPException(404, f"no join token {token_id}")
            t.revoked = True
            auth.audit(s, now, p.user, "join_token.revoke", f"join_token:{token_id}", {})
        join_cache.clear()
        return Response(status_code=204)

    @app.get("/api/v1/audit", tags=["auth"])
    def audit_log(limit: int = Query(100, ge=1, le=1000), p: auth.Principal = Depends(root_only)) -> list[dict]:
        with sessions() as s:
            newest = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
            return [{"id": a.id, "ts": a.ts, "actor": a.actor, "action": a.action, "target": a.target,
                     "detail": a.detail} for a in s.scalars(newest)]

    return app


SETTINGS_ENV = "REMORA_MANAGER_SETTINGS"


def app_from_env() -> FastAPI:
    """App factory of each worker process (``--workers N``): settings come from the environment."""
    raw = json.loads(os.environ[SETTINGS_ENV])
    return create_app(Settings(db_url=raw["db_url"], keepalive_interval=raw["keepalive_interval"],
                               root_token_file=Path(raw["root_token_file"]) if raw["root_token_file"] else None,
                               ca_dir=Path(raw["ca_dir"]) if raw.get("ca_dir") else None,
                               tls_dir=Path(raw["tls_dir"]) if raw.get("tls_dir") else None,
                               engine=jobs_mod.EngineSettings(**raw["engine"])))


def serve(settings: Settings, host: str, port: int, workers: int = 1) -> None:
    """Run the manager until interrupted (uvicorn; access log off: keepalives would flood it).

    With ``workers > 1`` the database is migrated and bootstrapped once here, then uvicorn forks
    that many worker processes sharing the socket; each is a full replica (own keepalive buffer and
    job engine; job nodes are claimed with leases), exactly like replicas on several hosts.
    """
    import uvicorn

    tls_kw: dict = {}
    if settings.tls_dir is not None:
        from remora.plugins.manager import tls as tls_mod

        rel = tls_mod.reloader(settings.tls_dir)
        # ssl_certfile only tells uvicorn "this is HTTPS"; the factory's context is what is served.
        tls_kw = {"ssl_context_factory": tls_mod.SSLContextFactory(settings.tls_dir), "http": tls_mod.MemberTLSProtocol,
                  "ssl_certfile": str(rel.files.cert)}
    if workers <= 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False, **tls_kw)
        return
    engine, sessions = open_db(settings.db_url)
    with sessions.begin() as s:
        auth.bootstrap_root(s, settings.root_token_file, settings.clock.now())
    engine.dispose()
    os.environ[SETTINGS_ENV] = json.dumps({
        "db_url": settings.db_url, "keepalive_interval": settings.keepalive_interval,
        "root_token_file": str(settings.root_token_file) if settings.root_token_file else "",
        "ca_dir": str(settings.ca_dir) if settings.ca_dir else "",
        "tls_dir": str(settings.tls_dir) if settings.tls_dir else "",
        "engine": dataclasses.asdict(settings.engine)})
    uvicorn.run("remora.plugins.manager.api:app_from_env", factory=True, workers=workers, host=host, port=port,
                log_level="warning", access_log=False, **tls_kw)
