"""Dynamic config: versions, validation, per-cluster override, delivery to a running agent."""
from __future__ import annotations

import threading

from manager_util import wait_for

from remora.piecelayout import MAX_PIECE_SIZE, MIN_PIECE_SIZE
from remora.plugins.manager.client import Agent, ManagerClient
from remora.plugins.manager.config import DynamicConfig

GOOD = {"scheduler": {"candidate_parent_limit": 6, "filter_parent_limit": 30},
        "peer": {"upload_rate_limit": 50 << 20, "download_rate_limit": 0, "upload_concurrency_limit": 20},
        "blocklist": {"repositories": ["library/secret"], "tags": ["debug"], "digests": ["sha256:" + "a" * 64]},
        "piece_size": {"min": 1 << 20, "max": 8 << 20},
        "gc": {"high_watermark_percent": 90, "low_watermark_percent": 60, "interval_seconds": 30}}


def test_config_versions_validation_and_delivery(manager_factory):
    manager = manager_factory(keepalive_interval=0.3)
    cur = manager.ok("GET", "/api/v1/config")
    assert cur["version"] == 0 and cur["scope"] == "default" and cur["config"] == DynamicConfig().model_dump()
    # the defaults are "the daemon's own value": a field left out retunes nothing (the flags, or the
    # mesh's built-in piece bounds, stay in force)
    assert cur["config"]["scheduler"] == {"candidate_parent_limit": None, "filter_parent_limit": None}
    assert cur["config"]["peer"]["upload_concurrency_limit"] is None
    assert cur["config"]["gc"] == {"high_watermark_percent": None, "low_watermark_percent": None,
                                   "interval_seconds": None}
    assert cur["config"]["piece_size"] == {"min": MIN_PIECE_SIZE, "max": MAX_PIECE_SIZE}

    join = manager.ok("POST", "/api/v1/join-tokens", json={"name": "n"})["token"]
    applied: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def on_config(version, cfg):
        with lock:
            applied.append((version, cfg))

    mc = ManagerClient(manager.url, join)
    agent = Agent(mc, {"type": "peer", "hostname": "p1", "ip": "127.0.0.1", "port": 1}, on_config=on_config)
    agent.start()
    try:
        v1 = manager.ok("PUT", "/api/v1/config", json={"config": GOOD, "expected_version": 0})
        assert v1["version"] == 1 and v1["scope"] == "global"
        # the running agent applies it without restart, and reports the version it runs
        wait_for(lambda: any(v == 1 for v, _ in applied), timeout=10, what="agent applied version 1")
        assert applied[-1][1]["scheduler"]["candidate_parent_limit"] == 6
        wait_for(lambda: manager.ok("GET", "/api/v1/members")[0]["stats"].get("config_version") == 1,
                 timeout=10, what="member reports config version 1")

        # stale writer: 409, nothing stored
        r = manager.call("PUT", "/api/v1/config", json={"config": GOOD, "expected_version": 0})
        assert r.status_code == 409 and "version 1" in r.json()["detail"]
        bad_cases = [
            ("scheduler", {"candidate_parent_limit": 50, "filter_parent_limit": 30}),
            ("scheduler", {"candidate_parent_limit": 0}),
            ("peer", {"upload_rate_limit": -1}),
            ("peer", {"upload_concurrency_limit": 10**9}),
            ("blocklist", {"digests": ["sha256:xyz"]}),
            ("blocklist", {"repositories": ["UPPER/Case"]}),
            ("blocklist", {"tags": ["-bad"]}),
            ("piece_size", {"min": 3 << 20, "max": 8 << 20}),
            ("piece_size", {"min": 16 << 20, "max": 8 << 20}),
            ("piece_size", {"min": 1024, "max": 8 << 20}),
            ("piece_size", {"min": 128 << 10, "max": 8 << 20}),    # below what peers and schedulers accept
            ("piece_size", {"min": 1 << 20, "max": 32 << 20}),     # above it
            ("gc", {"high_watermark_percent": 90}),                  # a high watermark without a low one
            ("gc", {"high_watermark_percent": 50, "low_watermark_percent": 60}),
            ("gc", {"high_watermark_percent": 101}),
            ("nonsense", {}),
        ]
        for section, value in bad_cases:
            body = {**GOOD, section: value}
            r = manager.call("PUT", "/api/v1/config", json={"config": body})
            assert r.status_code == 422, (section, value, r.text)
        assert manager.ok("GET", "/api/v1/config")["version"] == 1

        # per-cluster override: members of that cluster get it, others keep the global one
        c = manager.ok("POST", "/api/v1/clusters", json={"name": "edge"})
        edge = {**GOOD, "gc": {"high_watermark_percent": 70, "low_watermark_percent": 50, "interval_seconds": 10}}
        out = manager.ok("PUT", f"/api/v1/config?cluster_id={c['id']}", json={"config": edge})
        assert out["scope"] == f"cluster:{c['id']}" and out["version"] == 1
        v2 = manager.ok("PUT", "/api/v1/config", json={"config": {**GOOD, "blocklist": {"tags": ["canary"]}},
                                                        "expected_version": 1})
        assert v2["version"] == 2
        wait_for(lambda: any(v == 2 and cfg["blocklist"]["tags"] == ["canary"] for v, cfg in applied), timeout=10,
                 what="agent applied version 2")
        r = mc.http.get(manager.url + "/api/v1/agent/config", params={"cluster_id": c["id"], "version": -1}, timeout=5)
        assert r.json()["config"]["gc"]["high_watermark_percent"] == 70
        r = mc.http.get(manager.url + "/api/v1/agent/config", params={"cluster_id": c["id"], "version": 1}, timeout=5)
        assert r.json() == {"scope": f"cluster:{c['id']}", "version": 1, "unchanged": True, "config": None}
        hist = manager.ok("GET", "/api/v1/config")["history"]
        assert [h["version"] for h in hist] == [2, 1]
        audit = [(a["action"], a["target"], a["detail"].get("version")) for a in manager.ok("GET", "/api/v1/audit")]
        assert ("config.update", "global", 1) in audit and ("config.update", "global", 2) in audit
        assert ("config.update", f"cluster:{c['id']}", 1) in audit
    finally:
        agent.stop()
