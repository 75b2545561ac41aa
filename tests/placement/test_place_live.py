"""``remora place ... --from-scheduler``: the live cluster read from a real ``remora scheduler`` process.

All on 127.0.0.1 with the mesh's mutual TLS: a cluster CA, a scheduler process, three hosts whose peers
register through gRPC with their own peer certificates, report probe RTTs, seed and fetch a blob (so the
scheduler learns who holds it and the goodput of the transfer). The planner reads that view with a
manager certificate; a ``client`` certificate is refused. The model's nodes, links and cached parts must
be exactly what the mapping of docs/placement.md §4.3 says.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from remora._proto import remora_scheduler_pb2 as pb
from remora._proto import remora_scheduler_pb2_grpc as pb_grpc
from remora.errors import AuthError, InvalidInput, UsageError
from remora.meshapi import read_topology
from remora.pki import ca as pki_ca
from remora.pki import tls
from remora.placement.live import LiveDefaults, load_live, network_from_topology
from remora.placement.model import Application, Function, Image
from remora.procutil import Daemon, free_port

CLUSTER = "placelive"
BLOB = "sha256:" + "5a" * 32
OTHER = "sha256:" + "6b" * 32
PIECE = 256 << 10
MS = 1e-3

SPEC = f"""\
version: 1
network:
  nodes:
    - {{name: host-c, cpu: "16", memory: 32Gi, cpu_cost: 0.5}}
users: {{host-a: 10}}
application:
  name: live
  images:
    - {{name: img, layers: [{{digest: "{BLOB}", size: 4Mi}}, {{digest: "{OTHER}", size: 1Mi}}]}}
  functions:
    - {{name: f1, cpu: 2ms, memory: 256Mi, image: img, calls: {{f2: 10Ki}}}}
    - {{name: f2, cpu: 2ms, memory: 256Mi, image: img}}
"""


def member(root: Path, ca, role: str, host: str) -> Path:
    out = root / f"{role}-{host}"
    pki_ca.write_member(out, ca.issue(role, host, ips=["127.0.0.1"]), ca.bundle_pem)
    return out


@pytest.fixture
def cluster(tmp_path):
    """A scheduler process with mutual TLS and the member directories of a lab cluster."""
    ca = pki_ca.init_ca(tmp_path / "ca", cluster=CLUSTER)
    port = free_port()
    sched = Daemon([sys.executable, "-m", "remora.cli", "scheduler", "--listen", f"127.0.0.1:{port}",
                    "--metrics-listen", "", "--tls-dir", str(member(tmp_path, ca, "scheduler", "sched"))],
                   tmp_path / "scheduler.log").start()
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in sched.log_tail(20):
            assert sched.alive(), sched.log_tail()
            assert time.monotonic() < deadline, "scheduler did not start: " + sched.log_tail()
            time.sleep(0.05)
        yield address, ca, tmp_path
    finally:
        sched.stop()


def stub_for(address: str, directory: Path):
    channel = grpc.secure_channel(address, tls.grpc_channel_credentials(tls.TLSFiles.in_dir(directory)))
    return channel, pb_grpc.SchedulerStub(channel)


def populate(address: str, ca, root: Path) -> None:
    """host-a (declares 50 MB/s) seeds BLOB; host-b fetches a 256 KiB piece from it in 0.1 s; probes:
    a<->b 4 ms and 6 ms (mean 5 ms), b->c 10 ms, a->c failed; host-c declares nothing."""
    stubs, channels = {}, []
    for host, bw in (("host-a", 50_000_000), ("host-b", 20_000_000), ("host-c", 0)):
        ch, stub = stub_for(address, member(root, ca, "peer", host))
        channels.append(ch)
        stubs[host] = stub
        stub.RegisterPeer(pb.RegisterPeerRequest(host=pb.PeerHost(
            peer_id=f"{host}-p1", host_id=host, ip="127.0.0.1", upload_port=40000 + len(stubs),
            labels={"zone": host[-1]}, upload_bandwidth=bw)), timeout=5)
    try:
        a, b = stubs["host-a"], stubs["host-b"]
        assert a.RegisterTask(pb.RegisterTaskRequest(peer_id="host-a-p1", task_id=BLOB), timeout=5).back_to_source
        a.AnnouncePieces(pb.AnnouncePiecesRequest(peer_id="host-a-p1", task_id=BLOB, content_length=PIECE,
                                                  piece_size=PIECE, piece_digests=["sha256:" + "11" * 32],
                                                  finished=[0]), timeout=5)
        a.ReportTaskResult(pb.ReportTaskResultRequest(peer_id="host-a-p1", task_id=BLOB, success=True), timeout=5)
        got = b.RegisterTask(pb.RegisterTaskRequest(peer_id="host-b-p1", task_id=BLOB), timeout=5)
        assert [p.host.host_id for p in got.parents] == ["host-a"], got
        b.ReportPieceResults(pb.ReportPieceResultsRequest(peer_id="host-b-p1", task_id=BLOB, results=[
            pb.PieceResult(parent_id="host-a-p1", piece=0, success=True, cost_us=100_000, size=PIECE)]), timeout=5)
        for stub, me, results in (
                (a, "host-a-p1", [("host-b-p1", 4000, True), ("host-c-p1", 0, False)]),
                (b, "host-b-p1", [("host-a-p1", 6000, True), ("host-c-p1", 10000, True)])):
            stub.SyncProbes(pb.SyncProbesRequest(peer_id=me, results=[
                pb.ProbeResult(peer_id=p, rtt_us=us, success=ok) for p, us, ok in results]), timeout=5)
    finally:
        for ch in channels:
            ch.close()


def test_live_network_matches_what_the_scheduler_saw(cluster):
    address, ca, root = cluster
    populate(address, ca, root)
    manager = member(root, ca, "manager", "planner")
    spec = root / "app.yaml"
    spec.write_text(SPEC)

    doc = read_topology(address, tls_dir=manager, digests=[BLOB, OTHER])
    hosts = {h["host_id"]: h for h in doc["hosts"]}
    assert set(hosts) == {"host-a", "host-b", "host-c"} and not doc["truncated"]
    assert hosts["host-a"]["holds"] == [BLOB] and hosts["host-b"]["holds"] == []
    assert hosts["host-a"]["declared_upload_bandwidth"] == 50_000_000 and hosts["host-a"]["peer_ids"] == ["host-a-p1"]
    # more digests than one call may ask about: asked in batches, holdings merged (BLOB sorts last)
    many = [f"sha256:{i:064x}" for i in range(1500)] + [BLOB]
    assert {h["host_id"]: h["holds"] for h in read_topology(address, tls_dir=manager, digests=many)["hosts"]} == \
        {"host-a": [BLOB], "host-b": [], "host-c": []}

    problem, _ = load_live([spec], lambda d: read_topology(address, tls_dir=manager, digests=d),
                           LiveDefaults(cpu=2000, memory=4 * 2**30, bandwidth=1e6))
    net = problem.network
    nodes = {n.name: n for n in net.nodes}
    assert set(nodes) == {"host-a", "host-b", "host-c"}
    # host-c from the spec, the others from the defaults; labels from the peers
    assert (nodes["host-c"].cpu, nodes["host-c"].memory, nodes["host-c"].cpu_cost) == (16000, 32 * 2**30, 0.5)
    assert (nodes["host-a"].cpu, nodes["host-a"].memory) == (2000, 4 * 2**30)
    assert nodes["host-b"].labels == {"zone": "b"}
    assert nodes["host-a"].cached == {BLOB} and nodes["host-b"].cached == frozenset()
    links = {frozenset((link.a, link.b)): link for link in net.links}
    assert set(links) == {frozenset(("host-a", "host-b")), frozenset(("host-b", "host-c"))}   # a->c failed
    ab, bc = links[frozenset(("host-a", "host-b"))], links[frozenset(("host-b", "host-c"))]
    # the scheduler keeps an EWMA per direction: one sample each, so a<->b = (4 + 6) / 2 / 2 ms
    assert ab.delay == pytest.approx(2.5 * MS) and bc.delay == pytest.approx(5 * MS)
    assert ab.bandwidth == pytest.approx(PIECE / 0.1)          # measured goodput a -> b
    assert bc.bandwidth == pytest.approx(20_000_000)           # host-b declared, host-c unknown
    assert problem.users == {"host-a": 10.0}

    # the CLI end to end: the image's held layer costs nothing to deploy on host-a
    out = subprocess.run([sys.executable, "-m", "remora.cli", "place", "plan", str(spec), "--from-scheduler", address,
                          "--tls-dir", str(manager), "--json", "--node-cpu", "2", "--node-memory", "4Gi"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert set(plan["placement"]["functions"].values()) <= set(nodes)
    for d in plan["deploy"]:
        want = 1 << 20 if d["node"] == "host-a" else 5 << 20
        assert d["missing_bytes"] == want, d


def test_topology_read_is_for_members_only(cluster):
    address, ca, root = cluster
    with pytest.raises(AuthError, match="cluster members only"):
        read_topology(address, tls_dir=member(root, ca, "client", "ops"))
    with pytest.raises(UsageError):
        read_topology(address)   # neither TLS nor an explicit plain mesh
    # a member with a malformed request: INVALID_ARGUMENT, the scheduler stays up
    ch, _ = stub_for(address, member(root, ca, "peer", "host-x"))
    try:
        call = ch.unary_unary("/remora.scheduler.v1.Topology/GetTopology")
        for bad in (b"{not json", b'{"digests": "sha256:x"}', b'{"max_hosts": 0}', b'{"other": 1}'):
            with pytest.raises(grpc.RpcError) as err:
                call(bad, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert json.loads(call(b"{}", timeout=5))["version"] == 1
    finally:
        ch.close()
    spec = root / "app.yaml"
    spec.write_text(SPEC)
    out = subprocess.run([sys.executable, "-m", "remora.cli", "place", "plan", str(spec), "--from-scheduler", address,
                          "--tls-dir", str(member(root, ca, "client", "ops2"))], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "refused the topology read" in out.stderr, out.stderr


def test_mapping_rejects_gaps_and_unknown_hosts():
    app = Application("x", (Function("f", 0.001, 0, "img"),), images={"img": Image("img", ((BLOB, 10),))})
    doc = {"version": 1, "hosts": [{"host_id": h, "holds": []} for h in ("a", "b", "c")],
           "rtts": [{"from": "a", "to": "b", "rtt_s": 0.002, "reachable": True}], "goodput": []}
    with pytest.raises(InvalidInput, match="no RTT measured between a and c"):
        network_from_topology(doc, app)
    doc["rtts"].append({"from": "c", "to": "b", "rtt_s": 0.004, "reachable": False})
    with pytest.raises(InvalidInput, match="no RTT measured"):
        network_from_topology(doc, app)     # an unreachable probe is no link
    doc["rtts"].append({"from": "b", "to": "c", "rtt_s": 0.004, "reachable": True})
    net = network_from_topology(doc, app, defaults=LiveDefaults(bandwidth=7.0))
    got = sorted((link.a, link.b, link.delay, link.bandwidth) for link in net.links)
    assert got == [("a", "b", 0.001, 7.0), ("b", "c", 0.002, 7.0)]
    with pytest.raises(InvalidInput, match="knows no peer"):
        network_from_topology({"version": 1, "hosts": []}, app)
