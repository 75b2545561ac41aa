"""The keepalive hot path (plugins/manager/fastpath.py + the batched buffer) on real manager processes.

* the fast path answers only what the FastAPI route would: a bad or missing join token, an invalid body,
  an unknown or deleted member still get the route's 401 / 422 / 404;
* two replicas on one database (SQLite and PostgreSQL): a scheduler keeping alive through replica A is
  never judged inactive by replica B while it lives (B sees A's batches), and B drops it from what peers
  receive within 3 keepalive intervals of its last keepalive once it stops.
"""
from __future__ import annotations

import time

import requests
from manager_util import ManagerProcess, wait_for

from remora.plugins.manager.client import Agent, ManagerClient

INTERVAL = 1.0


def _post(url: str, token: str | None, body, raw: bytes | None = None) -> requests.Response:
    s = requests.Session()
    s.trust_env = False
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        return s.post(url, data=raw, headers={**headers, "Content-Type": "application/json"}, timeout=10)
    return s.post(url, json=body, headers=headers, timeout=10)


def test_fast_path_refuses_what_the_route_refuses(manager_factory):
    m = manager_factory(keepalive_interval=30)
    join = m.ok("POST", "/api/v1/join-tokens", json={"name": "n"})["token"]
    c = ManagerClient(m.url, join)
    mid = c.register(type="peer", hostname="n1", ip="127.0.0.1", port=4000)["id"]
    url = f"{m.url}/api/v1/agent/{mid}/keepalive"
    ok = _post(url, join, {"load": 2.0, "config_version": 0, "fallbacks": {"no_scheduler": 1}})
    assert ok.status_code == 200 and ok.json() == {"state": "active", "keepalive_interval": 30.0}
    assert ok.headers["x-content-type-options"] == "nosniff"
    for _ in range(3):   # with the join token cached (the fast path's case) as much as without
        assert _post(url, None, {}).status_code == 401
        assert _post(url, "not-a-token", {}).status_code == 401
        r = _post(url, join, {"load": -1})
        assert r.status_code == 422 and "load" in r.text
        assert _post(url, join, {"surprise": 1}).status_code == 422
        assert _post(url, join, None, raw=b"{not json").status_code == 422
        assert _post(f"{m.url}/api/v1/agent/999999/keepalive", join, {}).status_code == 404
    assert _post(url, join, None, raw=b"{" + b" " * (5 << 20) + b"}").status_code == 413
    # the stats of the accepted keepalive reach the database (batched)
    wait_for(lambda: next(x for x in m.ok("GET", "/api/v1/members") if x["id"] == mid)["stats"].get("fallbacks")
             == {"no_scheduler": 1}, timeout=15, what="the keepalive's stats written")
    m.ok("DELETE", f"/api/v1/members/{mid}")
    assert _post(url, join, {}).status_code == 404
    # registering again gets a new id, which keeps alive on the fast path at once
    again = c.register(type="peer", hostname="n1", ip="127.0.0.1", port=4000)["id"]
    assert again != mid and _post(f"{m.url}/api/v1/agent/{again}/keepalive", join, {}).status_code == 200


def test_replicas_share_keepalives_and_expire_within_3_intervals(db_url, tmp_path):
    a = ManagerProcess(db_url, tmp_path, keepalive_interval=INTERVAL)
    (tmp_path / "b").mkdir()
    b = ManagerProcess(db_url, tmp_path / "b", keepalive_interval=INTERVAL)
    agent = None
    try:
        a.ok("POST", "/api/v1/clusters", json={"name": "c", "is_default": True})
        join = a.ok("POST", "/api/v1/join-tokens", json={"name": "n"})["token"]
        sched = ManagerClient(a.url, join)
        sched.register(type="scheduler", hostname="s1", ip="127.0.0.1", port=8002)
        assert sched.interval == INTERVAL / 2
        agent = Agent(sched, sched.registration).start()
        peer = ManagerClient(b.url, join)

        def names():
            return [s["hostname"] for s in peer.schedulers(ip="127.0.0.1")["schedulers"]]

        # alive through A: B sees it the whole time (several expiry periods), never a false "inactive"
        end = time.monotonic() + 4 * INTERVAL
        while time.monotonic() < end:
            assert names() == ["s1"]
            time.sleep(0.05)
        agent.stop()
        stopped = time.monotonic()   # its last keepalive was at most one period (I/2) before this
        wait_for(lambda: names() == [], timeout=20, interval=0.02, what="replica B dropping the scheduler")
        took = time.monotonic() - stopped
        print(f"\nreplica B dropped the stopped scheduler {took:.2f}s after its agent stopped (interval {INTERVAL}s)")
        assert took <= 3 * INTERVAL, took
        assert {x["hostname"]: x["state"] for x in b.ok("GET", "/api/v1/members", token=a.root)}["s1"] == "inactive"
    finally:
        if agent is not None:
            agent.stop()
        a.stop()
        b.stop()
