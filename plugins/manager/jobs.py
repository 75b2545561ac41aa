"""Jobs (preheat, sync-peers, delete-task, gc): records, fan-out to peers, progress, cancel, retry.

A job is split into one ``JobNode`` per target node at creation. The engine (one thread per manager
replica) claims due nodes with a lease (a conditional UPDATE, safe with several replicas on one
PostgreSQL), drives each through the peer task API below, and records progress and errors. A node
that fails is retried with exponential backoff up to ``max_attempts``; a job past its ``timeout``
fails its unfinished nodes with that reason, so a preheat never fails or times out silently.

Peer task API (served by ``remora peer``; this module is its only client)::

    POST   {peer}/api/v1/tasks        {"id", "type", "image"?, "blobs"?: [{"digest","size"}],
                                       "priority": ["bootstrap", "hot"]}     -> 200/201/202 (409 = exists)
    GET    {peer}/api/v1/tasks/{id}   -> {"state": queued|running|succeeded|failed|cancelled,
                                          "error": str, "blobs": [{"digest", "size",
                                          "verified_bytes", "verified": bool, "deleted"?: bool}]}
    DELETE {peer}/api/v1/tasks/{id}   -> 200/204/404

For a remora image the peer fetches the bootstrap and the hot blob first (``priority``). A preheat
node succeeds only when the peer reports ``succeeded`` *and* every blob (every blob the job named,
with its size) as verified with all its bytes; anything less is an error, retried like any other.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from remora.plugins.manager.config import DIGEST_RE
from remora.plugins.manager.db import Clock, Cluster, Job, JobNode, Member
from remora.plugins.manager.membership import MISSED_KEEPALIVES, state_of

log = logging.getLogger("remora.manager.jobs")

TYPES = ("preheat", "sync-peers", "delete-task", "gc")
TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("pending", "running", "retry_wait", "cancelling")
IMAGE_RE = r"^[A-Za-z0-9][A-Za-z0-9._:/@\-]{0,511}$"
REPOSITORY_RE = r"^[A-Za-z0-9][A-Za-z0-9.\-]*(:[0-9]{1,5})?/[a-z0-9]+(?:[._/-][a-z0-9]+)*$"


class BlobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    digest: str = Field(pattern=DIGEST_RE)
    size: int = Field(ge=0, le=1 << 44)


class JobScope(BaseModel):
    """Where a job runs: one seed peer, all seed peers, all peers of a cluster, or named nodes."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(pattern="^(one_seed_peer|all_seed_peers|all_peers|nodes)$")
    cluster: str | None = Field(None, max_length=64)
    nodes: list[str] = Field(default_factory=list, max_length=10_000, description="hostnames or member ids")

    @model_validator(mode="after")
    def _nodes(self):
        if self.kind == "nodes" and not self.nodes:
            raise ValueError("scope kind 'nodes' needs a non-empty node list")
        if self.kind != "nodes" and self.nodes:
            raise ValueError("a node list is only valid with scope kind 'nodes'")
        return self


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(pattern="^(preheat|sync-peers|delete-task|gc)$")
    image: str | None = Field(None, pattern=IMAGE_RE)
    repository: str | None = Field(None, pattern=REPOSITORY_RE, description="registry/repository the blobs are "
                                   "in (needed by a blob preheat: the peer fetches and authorizes per repository)")
    blobs: list[BlobSpec] = Field(default_factory=list, max_length=10_000)
    scope: JobScope
    max_attempts: int = Field(3, ge=1, le=20)
    timeout: float = Field(1800.0, gt=0, le=7 * 86_400, description="seconds before unfinished nodes fail")
    pull: bool = Field(False, strict=True,
                       description="preheat of a remora image: each node's snapshotter then pulls it into containerd "
                                   "(peers run with --runtime-pull-api); a node succeeds only once it is there")

    @model_validator(mode="after")
    def _content(self):
        if self.pull and (self.type != "preheat" or not self.image):
            raise ValueError("pull goes with a preheat of an image (it makes that image ready in containerd)")
        if self.type in ("preheat", "delete-task") and not (self.image or self.blobs):
            raise ValueError(f"a {self.type} job needs an image reference or a blob list")
        if self.type in ("sync-peers", "gc") and (self.image or self.blobs or self.repository):
            raise ValueError(f"a {self.type} job takes no image, repository or blobs")
        if self.type == "preheat" and self.blobs and not self.image and not self.repository:
            raise ValueError("a preheat of a blob list needs the repository the blobs are in "
                             "(REGISTRY/REPOSITORY): peers fetch and authorize blobs per repository")
        if self.image and self.repository:
            raise ValueError("give an image reference or a repository, not both (the image names its repository)")
        return self


class ScopeError(ValueError):
    pass


MAX_STATUS = 8 << 20  # a peer's status answer larger than this is an error, not a memory hog


def _read_capped(r: requests.Response, cap: int) -> bytes:
    buf = bytearray()
    for chunk in r.iter_content(64 << 10):
        buf += chunk
        if len(buf) > cap:
            raise ValueError(f"peer status larger than {cap} bytes")
    return bytes(buf)


def resolve_targets(session: Session, req: JobRequest, now: float, interval: float) -> list[tuple[Member, str]]:
    """(member, reason-it-cannot-run or '') for every node of the scope; ScopeError when none exist."""
    q = select(Member).where(Member.type.in_(("seed_peer", "peer"))).order_by(Member.id)
    if req.scope.cluster is not None:
        cluster = session.scalar(select(Cluster).where(Cluster.name == req.scope.cluster))
        if cluster is None:
            raise ScopeError(f"no cluster named {req.scope.cluster!r}")
        q = q.where(Member.cluster_id == cluster.id)
    members = session.scalars(q).all()
    kind = req.scope.kind
    if kind == "nodes":
        wanted, picked = list(dict.fromkeys(req.scope.nodes)), []
        for name in wanted:
            hit = [m for m in members if m.hostname == name or str(m.id) == name]
            if not hit:
                raise ScopeError(f"unknown node {name!r}")
            picked.extend(hit)
        members = list(dict.fromkeys(picked))
    elif kind in ("one_seed_peer", "all_seed_peers"):
        members = [m for m in members if m.type == "seed_peer"]
        if kind == "one_seed_peer":
            live = [m for m in members if state_of(m, now, interval) == "active" and m.api_port]
            live.sort(key=lambda m: ((m.stats or {}).get("load", 0.0), m.id))
            members = live[:1]
    if not members:
        raise ScopeError(f"no {kind.replace('_', ' ')} node in scope")
    out = []
    for m in members:
        st = state_of(m, now, interval)
        if st != "active":
            reason = (f"node is {st}" + (f" (no keepalive for {now - m.last_seen:.0f}s, "
                                         f"{MISSED_KEEPALIVES} keepalives missed)" if st == "inactive" else ""))
        elif not m.api_port:
            reason = "node has no task API port"
        else:
            reason = ""
        out.append((m, reason))
    return out


def create_job(session: Session, req: JobRequest, actor: str, now: float, interval: float) -> Job:
    targets = resolve_targets(session, req, now, interval)
    args = {"image": req.image, "repository": req.repository, "blobs": [b.model_dump() for b in req.blobs]}
    if req.pull:
        args["pull"] = True
    job = Job(type=req.type, state="running", args=args,
              scope=req.scope.model_dump(), max_attempts=req.max_attempts, timeout=req.timeout, created_by=actor,
              created_at=now, finished_at=None, error="")
    session.add(job)
    session.flush()
    for m, reason in targets:
        total = sum(b.size for b in req.blobs)
        session.add(JobNode(job_id=job.id, member_id=m.id, hostname=m.hostname, url=f"http://{_host(m.ip)}:{m.api_port}",
                            state="failed" if reason else "pending", attempts=0, next_at=now,
                            finished_at=now if reason else None, lease_owner="", lease_until=0.0,
                            bytes_total=total, bytes_verified=0, blobs=[], error=reason))
    session.flush()
    finish_if_done(session, job, now)
    return job


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def lock_job(session: Session, job_id: int) -> Job | None:
    """The job row, locked for this transaction (FOR UPDATE on PostgreSQL; SQLite serializes writers)."""
    return session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()


def finish_if_done(session: Session, job: Job, now: float) -> bool:
    """Set the job's final state once every node is terminal; True when it just finished."""
    if job.state in TERMINAL:
        return False
    states = [s for (s,) in session.execute(select(JobNode.state).where(JobNode.job_id == job.id))]
    if any(s not in TERMINAL for s in states):
        return False
    failed = states.count("failed")
    job.state = "failed" if failed else "succeeded"
    job.error = f"{failed} of {len(states)} nodes failed" if failed else ""
    job.finished_at = now
    return True


def cancel_job(session: Session, job: Job, now: float) -> None:
    job.state, job.finished_at, job.error = "cancelled", now, "cancelled by operator"
    session.execute(update(JobNode).where(JobNode.job_id == job.id, JobNode.state.in_(("pending", "retry_wait")))
                    .values(state="cancelled", finished_at=now, error="cancelled before it started"))
    session.execute(update(JobNode).where(JobNode.job_id == job.id, JobNode.state == "running")
                    .values(state="cancelling", next_at=now))


def retry_job(session: Session, job: Job, now: float) -> int:
    """Run the failed nodes again from attempt 0; returns how many."""
    res = session.execute(update(JobNode).where(JobNode.job_id == job.id, JobNode.state == "failed")
                          .values(state="pending", attempts=0, next_at=now, error="", finished_at=None))
    if res.rowcount:
        job.state, job.finished_at, job.error = "running", None, ""
    return res.rowcount


def job_view(job: Job, nodes: list[JobNode] | None) -> dict:
    out = {"id": job.id, "type": job.type, "state": job.state, "args": job.args, "scope": job.scope,
           "max_attempts": job.max_attempts, "timeout": job.timeout, "created_by": job.created_by,
           "created_at": job.created_at, "finished_at": job.finished_at, "error": job.error}
    if nodes is not None:
        out["nodes"] = [{"id": n.id, "member_id": n.member_id, "hostname": n.hostname, "url": n.url, "state": n.state,
                         "attempts": n.attempts, "bytes_total": n.bytes_total, "bytes_verified": n.bytes_verified,
                         "blobs": n.blobs, "error": n.error, "started_at": n.started_at,
                         "finished_at": n.finished_at} for n in nodes]
        counts: dict[str, int] = {}
        for n in nodes:
            counts[n.state] = counts.get(n.state, 0) + 1
        out["counts"] = counts
    return out


def check_result(job: Job, status: dict) -> tuple[bool, str, int, int]:
    """(ok, error, bytes_total, bytes_verified) for a peer's final task status."""
    blobs = status.get("blobs") or []
    if not isinstance(blobs, list):
        return False, "peer sent a malformed blob list", 0, 0
    total = sum(int(b.get("size", 0)) for b in blobs if isinstance(b, dict))
    verified = sum(int(b.get("verified_bytes", 0)) for b in blobs if isinstance(b, dict))
    by_digest = {b.get("digest"): b for b in blobs if isinstance(b, dict)}
    if job.type == "preheat":
        if not blobs:
            return False, "peer reported success without any blob", total, verified
        for want in job.args.get("blobs") or []:
            got = by_digest.get(want["digest"])
            if got is None:
                return False, f"peer did not report blob {want['digest']}", total, verified
            if int(got.get("size", -1)) != want["size"]:
                return False, f"blob {want['digest']}: peer size {got.get('size')} != {want['size']}", total, verified
        for b in by_digest.values():
            if not b.get("verified") or int(b.get("verified_bytes", -1)) != int(b.get("size", -2)):
                return (False, f"blob {b.get('digest')}: only {b.get('verified_bytes', 0)} of {b.get('size')} "
                               "bytes verified", total, verified)
        pulled = status.get("pull")
        if job.args.get("pull") and not (isinstance(pulled, dict) and pulled.get("state") in ("done", "skipped")):
            return False, "peer reported success without the pull into containerd it was asked for", total, verified
    elif job.type == "delete-task":
        for want in job.args.get("blobs") or []:
            got = by_digest.get(want["digest"])
            if got is None or not got.get("deleted"):
                return False, f"peer did not confirm deleting {want['digest']}", total, verified
    return True, "", total, verified


def read_peer_token(path: str) -> str:
    """The peers' preheat token from ``path`` (one line); a clear UsageError when it is missing or empty."""
    from remora.errors import UsageError

    try:
        token = open(path, encoding="utf-8").read().strip()
    except OSError as exc:
        raise UsageError(f"--peer-token-file {path}: {exc.strerror}") from None
    if not token:
        raise UsageError(f"--peer-token-file {path} is empty")
    return token


@dataclass
class EngineSettings:
    tick: float = 0.2           # how often due nodes are looked for
    poll: float = 1.0           # how often a running node's status is fetched
    backoff_base: float = 2.0   # first retry delay; doubles per attempt
    backoff_max: float = 60.0
    lease: float = 30.0         # a claimed node is another replica's again after this
    http_timeout: float = 10.0
    workers: int = 16
    peer_token_file: str | None = None  # bearer token the peers' task API wants (their --preheat-token-file)


class Engine:
    """Drives job nodes; one per manager process, started and stopped with the app."""

    def __init__(self, sessions: sessionmaker, clock: Clock, settings: EngineSettings, metrics=None):
        self.sessions, self.clock, self.s, self.metrics = sessions, clock, settings, metrics
        self.owner = uuid.uuid4().hex[:16]
        self.stop_event = threading.Event()
        self.http = requests.Session()
        self.http.trust_env = False  # peers are direct addresses: never through an environment proxy
        if settings.peer_token_file:
            self.http.headers["Authorization"] = f"Bearer {read_peer_token(settings.peer_token_file)}"
        self.pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="job")
        self.thread = threading.Thread(target=self._run, name="job-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._sweep()
                for node_id in self._claim():
                    self.pool.submit(self._step_safe, node_id)
            except Exception:
                log.exception("job engine tick failed")
            self.stop_event.wait(self.s.tick)

    def _sweep(self) -> None:
        """Safety net: finish running jobs whose nodes are all terminal (e.g. after a crash mid-step)."""
        unfinished = select(JobNode.id).where(JobNode.job_id == Job.id, JobNode.state.not_in(TERMINAL)).exists()
        with self.sessions() as session:
            ids = session.scalars(select(Job.id).where(Job.state == "running", ~unfinished).limit(100)).all()
        for job_id in ids:
            with self.sessions.begin() as session:
                job = lock_job(session, job_id)
                if job is not None and finish_if_done(session, job, self.clock.now()) and self.metrics is not None:
                    self.metrics.job_duration.labels(job.type, job.state).observe(job.finished_at - job.created_at)

    def _claim(self) -> list[int]:
        """Lease the nodes that are due to this engine: the ids it may step now. Another replica's lease is
        never taken: the UPDATE re-checks ``lease_until`` row by row (PostgreSQL re-reads a row another
        transaction just claimed; SQLite has one writer at a time), and only the rows it changed are ours.

        One UPDATE for the whole batch (one transaction, one commit) where there used to be one per node:
        every due node of every running job is claimed each tick, ~8 commits a second for an 8-node job
        and up to ``workers * 4`` a tick for a large one. The SELECT stays a transaction of its own, so a
        SQLite writer never has to upgrade a read lock another replica may also hold."""
        now = self.clock.now()
        with self.sessions.begin() as session:
            due = session.scalars(select(JobNode.id).where(JobNode.state.in_(ACTIVE), JobNode.next_at <= now,
                                                           JobNode.lease_until < now)
                                  .order_by(JobNode.next_at).limit(self.s.workers * 4)).all()
        if not due:
            return []
        lease = (update(JobNode).where(JobNode.lease_until < now)
                 .values(lease_owner=self.owner, lease_until=now + self.s.lease))
        with self.sessions.begin() as session:
            if session.get_bind().dialect.update_returning:
                won = set(session.execute(lease.where(JobNode.id.in_(sorted(due))).returning(JobNode.id),
                                          execution_options={"synchronize_session": False}).scalars())
                return [node_id for node_id in due if node_id in won]   # due order: the most overdue first
        claimed = []   # a database without UPDATE ... RETURNING (SQLite older than 3.35): one row at a time
        for node_id in due:
            with self.sessions.begin() as session:
                res = session.execute(lease.where(JobNode.id == node_id))
                if res.rowcount == 1:
                    claimed.append(node_id)
        return claimed

    def _step_safe(self, node_id: int) -> None:
        try:
            self.step(node_id)
        except Exception:
            log.exception("job node %s step failed", node_id)
            with self.sessions.begin() as session:
                session.execute(update(JobNode).where(JobNode.id == node_id, JobNode.lease_owner == self.owner)
                                .values(lease_until=0.0, next_at=self.clock.now() + self.s.poll))

    @staticmethod
    def _task_id(node: JobNode, attempt: int) -> str:
        """One peer task per attempt: a retry must not find the failed task of the last one."""
        return f"job-{node.job_id}-node-{node.id}-a{attempt}"

    def step(self, node_id: int) -> None:
        with self.sessions.begin() as session:
            node = session.get(JobNode, node_id)
            job = session.get(Job, node.job_id)
            if node.state in TERMINAL:
                node.lease_until = 0.0
                return
            url, state, max_attempts = node.url, node.state, job.max_attempts
            task_id = self._task_id(node, node.attempts if state in ("running", "cancelling") else node.attempts + 1)
            if job.state == "cancelled" and state != "cancelling":
                state = "cancelling"
            job_snapshot = Job(id=job.id, type=job.type, args=dict(job.args), timeout=job.timeout)
            expired = self.clock.now() - job.created_at > job.timeout
        # network I/O happens outside any transaction
        update_fn = None
        if state == "cancelling":
            try:
                self.http.delete(f"{url}/api/v1/tasks/{task_id}", timeout=self.s.http_timeout)
            except requests.RequestException as exc:
                log.info("cancel of %s on %s: %s", task_id, url, exc)
            def update_fn(n):
                return self._terminal(n, "cancelled", "cancelled by operator")
        elif expired:
            try:
                self.http.delete(f"{url}/api/v1/tasks/{task_id}", timeout=self.s.http_timeout)
            except requests.RequestException:
                pass
            def update_fn(n):
                return self._terminal(n, "failed", (n.error + "; " if n.error else "") +
                                      f"timed out after {job_snapshot.timeout:g}s")
        elif state in ("pending", "retry_wait"):
            body = {"id": task_id, "type": job_snapshot.type, "image": job_snapshot.args.get("image"),
                    "blobs": job_snapshot.args.get("blobs") or [], "priority": ["bootstrap", "hot"]}
            if job_snapshot.args.get("repository"):
                body["repository"] = job_snapshot.args["repository"]
            if job_snapshot.args.get("pull"):
                body["pull"] = True
            try:
                r = self.http.post(f"{url}/api/v1/tasks", json=body, timeout=self.s.http_timeout)
                err = "" if r.status_code in (200, 201, 202, 409) else \
                    f"peer refused the task: HTTP {r.status_code} {r.text[:200]}"
            except requests.RequestException as exc:
                err = f"peer unreachable: {exc.__class__.__name__}: {str(exc)[:200]}"

            def update_fn(n, err=err):
                n.attempts += 1
                if err:
                    self._failure(n, err, max_attempts)
                else:
                    n.state, n.error = "running", ""
                    n.started_at = n.started_at or self.clock.now()
                    n.next_at = self.clock.now() + self.s.poll
        elif state == "running":
            status, err = None, ""
            try:
                with self.http.get(f"{url}/api/v1/tasks/{task_id}", timeout=self.s.http_timeout, stream=True) as r:
                    if r.status_code == 404:
                        err = "peer lost the task (restarted?)"
                    elif r.status_code != 200:
                        err = f"peer status: HTTP {r.status_code}"
                    else:
                        status = json.loads(_read_capped(r, MAX_STATUS))
                        if not isinstance(status, dict):
                            status, err = None, "peer sent a malformed status"
            except (requests.RequestException, ValueError) as exc:
                err = f"peer unreachable: {exc.__class__.__name__}: {str(exc)[:200]}"

            def update_fn(n, status=status, err=err):
                if err:
                    return self._failure(n, err, max_attempts)
                blobs = status.get("blobs") if isinstance(status.get("blobs"), list) else []
                n.blobs = blobs[:10_000]
                n.bytes_total = max(n.bytes_total, sum(int(b.get("size", 0)) for b in blobs if isinstance(b, dict)))
                n.bytes_verified = sum(int(b.get("verified_bytes", 0)) for b in blobs if isinstance(b, dict))
                st = status.get("state")
                if st == "succeeded":
                    ok, why, total, verified = check_result(job_snapshot, status)
                    if ok:
                        self._terminal(n, "succeeded", "")
                        if self.metrics is not None and job_snapshot.type == "preheat":
                            self.metrics.preheated_bytes.inc(verified)
                    else:
                        self._failure(n, why, max_attempts)
                elif st in ("failed", "cancelled"):
                    self._failure(n, f"peer: {st}: {str(status.get('error', ''))[:500]}", max_attempts)
                else:
                    n.next_at = self.clock.now() + self.s.poll
        with self.sessions.begin() as session:
            job_id = session.scalar(select(JobNode.job_id).where(JobNode.id == node_id))
            # lock the job row first: concurrent final steps of one job's nodes serialize here, so the
            # last one always sees every other node's final state (READ COMMITTED on PostgreSQL)
            job = lock_job(session, job_id)
            node = session.get(JobNode, node_id)
            if node.lease_owner != self.owner or node.state in TERMINAL:
                return
            if job.state == "cancelled" and state != "cancelling":
                node.state, node.next_at = "cancelling", self.clock.now()  # cancelled while we talked to the peer
            else:
                update_fn(node)
            node.lease_until = 0.0
            session.flush()
            if finish_if_done(session, job, self.clock.now()) and self.metrics is not None:
                self.metrics.job_duration.labels(job.type, job.state).observe(job.finished_at - job.created_at)

    def _terminal(self, n: JobNode, state: str, error: str) -> None:
        n.state, n.error, n.finished_at = state, error, self.clock.now()

    def _failure(self, n: JobNode, err: str, max_attempts: int) -> None:
        if n.attempts >= max_attempts:
            self._terminal(n, "failed", f"after {n.attempts} attempt(s): {err}")
        else:
            delay = min(self.s.backoff_max, self.s.backoff_base * 2 ** max(0, n.attempts - 1))
            n.state, n.error = "retry_wait", err
            n.next_at = self.clock.now() + delay * random.uniform(0.9, 1.1)


__all__ = [
    "Engine",
    "EngineSettings",
    "JobRequest",
    "ScopeError",
    "cancel_job",
    "create_job",
    "job_view",
    "resolve_targets",
    "retry_job",
]
