"""Membership on a real manager: scope matching, keepalive expiry, offline by hand, stale fallback."""
from __future__ import annotations

import time

import pytest
import requests
from manager_util import wait_for

from remora.plugins.manager.client import Agent, ManagerClient, ManagerUnavailable
from remora.plugins.manager.clusters import WEIGHTS, PeerInfo, location_score, rank, score

INTERVAL = 0.5


def test_matching_rule_weights():
    scopes = {"idc": ["IDC-A"], "location": "cn|hz|a", "cidrs": ["10.1.0.0/16"], "hostnames": [r"east-\d+"]}
    assert score(scopes, PeerInfo(ip="10.1.2.3")) == WEIGHTS["cidr"]
    assert score(scopes, PeerInfo(ip="10.2.0.1")) == 0
    assert score(scopes, PeerInfo(hostname="east-12")) == WEIGHTS["hostname"]
    assert score(scopes, PeerInfo(hostname="east-12.evil")) == 0  # regexes must match the whole name
    assert score(scopes, PeerInfo(idc="idc-a")) == WEIGHTS["idc"]
    assert location_score("cn|hz|b", "cn|hz|a") == pytest.approx(2 / 3)
    assert score(scopes, PeerInfo(location="cn|hz|a")) == WEIGHTS["location"]
    full = PeerInfo(ip="10.1.0.9", hostname="east-1", idc="idc-a", location="cn|hz|a")
    assert score(scopes, full) == pytest.approx(1.0)
    assert score(scopes, PeerInfo(ip="not-an-ip", hostname="x")) == 0

    class C:
        def __init__(self, id, scopes, is_default=False):
            self.id, self.scopes, self.is_default = id, scopes, is_default

    a, b, d = C(1, {"idc": ["x"]}), C(2, {"cidrs": ["10.0.0.0/8"]}, False), C(3, {}, True)
    assert [c.id for _, c in rank([a, b, d], PeerInfo(ip="10.9.9.9", idc="x"))] == [2, 1, 3]
    assert [c.id for _, c in rank([a, b, d], PeerInfo(ip="192.168.1.1"))][0] == 3  # nothing matches: default


def _setup(manager):
    east = manager.ok("POST", "/api/v1/clusters", json={"name": "east", "scopes": {"cidrs": ["10.1.0.0/16"],
                                                                                  "idc": ["idc-east"]}})
    west = manager.ok("POST", "/api/v1/clusters", json={"name": "west", "is_default": True,
                                                        "scopes": {"hostnames": [r"west-\d+"]}})
    join = manager.ok("POST", "/api/v1/join-tokens", json={"name": "nodes"})["token"]
    return east, west, join


def _sched(url, join, name, cluster, port, tmp_path=None):
    c = ManagerClient(url, join, timeout=5)
    out = c.register(type="scheduler", hostname=name, ip="127.0.0.1", port=port, cluster=cluster, version="0.1")
    return c, out


def test_peers_matched_by_scope_and_moved_when_scheduler_dies(manager_factory, tmp_path):
    manager = manager_factory(keepalive_interval=INTERVAL)
    east, west, join = _setup(manager)
    s_east, reg = _sched(manager.url, join, "sched-east", "east", 8002)
    # schedulers (and seed peers) keep alive twice per interval: 3 missed = 1.5 intervals
    assert reg["cluster_id"] == east["id"] and reg["keepalive_interval"] == INTERVAL / 2
    s_west, _ = _sched(manager.url, join, "sched-west", "west", 8002)
    seed = ManagerClient(manager.url, join)
    seed.register(type="seed_peer", hostname="seed-east", ip="127.0.0.2", port=65001, api_port=65002, cluster="east")

    keep_east = Agent(s_east, s_east.registration).start()
    keep_west = Agent(s_west, s_west.registration).start()
    keep_seed = Agent(seed, seed.registration).start()
    try:
        peer = ManagerClient(manager.url, join, state_file=tmp_path / "peer-state.json")
        peer.register(type="peer", hostname="node-1", ip="10.1.4.4", port=65001, api_port=65003)
        out = peer.schedulers(ip="10.1.4.4", hostname="node-1")
        assert out["cluster"]["name"] == "east" and [s["hostname"] for s in out["schedulers"]] == ["sched-east"]
        assert [s["hostname"] for s in out["seed_peers"]] == ["seed-east"]
        assert out["score"] == pytest.approx(WEIGHTS["cidr"]) and not out["stale"]
        assert peer.schedulers(hostname="west-3")["cluster"]["name"] == "west"
        assert peer.schedulers(ip="192.168.0.1")["cluster"]["name"] == "west"  # default cluster
        assert peer.schedulers(ip="10.1.4.4", hostname="node-1")["cluster"]["name"] == "east"

        # sched-east stops keeping alive: after 3 missed keepalives (1.5 intervals) it is out of what peers receive
        keep_east.stop()
        last_seen = time.monotonic()
        s_east.keepalive()
        moved = wait_for(lambda: (lambda o: o if o["cluster"]["name"] == "west" else None)(
            peer.schedulers(ip="10.1.4.4", hostname="node-1")), timeout=15, interval=0.05, what="peer moved to west")
        took = time.monotonic() - last_seen
        assert [s["hostname"] for s in moved["schedulers"]] == ["sched-west"]
        assert 1.5 * INTERVAL * 0.9 <= took <= 1.5 * INTERVAL + 2.0, took
        members = {m["hostname"]: m for m in manager.ok("GET", "/api/v1/members")}
        assert members["sched-east"]["state"] == "inactive" and members["sched-west"]["state"] == "active"
        # the peer was recorded in the cluster it was matched to (used by all_peers jobs)
        assert members["node-1"]["cluster_id"] == west["id"]
        text = manager.call("GET", "/metrics", token="").text
        assert 'remora_manager_members{state="inactive",type="scheduler"} 1.0' in text

        # it comes back by keeping alive again; registry fallbacks reported by members are counted
        s_east.keepalive(fallbacks={"blocklisted": 2, "no_parent": 1})
        wait_for(lambda: 'remora_manager_member_registry_fallbacks{cause="blocklisted"} 2.0'
                 in manager.call("GET", "/metrics", token="").text, timeout=10, what="fallbacks metric")
        assert peer.schedulers(ip="10.1.4.4", hostname="node-1")["cluster"]["name"] == "east"

        # an operator takes sched-west offline: it stays out even though it keeps alive
        wid = members["sched-west"]["id"]
        manager.ok("POST", f"/api/v1/members/{wid}/offline", json={"reason": "maintenance"})
        assert s_west.keepalive()["state"] == "offline"
        out = peer.schedulers(hostname="west-3")
        assert out["cluster"]["name"] == "east"  # only east has an active scheduler left
        manager.ok("POST", f"/api/v1/members/{wid}/online")
        assert peer.schedulers(hostname="west-3")["cluster"]["name"] == "west"
        audit = [(a["action"], a["target"]) for a in manager.ok("GET", "/api/v1/audit")]
        assert ("member.offline", f"member:{wid}") in audit and ("member.online", f"member:{wid}") in audit
        assert ("member.register", f"member:{wid}") in audit
    finally:
        keep_east.stop()
        keep_west.stop()
        keep_seed.stop()

    # the manager goes down: the peer keeps its last known list, also across a restart of the peer
    manager.stop()
    stale = peer.schedulers(hostname="west-3")
    assert stale["stale"] and stale["cluster"]["name"] == "west"
    reborn = ManagerClient(manager.url, join, state_file=tmp_path / "peer-state.json")
    assert reborn.schedulers()["schedulers"][0]["hostname"] == "sched-west"
    with pytest.raises(ManagerUnavailable):
        ManagerClient(manager.url, join).schedulers()


def test_join_tokens_and_reregistration(manager_factory):
    manager = manager_factory(keepalive_interval=INTERVAL)
    east, west, join = _setup(manager)
    r = requests.post(manager.url + "/api/v1/agent/register", timeout=5,
                      json={"type": "peer", "hostname": "n1", "ip": "127.0.0.1", "port": 1})
    assert r.status_code == 401
    # a PAT is not a join token
    r = manager.call("POST", "/api/v1/agent/register", json={"type": "peer", "hostname": "n1", "ip": "127.0.0.1",
                                                             "port": 1})
    assert r.status_code == 401
    bound = manager.ok("POST", "/api/v1/join-tokens", json={"name": "east-only", "cluster_id": east["id"]})["token"]
    c = ManagerClient(manager.url, bound)
    with pytest.raises(PermissionError):
        c.register(type="scheduler", hostname="s", ip="127.0.0.1", port=1, cluster="west")
    assert c.register(type="scheduler", hostname="s", ip="127.0.0.1", port=1)["cluster_id"] == east["id"]
    for bad in ({"type": "router", "hostname": "n", "ip": "127.0.0.1", "port": 1},
                {"type": "peer", "hostname": "n", "ip": "999.0.0.1", "port": 1},
                {"type": "peer", "hostname": "n", "ip": "127.0.0.1", "port": 70000},
                {"type": "peer", "hostname": "bad host;rm", "ip": "127.0.0.1", "port": 1}):
        r = requests.post(manager.url + "/api/v1/agent/register", json=bad, timeout=5,
                          headers={"Authorization": f"Bearer {join}"})
        assert r.status_code == 422, bad
    # an operator deletes a member: its next keepalive registers it again
    mid = c.member_id
    manager.ok("DELETE", f"/api/v1/members/{mid}")
    c.keepalive()
    assert c.member_id != mid
    assert [m["hostname"] for m in manager.ok("GET", "/api/v1/members")] == ["s"]
    # a revoked join token is refused
    jt = manager.ok("GET", "/api/v1/join-tokens")[1]
    manager.ok("DELETE", f"/api/v1/join-tokens/{jt['id']}")
    with pytest.raises(PermissionError):
        c.keepalive()


class _FlakyClient:
    """A ManagerClient stand-in whose manager answers only from the third registration on."""

    def __init__(self):
        from remora.plugins.manager.client import ManagerUnavailable

        self.unavailable = ManagerUnavailable
        self.member_id = None
        self.interval = 10.0              # the client's default until a manager has answered
        self.attempts: list[float] = []
        self.state = {"config": None}

    def register(self, **info):
        self.attempts.append(time.monotonic())
        if len(self.attempts) < 3:
            raise self.unavailable("manager http://x unreachable: connection refused")
        self.member_id, self.interval = 1, 2.0
        return {"id": 1}

    def keepalive(self, load=0.0, config_version=0, fallbacks=None):
        if self.member_id is None:
            self.register()
        return {}

    def config(self):
        return {"version": 0, "config": {}, "changed": False, "stale": False}


def test_an_agent_that_could_not_register_retries_soon_not_after_the_default_interval():
    """A peer that starts while its manager is unreachable registers within ~1.5 s of the manager coming
    back (0.5 s, then 1 s between tries), not after the client's 10 s default interval; once registered,
    the manager's interval rules. And a round that raises something unexpected does not end the agent."""
    from remora.plugins.manager.client import Agent

    c = _FlakyClient()
    agent = Agent(c, {"type": "peer", "hostname": "p1", "ip": "127.0.0.1", "port": 1})
    t0 = time.monotonic()
    agent.start()
    try:
        wait_for(lambda: c.member_id is not None, timeout=5, what="the agent registering")
        assert c.attempts[-1] - t0 < 3.0, [round(t - t0, 2) for t in c.attempts]
        assert len(c.attempts) == 3
        # an unexpected error in a round: logged, the agent keeps going
        calls = []

        def broken_config():
            calls.append(time.monotonic())
            raise KeyError("version")

        c.config = broken_config
        wait_for(lambda: len(calls) >= 2, timeout=10, what="two rounds after an unexpected error")
        assert agent.thread.is_alive()
    finally:
        agent.stop()
