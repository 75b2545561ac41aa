"""The job engine in-process on both databases: the end of a job is never lost to a race."""
from __future__ import annotations

from manager_util import wait_for

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
