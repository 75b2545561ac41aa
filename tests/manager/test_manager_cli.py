"""`remora cluster` and `remora job` over the REST API of a real manager: tables, --json, exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from fake_peer import FakePeer
from manager_util import REPO

from remora.plugins.manager.client import ManagerClient


def remora(manager, *args, token=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), REMORA_MANAGER=manager.url,
               REMORA_MANAGER_TOKEN=manager.root if token is None else token, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "remora.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cluster_and_job_commands(manager_factory, tmp_path):
    manager = manager_factory(keepalive_interval=30)
    r = remora(manager, "cluster", "create", "edge", "--cidr", "10.8.0.0/16", "--idc", "hz1", "--default", "--json")
    assert r.returncode == 0, r.stderr
    edge = json.loads(r.stdout)
    assert edge["scopes"]["cidrs"] == ["10.8.0.0/16"] and edge["is_default"]
    r = remora(manager, "cluster", "list")
    assert r.returncode == 0 and "edge" in r.stdout and "10.8.0.0/16" in r.stdout
    r = remora(manager, "cluster", "create", "bad", "--cidr", "300.1.0.0/8")
    assert r.returncode == 3 and "cidrs" in r.stderr and "bad CIDR" in r.stderr

    r = remora(manager, "cluster", "join-token", "nodes", "--cluster-id", str(edge["id"]), "--json")
    assert r.returncode == 0, r.stderr
    join = json.loads(r.stdout)["token"]
    fake = FakePeer("good", polls_before_done=0)
    try:
        mc = ManagerClient(manager.url, join)
        mc.register(type="seed_peer", hostname="seed-1", ip="127.0.0.1", port=fake.port, api_port=fake.port)
        r = remora(manager, "cluster", "members", "--json")
        assert [(m["hostname"], m["state"], m["cluster_id"]) for m in json.loads(r.stdout)] == \
            [("seed-1", "active", edge["id"])]

        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps({"gc": {"high_watermark_percent": 40, "low_watermark_percent": 50}}))
        r = remora(manager, "cluster", "config", "--set", str(cfg))
        assert r.returncode == 3 and "low_watermark_percent must be below" in r.stderr
        cfg.write_text(json.dumps({"peer": {"upload_rate_limit": 1048576}}))
        r = remora(manager, "cluster", "config", "--set", str(cfg), "--expected-version", "0", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["version"] == 1

        nodes = tmp_path / "nodes.txt"
        nodes.write_text("# placement output\nseed-1\n")
        digest = "sha256:" + "d" * 64
        r = remora(manager, "job", "create", "preheat", "--blob", f"{digest}:77", "--repository", "registry.local/app",
                   "--scope", "nodes",
                   "--nodes-file", str(nodes), "--wait", "--json")
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)
        assert job["state"] == "succeeded" and job["nodes"][0]["bytes_verified"] == 77
        r = remora(manager, "job", "list")
        assert r.returncode == 0 and "preheat" in r.stdout and "succeeded=1" in r.stdout
        r = remora(manager, "job", "show", str(job["id"]))
        assert r.returncode == 0 and "seed-1" in r.stdout and "77/77 B" in r.stdout
    finally:
        fake.stop()

    # a token without the job scope: refused with the auth exit code
    me = manager.ok("GET", "/api/v1/users")[0]
    tok = manager.ok("POST", f"/api/v1/users/{me['id']}/tokens", json={"name": "c", "scopes": ["cluster"]})["token"]
    r = remora(manager, "job", "create", "gc", token=tok)
    assert r.returncode == 4 and "403" in r.stderr and "job" in r.stderr
    r = remora(manager, "job", "show", "999")
    assert r.returncode == 5
    r = remora(manager, "job", "create", "preheat", "--blob", "nonsense")
    assert r.returncode == 2
