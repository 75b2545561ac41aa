"""The job engine in-process on both databases: the end of a job is never lost to a race."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from manager_util import wait_for
from sqlalchemy import select

from remora.plugins.manager.db import Clock, Job, JobNode, open_db
from remora.plugins.manager.jobs import Engine, EngineSettings


def test_sweep_finishes_jobs_whose_nodes_all_ended(db_url):
    """Two nodes ending at once on PostgreSQL (READ COMMITTED) could each see the other unfinished;
    the job row lock prevents it and the sweep repairs any job left running with only ended nodes."""
    engine, sessions = open_db(db_url)
    clock = Clock()
    now = clock.now()
    with sessions.begin() as s:
        job = Job(type="gc", state="running", args={}, scope={"kind": "all_peers"}, max_attempts=1, timeout=60,
                  created_by="t", created_at=now, finished_at=None, error="")
        s.add(job)
        s.flush()
        for i, state in enumerate(("succeeded", "failed")):
            s.add(JobNode(job_id=job.id, member_id=None, hostname=f"n{i}", url="http://127.0.0.1:9", state=state,
                          attempts=1, next_at=now, finished_at=now, lease_owner="", lease_until=0.0, bytes_total=0,
                          bytes_verified=0, blobs=[], error="x" if state == "failed" else ""))
        job_id = job.id
    eng = Engine(sessions, clock, EngineSettings(tick=0.05))
    eng.start()
    try:
        def state():
            with sessions() as s:
                return s.get(Job, job_id).state
        assert wait_for(lambda: state() != "running" and state(), timeout=20, what="sweep") == "failed"
        with sessions() as s:
            assert s.get(Job, job_id).error == "1 of 2 nodes failed"
    finally:
        eng.stop()
        engine.dispose()


def _due_nodes(sessions, now: float, n: int) -> list[int]:
    with sessions.begin() as s:
        job = Job(type="gc", state="running", args={}, scope={"kind": "all_peers"}, max_attempts=1, timeout=60,
                  created_by="t", created_at=now, finished_at=None, error="")
        s.add(job)
        s.flush()
        nodes = [JobNode(job_id=job.id, member_id=None, hostname=f"n{i}", url="http://127.0.0.1:9", state="pending",
                         attempts=0, next_at=now - i, finished_at=None, lease_owner="", lease_until=0.0,
                         bytes_total=0, bytes_verified=0, blobs=[], error="") for i in range(n)]
        s.add_all(nodes)
        s.flush()
        return [node.id for node in nodes]


@pytest.mark.parametrize("returning", [True, False], ids=["update-returning", "row-by-row"])
def test_two_replicas_never_claim_the_same_node(db_url, returning):
    """Each due node is leased to exactly one engine however their claims interleave, with one UPDATE per
    batch (RETURNING) or, on a database without it, one per node; the most overdue come first."""
    engine, sessions = open_db(db_url)
    if not returning:
        engine.dialect.update_returning = False
    clock = Clock()
    ids = _due_nodes(sessions, clock.now(), 60)
    engines = [Engine(sessions, clock, EngineSettings(workers=16)) for _ in range(2)]   # 64 per claim: all
    try:
        with ThreadPoolExecutor(2) as pool:
            claims = list(pool.map(lambda e: e._claim(), engines))
        assert sorted(claims[0] + claims[1]) == sorted(ids)          # every node once, none twice
        assert not set(claims[0]) & set(claims[1])
        for claimed in claims:
            assert claimed == sorted(claimed, key=ids.index, reverse=True)   # next_at order: oldest first
        with sessions() as s:
            owner = {n.id: n.lease_owner for n in s.scalars(select(JobNode).where(JobNode.id.in_(ids)))}
        for e, claimed in zip(engines, claims):
            assert all(owner[i] == e.owner for i in claimed)
        assert all(e._claim() == [] for e in engines)                # leased: nobody takes them again
    finally:
        for e in engines:
            e.pool.shutdown(wait=False)
        engine.dispose()
