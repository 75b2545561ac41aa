"""Expiry rules under an injected clock (in-process app): exactly 3 missed keepalives, token and join-token TTLs."""
from __future__ import annotations

import threading

import requests
import uvicorn
from manager_util import free_port, wait_for

from remora.plugins.manager.api import Settings, create_app
from remora.plugins.manager.db import FakeClock


def test_expiry_boundaries_with_fake_clock(db_url, tmp_path):
    clock = FakeClock()
    app = create_app(Settings(db_url=db_url, keepalive_interval=1.0, clock=clock, run_jobs=False,
                              root_token_file=tmp_path / "root"))
    root = {"Authorization": "Bearer " + (tmp_path / "root").read_text().strip()}
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=30, what="in-process manager started")
        c = _Client(f"http://127.0.0.1:{port}")
        assert c.post("/api/v1/clusters", headers=root, json={"name": "c", "is_default": True}).status_code == 201
        jt = c.post("/api/v1/join-tokens", headers=root, json={"name": "j", "ttl_seconds": 60}).json()["token"]
        agent = {"Authorization": f"Bearer {jt}"}
        reg = c.post("/api/v1/agent/register", headers=agent,
                     json={"type": "scheduler", "hostname": "s1", "ip": "127.0.0.1", "port": 8002}).json()

        def names():
            return [s["hostname"] for s in c.get("/api/v1/agent/schedulers", headers=agent).json()["schedulers"]]

        assert reg["keepalive_interval"] == 0.5  # a scheduler keeps alive twice per interval
        clock.advance(1.5)  # exactly 3 missed keepalives (1.5 intervals): still active
        assert names() == ["s1"]
        clock.advance(0.01)  # a hair past: inactive, gone from what peers receive
        out = c.get("/api/v1/agent/schedulers", headers=agent).json()
        assert out["schedulers"] == [] and out["reason"] == "no cluster has an active scheduler"
        assert c.get("/api/v1/members", headers=root).json()[0]["state"] == "inactive"
        assert c.post(f"/api/v1/agent/{reg['id']}/keepalive", headers=agent, json={}).json()["state"] == "active"
        wait_for(lambda: names() == ["s1"], timeout=10, what="batched keepalive written")

        pat = c.post("/api/v1/users/1/tokens", headers=root, json={"name": "t", "scopes": ["job"],
                                                                   "ttl_seconds": 100}).json()["token"]
        clock.advance(60.0)  # t=61.51: the join token (60 s from t=0) expired, the PAT (100 s from t=1.51) not
        assert c.get("/api/v1/whoami", headers={"Authorization": f"Bearer {pat}"}).status_code == 200
        r = c.get("/api/v1/agent/schedulers", headers=agent)
        assert r.status_code == 401 and "expired" in r.json()["detail"]
        clock.advance(40.1)  # t=101.61: past the PAT's 101.51
        r = c.get("/api/v1/whoami", headers={"Authorization": f"Bearer {pat}"})
        assert r.status_code == 401 and r.json()["detail"] == "token expired"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class _Client:
    """requests against the in-process server, without proxies from the environment."""

    def __init__(self, base: str):
        self.base, self.http = base, requests.Session()
        self.http.trust_env = False

    def get(self, path, **kw):
        return self.http.get(self.base + path, timeout=30, **kw)

    def post(self, path, **kw):
        return self.http.post(self.base + path, timeout=30, **kw)
