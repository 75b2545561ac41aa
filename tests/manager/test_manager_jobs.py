"""Jobs against fake peers: fan-out, per-node progress, verification, retry with backoff, cancel, timeout."""
from __future__ import annotations

import pytest
from fake_peer import FakePeer
from manager_util import wait_for

from remora.plugins.manager.client import Agent, ManagerClient

BLOBS = [{"digest": "sha256:" + "1" * 64, "size": 1000}, {"digest": "sha256:" + "2" * 64, "size": 250_000}]
TOTAL = sum(b["size"] for b in BLOBS)


@pytest.fixture
def fleet(manager_factory):
    """A manager (keepalive 1 s) and a function adding fake peers registered + kept alive."""
    manager = manager_factory(keepalive_interval=1.0)
    cluster = manager.ok("POST", "/api/v1/clusters", json={"name": "c1", "is_default": True})
    join = manager.ok("POST", "/api/v1/join-tokens", json={"name": "n", "cluster_id": cluster["id"]})["token"]
    peers, agents = {}, []

    def add(name: str, mode: str, type: str = "peer", keepalive: bool = True, **kw) -> FakePeer:
        fp = FakePeer(mode, **kw)
        mc = ManagerClient(manager.url, join)
        mc.register(type=type, hostname=name, ip="127.0.0.1", port=fp.port, api_port=fp.port)
        if keepalive:
            agents.append(Agent(mc, mc.registration).start())
        peers[name] = fp
        return fp

    yield manager, add
    for a in agents:
        a.stop()
    for fp in peers.values():
        fp.stop()


def job_done(manager, job_id):
    def check():
        j = manager.ok("GET", f"/api/v1/jobs/{job_id}")
        return j if j["state"] != "running" else None
    try:
        return wait_for(check, timeout=30, what=f"job {job_id} to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\njob: {manager.ok('GET', f'/api/v1/jobs/{job_id}')}\n"
                             f"manager log:\n{manager.log_tail()}") from None


def test_preheat_fan_out_verification_and_retry(fleet):
    manager, add = fleet
    good, liar = add("good", "good"), add("liar", "liar")
    add("flaky", "flaky")
    body = {"type": "preheat", "blobs": BLOBS, "repository": "registry.local/app",
            "scope": {"kind": "all_peers", "cluster": "c1"}, "max_attempts": 3}
    created = manager.ok("POST", "/api/v1/jobs", json=body)
    assert sorted(n["hostname"] for n in created["nodes"]) == ["flaky", "good", "liar"]
    assert all(n["bytes_total"] == TOTAL for n in created["nodes"])
    # per-node progress is visible while running (the fake peers report half the bytes before finishing)
    wait_for(lambda: any(0 < n["bytes_verified"] < TOTAL
                         for n in manager.ok("GET", f"/api/v1/jobs/{created['id']}")["nodes"]),
             timeout=20, interval=0.01, what="partial progress")
    job = job_done(manager, created["id"])
    nodes = {n["hostname"]: n for n in job["nodes"]}
    assert job["state"] == "failed" and job["error"] == "1 of 3 nodes failed"
    assert nodes["good"]["state"] == "succeeded" and nodes["good"]["bytes_verified"] == TOTAL
    assert nodes["good"]["attempts"] == 1
    assert nodes["flaky"]["state"] == "succeeded" and nodes["flaky"]["attempts"] == 2
    # the liar said "succeeded" but one blob is a byte short: never a success, retried, then failed
    assert nodes["liar"]["state"] == "failed" and nodes["liar"]["attempts"] == 3
    assert f"blob {BLOBS[1]['digest']}: only {BLOBS[1]['size'] - 1} of {BLOBS[1]['size']} bytes verified" \
        in nodes["liar"]["error"]
    # what the peer was sent: the blobs in order, a fresh task id per attempt, bootstrap/hot first
    req = next(iter(good.tasks.values()))["req"]
    assert req["blobs"] == BLOBS and req["type"] == "preheat" and req["priority"] == ["bootstrap", "hot"]
    assert req["repository"] == "registry.local/app"   # the peer authorizes and fetches per repository
    assert len({p[2] for p in liar.posts()}) == 3
    blobs = {b["digest"]: sorted(b["nodes"]) for b in manager.ok("GET", "/api/v1/blobs")}
    assert blobs[BLOBS[1]["digest"]] == ["flaky", "good"]
    text = manager.call("GET", "/metrics", token="").text
    assert f"remora_manager_preheated_bytes_total {float(2 * TOTAL)}" in text
    assert 'remora_manager_jobs{state="failed",type="preheat"} 1.0' in text
    assert 'remora_manager_job_duration_seconds_count{state="failed",type="preheat"} 1.0' in text

    # the operator fixes the liar and retries the failed nodes only
    liar.mode = "good"
    manager.ok("POST", f"/api/v1/jobs/{created['id']}/retry")
    job = job_done(manager, created["id"])
    assert job["state"] == "succeeded", job
    assert len(good.posts()) == 1  # succeeded nodes are not redone
    r = manager.call("POST", f"/api/v1/jobs/{created['id']}/retry")
    assert r.status_code == 409


def test_backoff_then_failure_is_reported(fleet):
    manager, add = fleet
    broken = add("broken", "broken")
    job = manager.ok("POST", "/api/v1/jobs", json={"type": "preheat", "image": "registry.local/app:1",
                                                   "scope": {"kind": "nodes", "nodes": ["broken"]}, "max_attempts": 4})
    job = job_done(manager, job["id"])
    node = job["nodes"][0]
    assert node["state"] == "failed" and node["attempts"] == 4
    assert "after 4 attempt(s): peer refused the task: HTTP 503" in node["error"]
    times = [p[0] for p in broken.posts()]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 3
    # backoff 0.1 s doubling (±10 % jitter), capped at 0.4 s
    assert gaps[0] >= 0.09 and gaps[1] >= 0.18 and gaps[2] >= 0.36, gaps


def test_cancel_and_timeout(fleet):
    manager, add = fleet
    slow = add("slow", "slow")
    job = manager.ok("POST", "/api/v1/jobs", json={"type": "preheat", "blobs": BLOBS,
                                                   "repository": "registry.local/app",
                                                   "scope": {"kind": "nodes", "nodes": ["slow"]}})
    wait_for(lambda: manager.ok("GET", f"/api/v1/jobs/{job['id']}")["nodes"][0]["state"] == "running",
             timeout=20, what="node running")
    out = manager.ok("POST", f"/api/v1/jobs/{job['id']}/cancel")
    assert out["state"] == "cancelled"
    wait_for(lambda: manager.ok("GET", f"/api/v1/jobs/{job['id']}")["nodes"][0]["state"] == "cancelled",
             timeout=20, what="node cancelled")
    node_id = manager.ok("GET", f"/api/v1/jobs/{job['id']}")["nodes"][0]["id"]
    task_id = f"job-{job['id']}-node-{node_id}-a1"
    wait_for(lambda: ("DELETE", task_id) in [(c[1], c[2]) for c in slow.calls], timeout=10, what="DELETE sent to peer")
    assert manager.call("POST", f"/api/v1/jobs/{job['id']}/cancel").status_code == 409

    # a job past its timeout fails with that reason, never silently
    job = manager.ok("POST", "/api/v1/jobs", json={"type": "preheat", "blobs": BLOBS,
                                                   "repository": "registry.local/app", "timeout": 1.0,
                                                   "scope": {"kind": "nodes", "nodes": ["slow"]}})
    job = job_done(manager, job["id"])
    assert job["state"] == "failed" and "timed out after 1s" in job["nodes"][0]["error"]


def test_scopes_and_refusals(fleet):
    manager, add = fleet
    add("seed-a", "good", type="seed_peer")
    add("seed-b", "good", type="seed_peer")
    add("p1", "good")
    add("gone", "good", keepalive=False)
    wait_for(lambda: {m["hostname"]: m["state"] for m in manager.ok("GET", "/api/v1/members")}["gone"] == "inactive",
             timeout=10, what="member 'gone' inactive")
    one = manager.ok("POST", "/api/v1/jobs", json={"type": "gc", "scope": {"kind": "one_seed_peer"}})
    assert [n["hostname"] for n in one["nodes"]] == ["seed-a"]
    seeds = manager.ok("POST", "/api/v1/jobs", json={"type": "sync-peers", "scope": {"kind": "all_seed_peers"}})
    assert sorted(n["hostname"] for n in seeds["nodes"]) == ["seed-a", "seed-b"]
    allp = manager.ok("POST", "/api/v1/jobs", json={"type": "delete-task", "blobs": BLOBS[:1],
                                                    "scope": {"kind": "all_peers"}})
    nodes = {n["hostname"]: n for n in allp["nodes"]}
    assert set(nodes) == {"seed-a", "seed-b", "p1", "gone"}
    # the inactive node fails at once, with the reason, instead of hanging
    assert nodes["gone"]["state"] == "failed" and "node is inactive" in nodes["gone"]["error"]
    for j in (one, seeds):
        assert job_done(manager, j["id"])["state"] == "succeeded"
    assert job_done(manager, allp["id"])["state"] == "failed"

    for bad in ({"type": "preheat", "scope": {"kind": "all_peers"}},
                {"type": "gc", "image": "x", "scope": {"kind": "all_peers"}},
                {"type": "preheat", "image": "x", "scope": {"kind": "nodes"}},
                {"type": "preheat", "image": "x", "scope": {"kind": "everywhere"}},
                {"type": "preheat", "blobs": [{"digest": "md5:1", "size": 1}], "scope": {"kind": "all_peers"}},
                {"type": "preheat", "image": "x", "max_attempts": 1000, "scope": {"kind": "all_peers"}},
                {"type": "preheat", "image": "x", "timeout": -1, "scope": {"kind": "all_peers"}},
                {"type": "preheat", "image": "x", "scope": {"kind": "nodes", "nodes": ["nobody"]}},
                {"type": "preheat", "image": "x", "scope": {"kind": "all_peers", "cluster": "nope"}}):
        r = manager.call("POST", "/api/v1/jobs", json=bad)
        assert r.status_code == 422, (bad, r.text)


def test_preheat_with_pull_needs_the_peer_to_report_the_pull(fleet):
    """``pull``: sent to the peers, and a node succeeds only if its peer says the image is in containerd; a
    peer that reports every blob verified but no pull (an older peer, or one that skipped it) is not done."""
    manager, add = fleet
    good = add("good", "good")
    job = manager.ok("POST", "/api/v1/jobs", json={"type": "preheat", "image": "registry.local/app:1", "blobs": BLOBS,
                                                   "pull": True, "scope": {"kind": "nodes", "nodes": ["good"]},
                                                   "max_attempts": 1})
    assert job["args"]["pull"] is True
    job = job_done(manager, job["id"])
    node = job["nodes"][0]
    assert node["state"] == "failed" and "without the pull into containerd" in node["error"], node
    assert next(iter(good.tasks.values()))["req"]["pull"] is True
    # pull goes with an image preheat only
    for bad in ({"type": "preheat", "blobs": BLOBS, "repository": "registry.local/app", "pull": True},
                {"type": "sync-peers", "pull": True},
                {"type": "preheat", "image": "registry.local/app:1", "pull": "yes"}):
        r = manager.call("POST", "/api/v1/jobs", json={**bad, "scope": {"kind": "all_peers", "cluster": "c1"}})
        assert r.status_code == 422, (bad, r.status_code, r.text)
