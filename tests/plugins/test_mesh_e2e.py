"""The P2P mesh end to end, with real processes in network namespaces (remora_testing.netlab).

One lab for the module (starting 4 peers, a scheduler, a registry and 4 containerds is most of the cost):
a registry in its namespace (uplink 400 Mbit/s), a scheduler in its own, and 4 nodes each with a
``remora peer`` and a private containerd; node links are 100 Mbit/s (tbf). Every client runs inside a
node namespace and asks its own peer, as containerd does. Each scenario uses a blob of its own (a fresh
task) and puts back what it changed (a killed peer is restarted, a shaped link restored, a stopped
scheduler started again), in a ``finally``.

Faults are real: a peer SIGKILLed mid-transfer, a peer whose served pieces are corrupted on the wire,
a peer on a 2 Mbit/s uplink, a scheduler stopped mid-transfer. Whatever happens, every surviving node
must end with the blob's exact bytes (sha256 of what the client received), and the peers' metrics must
show where the bytes came from.
"""
from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from remora.plugins.peer.config import piece_size_for
from remora_testing.netlab import Lab, content
from remora_testing.netlab.mesh import Mesh, MeshOptions, metric

pytestmark = pytest.mark.slow

PREFIX = "rme-"
BLOB_SIZE = 30 << 20
RATE = "100mbit"
#: the registry's uplink is wider than a node's link so that nodes sent back to the registry by a fault
#: do not queue behind each other (that would only make the test slower, not stricter)
REGISTRY_RATE = "400mbit"
REPO = "lab/blob"
BYTES = "remora_peer_download_bytes_total"
SCENARIOS = ("every", "kill", "corrupt", "slow", "sched", "sched-cold")
IMAGE_FILES = ["/usr/lib/python3.11"]
PROBE_FILE = "/usr/lib/python3.11/email/parser.py"


@pytest.fixture(scope="module")
def lab_mesh(tmp_path_factory, cache_dir):
    """(mesh, {scenario: digest}, image): one started mesh for the module, always torn down."""
    blobs = {}
    for seed, name in enumerate(SCENARIOS, start=1):
        path = cache_dir / "netlab" / f"blob-{BLOB_SIZE >> 20}m-{seed}.bin"
        blobs[name] = (path, content.random_blob(path, BLOB_SIZE, seed=seed))
    # busybox (runnable) + a layer of real files from this machine
    image = content.cached_image(cache_dir / "netlab", "lab/app", "v1", extra_paths=IMAGE_FILES)
    with Lab(prefix=PREFIX, workdir=tmp_path_factory.mktemp("mesh-lab")) as lab:
        mesh = Mesh(lab, MeshOptions(peers=4, node_rate=RATE, registry_rate=REGISTRY_RATE, containerd=True))
        with mesh.registry.loopback() as loop:  # fill the storage from the root namespace, on 127.0.0.1
            for path, digest in blobs.values():
                content.push_blob(loop.url, REPO, path=path, digest=digest)
            content.push_image(loop.url, image)
        mesh.start()
        yield mesh, {name: digest for name, (_, digest) in blobs.items()}, image
        print(mesh.log_tails(6))


def peer_bytes(mesh: Mesh) -> list[dict]:
    """Per node: bytes it downloaded from the registry / from peers, uploaded, and fault counters."""
    rows = []
    for p in mesh.peers:
        m = mesh.metrics(p) if p.daemon and p.daemon.alive() else {}
        rows.append({"node": p.index, "registry": metric(m, BYTES, source="registry"),
                     "peer": metric(m, BYTES, source="peer"), "uploaded": metric(m, "remora_peer_upload_bytes_total"),
                     "corrupt": metric(m, "remora_peer_piece_failures_total", reason="corrupt"),
                     "blocklisted": metric(m, "remora_peer_blocklist_total"),
                     "back_to_source": metric(m, "remora_peer_back_to_source_total"),
                     "fresh": metric(m, "remora_peer_upload_pieces_total", result="fresh")})
    print("\n" + "\n".join(str(r) for r in rows))
    return rows


def delta(after: list[dict], before: list[dict]) -> list[dict]:
    """Counters are cumulative over the module's scenarios: what this scenario added."""
    return [{k: (a[k] - b[k] if k != "node" else a[k]) for k in a} for a, b in zip(after, before)]


def assert_all_right(results: list[dict], digest: str, mesh: Mesh) -> None:
    for i, r in enumerate(results):
        assert r["status"] == 200 and r["sha256"] == digest and r["bytes"] == BLOB_SIZE, \
            f"node result {i}: {r}\n{mesh.log_tails()}"


def wait_for_registry_traffic(mesh: Mesh, node, before: list[dict], timeout: float = 60) -> None:
    """Until ``node`` received blob bytes from the registry in this scenario (it is the seed, streaming)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(mesh.metrics(node), BYTES, source="registry") > before[node.index]["registry"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"node{node.index} got nothing from the registry within {timeout}s\n{mesh.log_tails()}")


def wait_for_peer_traffic(mesh: Mesh, nodes, before: list[dict], timeout: float = 60) -> None:
    """Until some node in ``nodes`` received piece bytes from a peer in this scenario (mid-transfer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(metric(mesh.metrics(p), BYTES, source="peer") > before[p.index]["peer"] for p in nodes):
            return
        time.sleep(0.1)
    raise AssertionError(f"no peer-to-peer traffic within {timeout}s\n{mesh.log_tails()}")


def test_every_node_gets_the_blob_and_the_registry_serves_it_about_once(lab_mesh):
    mesh, blobs, _ = lab_mesh
    digest = blobs["every"]
    before = peer_bytes(mesh)
    wall, results = mesh.fetch_all(REPO, digest)
    assert_all_right(results, digest, mesh)
    rows = delta(peer_bytes(mesh), before)
    served = mesh.registry.blob_bytes_served().get(digest, 0)
    print(f"4 nodes in {wall:.1f}s; registry served {served / BLOB_SIZE:.2f}x the blob")
    # the registry served one copy (4 without the mesh): only the seed talked to it, and the peers'
    # metrics agree with its log
    assert served <= 1.05 * BLOB_SIZE
    from_registry = sum(r["registry"] for r in rows)
    assert served * 0.9 <= from_registry <= served
    assert sum(1 for r in rows if r["registry"]) == 1, "only the seed fetches from the registry"
    # while it streamed, the seed sent each fresh piece to one child (a second copy only if that child
    # failed to pass it on within the grace): the children relayed the rest to each other
    seed = next(r for r in rows if r["registry"])
    n_pieces = -(-BLOB_SIZE // piece_size_for(BLOB_SIZE))
    assert seed["fresh"] <= 2 * n_pieces
    assert sum(r["uploaded"] for r in rows if r is not seed) > 0
    # at least one whole copy went peer to peer, and what was downloaded from peers was uploaded by peers
    assert sum(r["peer"] for r in rows) >= BLOB_SIZE
    assert sum(r["uploaded"] for r in rows) >= sum(r["peer"] for r in rows)


def test_peer_killed_mid_transfer(lab_mesh):
    mesh, blobs, _ = lab_mesh
    digest = blobs["kill"]
    victim, others = mesh.peers[0], mesh.peers[1:]
    before = peer_bytes(mesh)
    try:
        first = mesh.start_fetch(victim.node, mesh.blob_url(victim, REPO, digest))  # the victim seeds
        wait_for_registry_traffic(mesh, victim, before)
        procs = [mesh.start_fetch(p.node, mesh.blob_url(p, REPO, digest)) for p in others]
        wait_for_peer_traffic(mesh, others, before)
        still_running = [p for p in procs if p.poll() is None]
        mesh.kill_peer(victim)
        assert still_running, "every node finished before the kill: not a mid-transfer fault"
        results = [mesh.finish_fetch(p) for p in procs]
        mesh.finish_fetch(first)  # its client lost its mirror: nothing to assert on it
        assert_all_right(results, digest, mesh)
        assert not victim.daemon.alive()
        rows = delta(peer_bytes(mesh), before)
        # the survivors got the whole blob each, from the other peers and/or the registry
        assert all(r["registry"] + r["peer"] >= BLOB_SIZE for r in rows[1:])
    finally:
        mesh.restart_peer(victim)


def test_peer_serving_corrupt_bytes(lab_mesh):
    mesh, blobs, _ = lab_mesh
    digest = blobs["corrupt"]
    bad, others = mesh.peers[0], mesh.peers[1:]
    mesh.restart_peer(bad, corrupt=True)  # now advertises a port where every piece it serves is damaged
    try:
        before = peer_bytes(mesh)
        # the corrupt peer seeds from the registry (its own copy is fine: only what it serves is corrupted)
        _, first = mesh.fetch_all(REPO, digest, nodes=[bad])
        assert_all_right(first, digest, mesh)
        _, results = mesh.fetch_all(REPO, digest, nodes=others)
        assert_all_right(results, digest, mesh)
        rows = delta(peer_bytes(mesh), before)
        # the corruption was seen, counted, and the bad parent blocklisted; nobody kept its bytes
        assert sum(r["corrupt"] for r in rows[1:]) >= 1
        assert sum(r["blocklisted"] for r in rows[1:]) >= 1
        assert rows[0]["uploaded"] > 0
    finally:
        mesh.restart_peer(bad, corrupt=False)


def test_slow_peer_does_not_hold_the_mesh_back(lab_mesh):
    mesh, blobs, _ = lab_mesh
    digest = blobs["slow"]
    slow, others = mesh.peers[0], mesh.peers[1:]
    slow.node.shape(up="2mbit")
    try:
        before = peer_bytes(mesh)
        _, first = mesh.fetch_all(REPO, digest, nodes=[slow])  # the slow node holds the whole blob first
        assert_all_right(first, digest, mesh)
        t0 = time.monotonic()
        _, results = mesh.fetch_all(REPO, digest, nodes=others)
        elapsed = time.monotonic() - t0
        assert_all_right(results, digest, mesh)
        rows = delta(peer_bytes(mesh), before)
        print(f"others done in {elapsed:.1f}s; slow peer uploaded {rows[0]['uploaded'] / 2**20:.1f} MiB")
        # The only holder of the blob is the slow node: through its 2 Mbit/s uplink one copy takes ~126 s
        # (the children relay among themselves, so that is the floor when they wait for it). They must not:
        # the mesh notices the crawling parent and gets the bytes elsewhere in a fraction of that time.
        one_copy_from_slow = BLOB_SIZE / (2e6 / 8)
        assert elapsed < one_copy_from_slow / 3, \
            f"the others took {elapsed:.0f}s: they waited for the slow peer ({one_copy_from_slow:.0f}s a copy)"
        # ... and that is because they reacted to it (blocklisted it or went to the registry), not luck
        assert sum(r["blocklisted"] + r["back_to_source"] for r in rows[1:]) >= 1
        assert all(r["registry"] + r["peer"] >= BLOB_SIZE for r in rows[1:])
    finally:
        slow.node.shape(up=RATE)


def test_containerd_pulls_real_image_through_the_mirror(lab_mesh):
    mesh, _, image = lab_mesh
    ref = f"{mesh.registry.host}/{image.repo}:{image.tag}"
    before = peer_bytes(mesh)
    errors = []

    def pull(p):
        try:
            mesh.pull_image(p, ref)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(f"node{p.index}: {exc}")

    threads = [threading.Thread(target=pull, args=(p,)) for p in mesh.peers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, "\n".join(errors) + "\n" + mesh.log_tails()
    for p in mesh.peers:
        assert p.containerd.image_digest(ref) == image.manifest_digest
        assert {layer.digest for layer in image.layers} <= p.containerd.content_digests()
    # the bytes inside the container are the host's bytes
    want = hashlib.sha256(Path(PROBE_FILE).read_bytes()).hexdigest()
    out = mesh.peers[1].containerd.run_container(ref, ["sha256sum", f"/data{PROBE_FILE}"], name=f"t{time.time_ns()}")
    assert out.split()[0] == want
    # every node got the layers through its peer, and the registry served the big layer less than once
    # per node
    rows = delta(peer_bytes(mesh), before)
    big = max(image.layers, key=lambda layer: layer.size)
    served = mesh.registry.blob_bytes_served().get(big.digest, 0)
    print(f"registry served the {big.size / 2**20:.1f} MiB layer {served / big.size:.2f} times for 4 nodes")
    assert served < 4 * big.size
    assert all(r["registry"] + r["peer"] >= big.size for r in rows)


def test_scheduler_stopped_mid_transfer(lab_mesh):
    mesh, blobs, _ = lab_mesh
    digest, cold = blobs["sched"], blobs["sched-cold"]
    before = peer_bytes(mesh)
    try:
        procs = [mesh.start_fetch(mesh.peers[0].node, mesh.blob_url(mesh.peers[0], REPO, digest))]
        wait_for_registry_traffic(mesh, mesh.peers[0], before)   # the first node is the seed, streaming
        for p in mesh.peers[1:]:
            procs.append(mesh.start_fetch(p.node, mesh.blob_url(p, REPO, digest)))
        wait_for_peer_traffic(mesh, mesh.peers[1:], before)
        mesh.stop_scheduler()
        assert not mesh.scheduler.alive()
        results = [mesh.finish_fetch(p) for p in procs]
        assert_all_right(results, digest, mesh)
        rows = delta(peer_bytes(mesh), before)
        assert all(r["registry"] + r["peer"] >= BLOB_SIZE for r in rows)
        # a blob first asked for while the scheduler is down still arrives (from the registry)
        _, again = mesh.fetch_all(REPO, cold, nodes=mesh.peers[:2])
        assert_all_right(again, cold, mesh)
        assert mesh.registry.blob_bytes_served().get(cold, 0) >= BLOB_SIZE
    finally:
        mesh.start_scheduler()
