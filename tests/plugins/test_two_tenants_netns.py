"""Two tenants on a shared mesh of real processes in network namespaces (issue 10, "How it is tested").

The lab (remora_testing.netlab): a registry namespace with Debian's docker-registry in ``auth: token``
mode and a real JWT token server beside it (tests/core/regclient_tokenserver.py, re-bound to the
namespace's address); a scheduler namespace; four node namespaces, each with a ``remora peer`` on mutual
TLS (certificates of the lab's cluster CA, remora.pki). Nodes 0-2 hold the node's credentials ("node":
reads every repository, as a cluster's pull secret would); node 3 has none. Tenant A (alice) may read
``team-a/app``, tenant B (bob) ``team-b/app``: each has a private blob there.

Every client runs inside a namespace (remora_testing.netlab.intruder: one process per batch of
requests). Every refusal is paired with the same request made properly, which must succeed, so each
assertion can fail: tenant B's credentials work (B reads B's blob), the upload port answers a peer
certificate that brings A's proof, the scheduler answers a member, and so on.

What must hold: tenant B gets no byte of tenant A's blob by any path — the mirror under B's repository,
under A's repository with B's credentials (Basic or B's token), through a peer without credentials, via
``?ns=`` to a registry the peers do not fetch from, from any node's piece store once A's blob is on every
node, from the upload port (no certificate, another CA's, role client, a member peer certificate with B's
proof or none), and by asking the scheduler which peer holds it and fetching from those; a host without a
cluster certificate cannot register, announce or download pieces; and tenant A's pulls go peer to peer
(the registry serves A's blob about once for four nodes).
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest

from remora.plugins.peer.access import SOURCE_HEADER
from remora.plugins.peer.config import MIN_PIECE_SIZE, piece_size_for
from remora_testing.netlab import Lab, content
from remora_testing.netlab.mesh import PY, REMORA, UPLOAD_PORT, Mesh, MeshOptions, metric
from remora_testing.netlab.namespaces import nsenter_argv
from remora_testing.netlab.services import wait_port_in

pytestmark = pytest.mark.slow

PREFIX = "r2t-"
TOKEN_PORT = 5001
SERVICE = "remora-test-registry"
USERS = {"alice": ("alice-pw", ["team-a/app"]), "bob": ("bob-pw", ["team-b/app"]), "node": ("node-pw", ["*"])}
BLOB_SIZE = (24 << 20) + 12345
NODES_WITH_CREDENTIALS = (0, 1, 2)
NOCRED = 3
BYTES = "remora_peer_download_bytes_total"
#: what the intruder's announcements claim (a task of its own: no real child is sent to it; port 1)
FAKE_TASK = "sha256:" + "cd" * 32
FAKE_ANNOUNCE = {"announce_task": FAKE_TASK, "content_length": MIN_PIECE_SIZE, "piece_size": MIN_PIECE_SIZE,
                 "upload_port": 1}

#: The token server of tests/core, run inside the registry's namespace on its address (it binds
#: 127.0.0.1 itself; its handler is moved to a server on the lab address).
TOKEN_SERVER = """
import json, sys
from http.server import ThreadingHTTPServer
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from regclient_tokenserver import TokenServer
users = {k: (v[0], set(v[1])) for k, v in json.loads(sys.argv[2]).items()}
ts = TokenServer(users, Path(sys.argv[3]))
handler = ts.httpd.RequestHandlerClass
ts.httpd.server_close()
ts.httpd = ThreadingHTTPServer((sys.argv[4], int(sys.argv[5])), handler)
ts.httpd.daemon_threads = True
(Path(sys.argv[3]) / "ready").write_text("1")
ts.httpd.serve_forever(poll_interval=0.05)
"""


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{USERS[user][0]}".encode()).decode()


def remora_certs(*args: str) -> None:
    subprocess.run([*REMORA, "certs", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("two-tenants")
    blobs = {}
    for name in ("a", "b"):
        data = os.urandom(BLOB_SIZE)
        path = work / f"blob-{name}.bin"
        path.write_bytes(data)
        blobs[name] = (path, data, content.sha256_file(path))
    with Lab(prefix=PREFIX, workdir=work / "lab") as lab:
        creds = {}
        for i in NODES_WITH_CREDENTIALS:
            creds[i] = ["--registry-config", str(work / "node-credentials.json")]
        mesh = Mesh(lab, MeshOptions(peers=4, containerd=False, node_args=creds))
        reg = mesh.registry
        token_dir = work / "token"
        token_dir.mkdir()
        tokens = lab.spawn(mesh.registry_node, [PY, "-c", TOKEN_SERVER, str(Path(__file__).parent.parent / "core"),
                                                json.dumps(USERS), str(token_dir), mesh.registry_node.ip,
                                                str(TOKEN_PORT)], log_name="token-server.log")
        wait_port_in(mesh.registry_node, mesh.registry_node.ip, TOKEN_PORT, daemon=tokens)
        realm = f"http://{mesh.registry_node.ip}:{TOKEN_PORT}/token"
        reg.extra_config = f"""auth:
  token:
    realm: {realm}
    service: {SERVICE}
    issuer: remora-test-issuer
    rootcertbundle: {token_dir / 'token-signer.pem'}
"""
        (work / "node-credentials.json").write_text(json.dumps(
            {"auths": {reg.host: {"auth": base64.b64encode(b"node:node-pw").decode()}}}))
        with reg.loopback() as loop:   # the storage is filled from the root namespace, on 127.0.0.1
            for name, (path, _, digest) in blobs.items():
                content.push_blob(loop.url, f"team-{name}/app", path=path, digest=digest)
        mesh.start()
        # certificates an intruder might hold, made with the CLI: a client of this cluster's CA (not a
        # peer), a peer of this cluster (a member node: tenant B's own node, or a compromised one), and a
        # peer of another CA
        ca_dir = Path(mesh.tls_dirs["peer0"]).parent / "ca"
        certs = work / "intruder"
        remora_certs("issue", "--dir", str(ca_dir), "--role", "client", "--host-id", "ops",
                     "--out", str(certs / "client"))
        remora_certs("issue", "--dir", str(ca_dir), "--role", "peer", "--host-id", "tenant-b-node",
                     "--ip", mesh.peers[NOCRED].node.ip, "--out", str(certs / "member"))
        remora_certs("issue", "--dir", str(ca_dir), "--role", "peer", "--host-id", "tenant-b-node2",
                     "--ip", mesh.peers[NOCRED].node.ip, "--out", str(certs / "member2"))
        remora_certs("init", "--dir", str(certs / "other-ca"), "--cluster", lab.name)
        remora_certs("issue", "--dir", str(certs / "other-ca"), "--role", "peer", "--host-id", "intruder",
                     "--out", str(certs / "other"))
        yield {"mesh": mesh, "realm": realm, "blobs": blobs, "certs": certs, "ca": str(ca_dir / "ca.pem"),
               "tokens": tokens}
        print(mesh.log_tails(8))


def tls(t, who: str | None) -> dict:
    """Client TLS settings: trust the lab's CA; present ``who``'s certificate (None: no certificate)."""
    spec = {"ca": t["ca"]}
    if who is not None:
        d = t["certs"] / who
        spec.update(cert=str(d / "cert.pem"), key=str(d / "key.pem"))
    return spec


def intrude(node, what: str, spec) -> list | dict:
    out = node.run([PY, "-m", "remora_testing.netlab.intruder", what], input=json.dumps(spec), timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def token(t, node, user: str, repo: str) -> str:
    """What containerd does after a 401: a token for the scope from the realm, with the user's password."""
    [r] = intrude(node, "http", [{"url": f"{t['realm']}?service={SERVICE}&scope=repository:{repo}:pull",
                                  "headers": {"Authorization": basic(user)}}])
    assert r["status"] == 200, r
    return "Bearer " + json.loads(base64.b64decode(r["body_b64"]))["token"]


def leaked(t, r: dict) -> bool:
    """Whether a response carried any of tenant A's bytes (a 64-byte window of every piece)."""
    secret = t["blobs"]["a"][1]
    body = base64.b64decode(r.get("body_b64") or "")
    step = piece_size_for(BLOB_SIZE)
    return r.get("sha256") == t["blobs"]["a"][2] or any(secret[i:i + 64] in body
                                                        for i in range(0, len(secret), step // 4))


def mirror(t, p, repo: str, digest: str, auth: str | None = None, ns: str | None = None, **headers) -> dict:
    mesh = t["mesh"]
    if auth:
        headers["Authorization"] = auth
    return {"url": f"{p.mirror}/v2/{repo}/blobs/{digest}?ns={ns or mesh.registry.host}", "headers": headers}


@pytest.fixture(scope="module")
def a_everywhere(lab):
    """Tenant A pulls its blob on node0 (the seed), then on the three other nodes at once (node 3
    without node credentials: it fetches with what A proved). Returns the peers' byte counters and the
    registry's application egress for A's blob."""
    mesh, (_, data, digest) = lab["mesh"], lab["blobs"]["a"]
    before = {p.index: mesh.metrics(p) for p in mesh.peers}
    results = [intrude(mesh.peers[0].node, "http",
                       [mirror(lab, mesh.peers[0], "team-a/app", digest, basic("alice"))])[0]]
    procs = []
    for p in mesh.peers[1:]:
        auth = token(lab, p.node, "alice", "team-a/app") if p.index == 1 else basic("alice")
        spec = json.dumps([mirror(lab, p, "team-a/app", digest, auth)])
        procs.append(subprocess.Popen([*nsenter_argv(p.node.ns), PY, "-m", "remora_testing.netlab.intruder", "http"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        procs[-1].stdin.write(spec)
        procs[-1].stdin.close()
    for proc in procs:
        out = proc.stdout.read()
        proc.wait(300)
        results.append(json.loads(out.strip().splitlines()[-1])[0])
    after = {p.index: mesh.metrics(p) for p in mesh.peers}
    rows = {i: {s: metric(after[i], BYTES, source=s) - metric(before[i], BYTES, source=s) for s in ("registry", "peer")}
            for i in after}
    return {"results": results, "rows": rows, "served": mesh.registry.blob_bytes_served().get(digest, 0),
            "digest": digest, "data": data}


def test_tenant_a_pulls_go_peer_to_peer(lab, a_everywhere):
    a = a_everywhere
    for i, r in enumerate(a["results"]):
        assert (r["status"], r["sha256"], r["bytes"]) == (200, a["digest"], BLOB_SIZE), (i, r, lab["mesh"].log_tails())
    print(f"A's pulls: {a['rows']}; registry served {a['served'] / BLOB_SIZE:.3f}x the blob")
    assert a["served"] <= 1.05 * BLOB_SIZE, "the registry served A's blob about once for four nodes"
    assert a["rows"][0]["registry"] >= BLOB_SIZE * 0.95, "node0 seeded from the registry"
    for i in (1, 2, NOCRED):
        assert a["rows"][i]["registry"] == 0 and a["rows"][i]["peer"] == BLOB_SIZE, (i, a["rows"])


def test_tenant_b_gets_no_byte_of_a_through_any_mirror(lab, a_everywhere):
    mesh = lab["mesh"]
    a, b = lab["blobs"]["a"][2], lab["blobs"]["b"][2]
    # every node now holds A's blob (the piece stores are keyed by digest: the "cache" B aims at)
    for p in mesh.peers:
        node = p.node
        bob_b, bob_a = token(lab, node, "bob", "team-b/app"), token(lab, node, "bob", "team-a/app")
        # Positive controls on this very node: B's credentials work for B's repository; A's for A's.
        ok = intrude(node, "http", [mirror(lab, p, "team-b/app", b, basic("bob")),
                                    mirror(lab, p, "team-a/app", a, token(lab, node, "alice", "team-a/app"),
                                           Range="bytes=0-1023")])
        assert (ok[0]["status"], ok[0]["sha256"]) == (200, lab["blobs"]["b"][2]), (p.index, ok[0])
        assert (ok[1]["status"], base64.b64decode(ok[1]["body_b64"])) == (206, lab["blobs"]["a"][1][:1024])
        attempts = [
            mirror(lab, p, "team-b/app", a, basic("bob")),                       # under B's repository
            mirror(lab, p, "team-b/app", a, bob_b, Range="bytes=0-1023"),
            mirror(lab, p, "team-a/app", a, basic("bob")),                       # B's credentials, A's repo
            mirror(lab, p, "team-a/app", a, bob_b),
            mirror(lab, p, "team-a/app", a, bob_a),                              # B's token for A's scope
            mirror(lab, p, "team-a/app", a),                                     # anonymous
            mirror(lab, p, "team-a/app", a, Range="bytes=0-99"),
            mirror(lab, p, "team-b/app", a, basic("bob"), ns=f"{mesh.sched_node.ip}:5000"),  # ?ns= elsewhere
            mirror(lab, p, "team-b/app", a, None, **{"X-Remora-Upstream": f"{mesh.sched_node.ip}:5000"}),
            mirror(lab, p, "team-a/app", a, "Basic " + base64.b64encode(b"alice:wrong").decode()),
        ]
        attempts += [dict(r, method="HEAD") for r in attempts[:6]]
        for req, r in zip(attempts, intrude(node, "http", attempts)):
            assert r["status"] in (401, 403, 404) and not leaked(lab, r), (p.index, req, r)
    # nothing that B asked for was fetched from the registry for it
    assert mesh.registry.blob_bytes_served().get(a, 0) == a_everywhere["served"]


def test_upload_port_and_scheduler_give_b_nothing(lab, a_everywhere):
    mesh = lab["mesh"]
    a = lab["blobs"]["a"][2]
    reg = mesh.registry.host
    intruder_node = mesh.peers[NOCRED].node   # tenant B's node: a namespace of the cluster network
    holders = [p for p in mesh.peers if p.index != NOCRED]
    bob_b = token(lab, intruder_node, "bob", "team-b/app")
    alice = token(lab, intruder_node, "alice", "team-a/app")

    def piece(p, who, headers, index=0):
        return {"url": f"https://{p.node.ip}:{UPLOAD_PORT}/pieces/{a}/{index}", "tls": tls(lab, who),
                "headers": headers}

    # Positive control: a member peer certificate with tenant A's proof gets piece 0 from every holder.
    step = piece_size_for(BLOB_SIZE)
    got = intrude(intruder_node, "http", [piece(p, "member", {SOURCE_HEADER: f"{reg}/team-a/app",
                                                              "Authorization": alice}) for p in holders])
    for r in got:
        assert (r["status"], r["bytes"]) == (200, step) and leaked(lab, r), r
    proofs = [{}, {SOURCE_HEADER: f"{reg}/team-b/app", "Authorization": bob_b},
              {SOURCE_HEADER: f"{reg}/team-a/app", "Authorization": bob_b},
              {SOURCE_HEADER: f"{reg}/team-a/app", "Authorization": basic("bob")},
              {SOURCE_HEADER: f"{reg}/team-a/app"},
              {SOURCE_HEADER: f"{mesh.sched_node.ip}:5000/team-b/app"}]
    attempts = [piece(p, "member", h, index=i) for p in holders for h in proofs for i in (0, 1)]
    for req, r in zip(attempts, intrude(intruder_node, "http", attempts)):
        assert r["status"] == 403 and not leaked(lab, r), (req, r)
    # Without a certificate of the cluster (none, another CA's) A's own proof opens nothing; a client
    # certificate of the cluster is not a peer: 403.
    proof = {SOURCE_HEADER: f"{reg}/team-a/app", "Authorization": alice}
    outsiders = [piece(p, who, proof) for p in holders for who in (None, "other")]
    outsiders += [dict(piece(p, None, proof), url=f"http://{p.node.ip}:{UPLOAD_PORT}/pieces/{a}/0", tls=None)
                  for p in holders]
    for req, r in zip(outsiders, intrude(intruder_node, "http", outsiders)):
        assert r["status"] in (0, 400) and not leaked(lab, r), (req, r)
    for r in intrude(intruder_node, "http", [piece(p, "client", proof) for p in holders]):
        assert r["status"] == 403 and not leaked(lab, r), r

    # The scheduler: a member peer learns who holds A's blob (it is a cluster member; the scheduler does
    # not know tenants) — and then gets no piece from them without A's proof.
    sched = {"target": f"{mesh.sched_node.ip}:8002", "task_id": a, "ip": intruder_node.ip, **FAKE_ANNOUNCE}
    member = intrude(intruder_node, "scheduler", {**sched, "tls": tls(lab, "member"), "peer_id": "b-peer",
                                                  "host_id": "tenant-b-node"})
    assert member["RegisterPeer"]["code"] == "OK" and member["GetParents"]["code"] == "OK", member
    parents = member["GetParents"]["parents"]
    assert {x["ip"] for x in parents} & {p.node.ip for p in holders}, member
    tries = [{"url": f"https://{x['ip']}:{x['port']}/pieces/{a}/{i}", "tls": tls(lab, "member"), "headers": h}
             for x in parents for i in x["pieces"][:2] for h in proofs]
    assert tries
    for req, r in zip(tries, intrude(intruder_node, "http", tries)):
        assert r["status"] == 403 and not leaked(lab, r), (req, r)
    assert mesh.registry.blob_bytes_served().get(a, 0) == a_everywhere["served"]


def test_a_host_without_a_cluster_certificate_cannot_register_announce_or_download(lab, a_everywhere):
    mesh = lab["mesh"]
    a = lab["blobs"]["a"][2]
    node = mesh.peers[NOCRED].node
    sched = {"target": f"{mesh.sched_node.ip}:8002", "task_id": a, "ip": node.ip, **FAKE_ANNOUNCE}
    # Control: the same calls with a member certificate succeed.
    ok = intrude(node, "scheduler", {**sched, "tls": tls(lab, "member"), "peer_id": "ctl-peer",
                                     "host_id": "tenant-b-node"})
    assert all(ok[c]["code"] == "OK" for c in ("RegisterPeer", "AnnouncePieces", "GetParents")), ok
    # The refused ones claim to hold piece 0 of A's blob itself (were it accepted, children would be sent
    # to them).
    claim = {**sched, "announce_task": a, "content_length": BLOB_SIZE, "piece_size": piece_size_for(BLOB_SIZE)}
    for who, spec in (("plaintext", None), ("no certificate", tls(lab, None)), ("another CA", tls(lab, "other"))):
        out = intrude(node, "scheduler", {**claim, "tls": spec, "peer_id": f"x-{who[:4]}", "host_id": "intruder"})
        for call in ("RegisterPeer", "AnnouncePieces", "GetParents"):
            assert out[call]["code"] == "UNAVAILABLE", (who, call, out)
    client = intrude(node, "scheduler", {**claim, "tls": tls(lab, "client"), "peer_id": "ops-peer", "host_id": "ops"})
    for call in ("RegisterPeer", "AnnouncePieces", "GetParents"):
        assert client[call]["code"] == "PERMISSION_DENIED", (call, client)
    # What the scheduler hands out for A's blob: its real holders (a control: the listing works), none of
    # the refused claimants.
    other = intrude(node, "scheduler", {**sched, "tls": tls(lab, "member2"), "peer_id": "ctl-peer2",
                                        "host_id": "tenant-b-node2"})
    named = {x["peer_id"] for x in other["GetParents"]["parents"]}
    assert {x["ip"] for x in other["GetParents"]["parents"]} & {p.node.ip for p in mesh.peers}, other
    assert not named & {"x-plai", "x-no c", "x-anot", "ops-peer"}, other
    # and downloading pieces needs a certificate too (the proof of A alone is not enough)
    proof = {SOURCE_HEADER: f"{mesh.registry.host}/team-a/app",
             "Authorization": token(lab, node, "alice", "team-a/app")}
    reqs = [{"url": f"https://{mesh.peers[0].node.ip}:{UPLOAD_PORT}/pieces/{a}/0", "tls": tls(lab, who),
             "headers": proof} for who in (None, "other", "member")]
    got = intrude(node, "http", reqs)
    assert got[0]["status"] == 0 and got[1]["status"] == 0, got[:2]
    assert got[2]["status"] == 200 and leaked(lab, got[2]), "control: a member with A's proof"


def test_a_piece_rotten_on_disk_is_never_served_over_tls(lab, a_everywhere):
    """The upload port over TLS reads a piece once, hashes it and sends those very bytes (upload.py): a
    piece damaged on disk is refused (404) and dropped, its neighbours go out intact."""
    import hashlib

    mesh = lab["mesh"]
    _, secret, a = lab["blobs"]["a"]
    holder, node = mesh.peers[0], mesh.peers[NOCRED].node
    step = piece_size_for(BLOB_SIZE)
    rotten, sound = 2, 3
    path = holder.data_dir / "tasks" / a[7:] / "pieces" / str(rotten)
    with open(path, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    proof = {SOURCE_HEADER: f"{mesh.registry.host}/team-a/app",
             "Authorization": token(lab, node, "alice", "team-a/app")}
    reqs = [{"url": f"https://{holder.node.ip}:{UPLOAD_PORT}/pieces/{a}/{i}", "tls": tls(lab, "member"),
             "headers": proof}
            for i in (rotten, rotten, sound)]
    got = intrude(node, "http", reqs)
    assert got[0]["status"] == 404 and got[1]["status"] == 404, got[:2]
    assert not leaked(lab, got[0])
    want = "sha256:" + hashlib.sha256(secret[sound * step:(sound + 1) * step]).hexdigest()
    assert (got[2]["status"], got[2]["bytes"], got[2]["sha256"]) == (200, step, want), got[2]
    assert metric(mesh.metrics(holder), "remora_peer_upload_pieces_total", result="corrupt") >= 1
