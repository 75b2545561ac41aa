"""The manager's REST API on a real process: OpenAPI, clusters, tokens and scopes, audit, validation."""
from __future__ import annotations

import time

from manager_util import wait_for


def _resolve_refs(doc: dict, node, seen: list) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None:
            assert ref.startswith("#/"), ref
            target = doc
            for part in ref[2:].split("/"):
                assert part in target, f"dangling $ref {ref}"
                target = target[part]
            seen.append(ref)
        for v in node.values():
            _resolve_refs(doc, v, seen)
    elif isinstance(node, list):
        for v in node:
            _resolve_refs(doc, v, seen)


def test_openapi_document_served_and_consistent(manager):
    r = manager.call("GET", "/openapi.json", token="")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] == "remora manager"
    for path in ("/api/v1/clusters", "/api/v1/jobs", "/api/v1/jobs/{job_id}/cancel", "/api/v1/agent/register",
                 "/api/v1/agent/{member_id}/keepalive", "/api/v1/agent/schedulers", "/api/v1/config",
                 "/api/v1/join-tokens", "/api/v1/audit"):
        assert path in doc["paths"], path
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("responses"), f"{method} {path} documents no response"
    refs: list = []
    _resolve_refs(doc, doc, refs)
    assert "#/components/schemas/JobRequest" in refs and "#/components/schemas/DynamicConfig" in refs


def test_requests_without_valid_token_are_refused(manager):
    assert manager.call("GET", "/api/v1/clusters", token="").status_code == 401
    assert manager.call("GET", "/api/v1/clusters", token="rmt_" + "x" * 43).status_code == 401
    assert manager.call("GET", "/api/v1/clusters", token="rmj_" + "x" * 43).status_code == 401
    assert manager.ok("GET", "/api/v1/whoami") == {"user": "root", "role": "root", "scopes": ["cluster", "job"]}


def test_token_scopes_roles_expiry_and_audit(manager):
    me = manager.ok("GET", "/api/v1/users")[0]
    cluster_only = manager.ok("POST", f"/api/v1/users/{me['id']}/tokens", json={"name": "ops", "scopes": ["cluster"]})
    assert cluster_only["token"].startswith("rmt_") and "hash" not in cluster_only
    job = {"type": "gc", "scope": {"kind": "all_peers"}}
    r = manager.call("POST", "/api/v1/jobs", token=cluster_only["token"], json=job)
    assert r.status_code == 403 and "job" in r.json()["detail"]
    # the cluster scope does allow cluster changes
    manager.ok("POST", "/api/v1/clusters", token=cluster_only["token"], json={"name": "c1"})

    guest = manager.ok("POST", "/api/v1/users", json={"name": "viewer", "role": "guest"})
    gtok = manager.ok("POST", f"/api/v1/users/{guest['id']}/tokens",
                      json={"name": "g", "scopes": ["job", "cluster"]})["token"]
    assert manager.call("GET", "/api/v1/clusters", token=gtok).status_code == 200
    assert manager.call("POST", "/api/v1/clusters", token=gtok, json={"name": "c2"}).status_code == 403
    assert manager.call("GET", "/api/v1/audit", token=gtok).status_code == 403

    short = manager.ok("POST", f"/api/v1/users/{me['id']}/tokens", json={"name": "short", "scopes": ["job"],
                                                                      "ttl_seconds": 1.0})
    assert manager.call("GET", "/api/v1/whoami", token=short["token"]).status_code == 200
    status, detail = wait_for(lambda: (lambda r: (r.status_code, r.json()["detail"]) if r.status_code != 200 else None)(
        manager.call("GET", "/api/v1/whoami", token=short["token"])), timeout=10, what="token expiry")
    assert status == 401 and "expired" in detail

    manager.ok("DELETE", f"/api/v1/tokens/{cluster_only['id']}")
    r = manager.call("GET", "/api/v1/clusters", token=cluster_only["token"])
    assert r.status_code == 401 and "revoked" in r.json()["detail"]

    tokens = manager.ok("GET", "/api/v1/tokens")
    assert all("token" not in t and len(t["prefix"]) == 12 for t in tokens)
    actions = [(a["actor"], a["action"], a["target"]) for a in manager.ok("GET", "/api/v1/audit")]
    assert ("root", "token.create", f"token:{cluster_only['id']}") in actions
    assert ("root", "cluster.create", "cluster:1") in actions
    assert ("root", "user.create", f"user:{guest['id']}") in actions
    assert ("root", "token.revoke", f"token:{cluster_only['id']}") in actions
    assert ("manager", "user.bootstrap", "user:root") in actions
    # refused requests change nothing and are not audited as changes
    assert not any(a[2] == "cluster:2" for a in actions)


def test_clusters_crud_and_validation(manager):
    body = {"name": "east", "scopes": {"idc": ["idc-a"], "location": "cn|hz", "cidrs": ["10.1.0.0/16"],
                                      "hostnames": ["east-.*"]}, "is_default": True}
    east = manager.ok("POST", "/api/v1/clusters", json=body)
    assert east["scopes"]["cidrs"] == ["10.1.0.0/16"] and east["is_default"]
    assert manager.call("POST", "/api/v1/clusters", json=body).status_code == 409
    west = manager.ok("POST", "/api/v1/clusters", json={"name": "west", "is_default": True})
    assert [c["is_default"] for c in manager.ok("GET", "/api/v1/clusters")] == [False, True]
    patched = manager.ok("PATCH", f"/api/v1/clusters/{west['id']}", json={"description": "second"})
    assert patched["description"] == "second"
    for bad in ({"name": "x", "scopes": {"cidrs": ["10.0.0.0/33"]}},
                {"name": "x", "scopes": {"hostnames": ["(unclosed"]}},
                {"name": "x" * 65},
                {"name": "../etc"},
                {"name": "x", "scopes": {"location": "a|b|c|d|e|f"}},
                {"name": "x", "unknown_field": 1}):
        r = manager.call("POST", "/api/v1/clusters", json=bad)
        assert r.status_code == 422, (bad, r.text)
    assert manager.call("GET", "/api/v1/members?state=zombie").status_code == 422
    # bodies are bounded, declared or chunked
    huge = b'{"name": "' + b"x" * (5 << 20) + b'"}'
    assert manager.call("POST", "/api/v1/clusters", data=huge,
                        headers={"Content-Type": "application/json"}).status_code == 413
    r = manager.call("POST", "/api/v1/clusters", data=iter([huge[i:i + 65536] for i in range(0, len(huge), 65536)]),
                     headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert manager.call("GET", "/api/v1/jobs?limit=100000").status_code == 422
    manager.ok("DELETE", f"/api/v1/clusters/{east['id']}")
    assert manager.call("GET", f"/api/v1/clusters/{east['id']}").status_code == 404
    assert [c["name"] for c in manager.ok("GET", "/api/v1/clusters")] == ["west"]


def test_metrics_endpoint(manager):
    text = manager.call("GET", "/metrics", token="").text
    assert 'remora_manager_members{state="active",type="scheduler"} 0.0' in text
    assert "remora_manager_preheated_bytes_total 0.0" in text
    assert time.time() > 0
