"""Storage: migrations match the models on both databases; replicas share one database."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from manager_util import ManagerProcess, wait_for

from remora.plugins.manager.client import ManagerClient
from remora.plugins.manager.db import Base, make_engine, migrate


def test_migrations_match_models_and_are_idempotent(db_url):
    engine = make_engine(db_url)
    try:
        migrate(engine)
        migrate(engine)  # a second start is a no-op
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0001"
    finally:
        engine.dispose()


def test_two_replicas_share_state(db_url, tmp_path):
    a = ManagerProcess(db_url, tmp_path, keepalive_interval=5)
    (tmp_path / "b").mkdir()
    b = ManagerProcess(db_url, tmp_path / "b", keepalive_interval=5)
    try:
        # only the first start bootstrapped root; the second replica reuses the same users
        assert a.root.startswith("rmt_") and b.root == ""
        assert b.call("GET", "/api/v1/clusters", token="").status_code == 401
        b.root = a.root
        a.ok("POST", "/api/v1/clusters", json={"name": "shared", "is_default": True})
        assert [c["name"] for c in b.ok("GET", "/api/v1/clusters")] == ["shared"]
        join = b.ok("POST", "/api/v1/join-tokens", json={"name": "n"})["token"]
        sched = ManagerClient(a.url, join)
        sched.register(type="scheduler", hostname="s1", ip="127.0.0.1", port=8002)
        # keepalive through the other replica, peers served by either
        ManagerClient(b.url, join).http.post(f"{b.url}/api/v1/agent/{sched.member_id}/keepalive", json={"load": 3},
                                             timeout=5).raise_for_status()
        # keepalives are written in batches: the other replica sees it within one flush
        wait_for(lambda: ManagerClient(a.url, join).schedulers()["schedulers"][0]["stats"].get("load") == 3,
                 timeout=10, what="keepalive through replica b visible on replica a")
    finally:
        a.stop()
        b.stop()


def test_worker_processes_share_one_database(db_url, tmp_path):
    """``--workers 2``: migrated and bootstrapped once, then every worker serves the same state."""
    m = ManagerProcess(db_url, tmp_path, keepalive_interval=5, extra=["--workers", "2"])
    try:
        m.ok("POST", "/api/v1/clusters", json={"name": "w", "is_default": True})
        join = m.ok("POST", "/api/v1/join-tokens", json={"name": "n"})["token"]
        clients = [ManagerClient(m.url, join) for _ in range(8)]
        for i, c in enumerate(clients):  # new connections: spread over the workers by the kernel
            c.register(type="scheduler", hostname=f"s{i}", ip="127.0.0.1", port=9000 + i)
            c.keepalive(load=i)
        wait_for(lambda: sorted(s["stats"].get("load", -1) for s in clients[0].schedulers()["schedulers"])
                 == list(range(8)), timeout=15, what="keepalives from all workers written")
        assert [u["name"] for u in m.ok("GET", "/api/v1/users")] == ["root"]
    finally:
        m.stop()
