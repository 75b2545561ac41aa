"""The bootstrap, the manifest and the config come from the node's mirrors/peers first (issue 12: "after a
preheat, the first start on that node reads no byte from the registry").

Real parts: a registry with its access log on (the judge of what it served), a real ``remora peer``
preheated with ``remora peer preheat --all``, the ``remora snapshotter`` process with ``--mirror``, a
private containerd, ``remora pull`` through the snapshotter's pull service and ``ctr run``. A lying
mirror is a loopback HTTP server that flips a byte of every body it relays (lazy_support.CountingProxy).
"""
from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from lazy_support import CountingProxy, converted_busybox
from test_remote_e2e import Stack

from remora.procutil import Daemon, free_port, port_open, wait_until
from remora.registry.client import RegistryClient
from remora_testing.registry import LocalRegistry

pytestmark = pytest.mark.timeout(300)

# distribution's access log ("combined"): ... "GET /v2/<repo>/blobs/<digest> HTTP/1.1" 200 <bytes> ...
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>/v2/\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<size>\d+|-)')


class LoggedRegistry(LocalRegistry):
    """The test registry with its access log on: every blob GET it answered is countable."""

    def config_text(self) -> str:
        text = super().config_text()
        assert "accesslog:\n    disabled: true" in text
        return text.replace("accesslog:\n    disabled: true", "accesslog:\n    disabled: false")

    def blob_gets(self) -> list[tuple[str, str]]:
        """(digest, status) of every blob GET in the access log, in order."""
        assert self.daemon is not None
        rows = []
        for line in self.daemon.log_path.read_text(errors="replace").splitlines():
            m = _ACCESS.search(line)
            if m and m["method"] == "GET" and "/blobs/" in m["path"]:
                rows.append((m["path"].rsplit("/blobs/", 1)[1].split("?")[0], m["status"]))
        return rows


@pytest.fixture(scope="module")
def logged_registry(tmp_path_factory):
    reg = LoggedRegistry(root=tmp_path_factory.mktemp("logged-registry")).start()
    yield reg
    reg.stop()


def _roles(image: str) -> dict[str, str]:
    """digest -> role (config, bootstrap, blob) of the remora image's manifest, read from the registry."""
    import json

    from remora.format import annotations as ann

    host, _, rest = image.partition("/")
    repo, _, tag = rest.rpartition(":")
    with RegistryClient(host) as client:
        data, _, _ = client.get_manifest(repo, tag)
    m = json.loads(data)
    roles = {m["config"]["digest"]: "config"}
    for layer in m["layers"]:
        roles[layer["digest"]] = "bootstrap" if layer.get("annotations", {}).get(ann.ROLE) == "bootstrap" else "blob"
    assert "bootstrap" in roles.values(), m
    return roles


def _start_peer(registry, tmp_path: Path, port: int = 0, extra: tuple[str, ...] = ()) -> tuple[Daemon, str, Path]:
    port = port or free_port()
    token = tmp_path / "preheat-token"
    token.write_text(f"mirror-first-{uuid.uuid4().hex}\n")
    token.chmod(0o600)
    peer = Daemon([sys.executable, "-m", "remora.cli", "peer", "--listen", f"127.0.0.1:{port}",
                   "--upload-listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "peer"),
                   "--gc-high", "64G", "--gc-low", "48G", "--preheat-token-file", str(token),
                   # no scheduler, no mesh: the node's own pull-through peer of the test registry
                   "--insecure-plain-mesh", "--registry", registry.host, *extra],
                  tmp_path / "peer.log").start()
    try:
        wait_until(lambda: port_open("127.0.0.1", port) or not peer.alive(), 30, what="remora peer")
        assert peer.alive(), peer.log_tail()
    except BaseException:
        peer.stop()
        raise
    return peer, f"127.0.0.1:{port}", token


def _pull(st: Stack, ns: str, image: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "remora.cli", "pull", "--address", str(st.ctd.address), "-n", ns,
                           "--api", str(st.snap.api_address), image], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr + "\n--- snapshotter log ---\n" + st.snap_log(120)
    assert "by the snapshotter's pull service" in proc.stderr, proc.stderr
    return proc


def test_after_a_preheat_the_pull_and_start_read_no_registry_blob(logged_registry, tmp_path):
    image = converted_busybox(logged_registry, "mirror-first")
    roles = _roles(image)
    peer, address, token = _start_peer(logged_registry, tmp_path)
    try:
        pre = subprocess.run([sys.executable, "-m", "remora.cli", "peer", "preheat", image, "--all", "--wait",
                              "--address", address, "--preheat-token-file", str(token)],
                             capture_output=True, text=True, timeout=180)
        assert pre.returncode == 0, pre.stdout + pre.stderr + peer.log_tail()
        preheated = {d for d, status in logged_registry.blob_gets() if status in ("200", "206")}
        assert set(roles) <= preheated, "the preheat did not fetch every blob through the registry"
        mark = len(logged_registry.blob_gets())

        st = Stack(tmp_path / "stack", snapshotter_args=("--mirror", f"http://{address}"))
        try:
            ns = f"mirror-first-{uuid.uuid4().hex[:6]}"
            st.namespaces.append(ns)
            _pull(st, ns, image)
            after_pull = logged_registry.blob_gets()[mark:]
            assert after_pull == [], f"the pull read blobs from the registry: {after_pull} (roles {roles})"
            out = st.run(image, "sh", "-c", "echo started-$((6*7))", namespace=ns).stdout
            assert out == "started-42\n"
            log = st.snap_log(400)
        finally:
            st.close()
        after_start = [(roles.get(d, "?"), d, s) for d, s in logged_registry.blob_gets()[mark:]]
        assert after_start == [], f"the first start read blobs from the registry: {after_start}"
        # the peer, not a cache, served them: the snapshotter says where the bootstrap came from
        boot = next(d for d, r in roles.items() if r == "bootstrap")
        assert re.search(rf"bootstrap {boot[:19]}: \d+ bytes from http://{re.escape(address)}", log), log
    finally:
        peer.stop()


def test_a_preheat_with_pull_leaves_the_image_ready_in_containerd(logged_registry, tmp_path):
    """``remora peer preheat --pull`` (issue 12, the planner's ``--preheat --pull``): once the peer holds
    every blob, the node's snapshotter pulls the image into containerd through its pull service, in the
    namespace the peer was configured with. Then ``ctr run`` starts it with no ``remora pull`` and the
    registry serves nothing more; the task's status names what containerd holds."""
    import json

    image = converted_busybox(logged_registry, "preheat-pull")
    roles = _roles(image)
    port = free_port()
    st = Stack(tmp_path / "stack", snapshotter_args=("--mirror", f"http://127.0.0.1:{port}"))
    peer = None
    try:
        ns = f"preheat-pull-{uuid.uuid4().hex[:6]}"
        st.namespaces.append(ns)
        peer, address, token = _start_peer(logged_registry, tmp_path, port, (
            "--runtime-pull-api", str(st.snap.api_address), "--runtime-address", str(st.ctd.address),
            "--runtime-namespace", ns))
        assert image not in st.ctd.ctr("images", "ls", "-q", namespace=ns).stdout.split()
        pre = subprocess.run([sys.executable, "-m", "remora.cli", "peer", "preheat", image, "--all", "--pull",
                              "--wait", "--json", "--address", address, "--preheat-token-file", str(token)],
                             capture_output=True, text=True, timeout=180)
        assert pre.returncode == 0, pre.stdout + pre.stderr + peer.log_tail() + st.snap_log(120)
        status = json.loads(pre.stdout)
        assert status["state"] == "succeeded" and status["pull"]["state"] == "done", status
        assert status["pull"]["name"] == image and status["pull"]["manifest_digest"].startswith("sha256:")
        assert status["pull"]["remote_layers"] >= 1, status["pull"]
        # containerd has the image, in the peer's namespace, and nowhere else
        assert image in st.ctd.ctr("images", "ls", "-q", namespace=ns).stdout.split()
        assert image not in st.ctd.ctr("images", "ls", "-q").stdout.split()
        mark = len(logged_registry.blob_gets())
        out = st.run(image, "sh", "-c", "echo started-$((6*7))", namespace=ns).stdout
        assert out == "started-42\n"
        after = [(roles.get(d, "?"), d, s) for d, s in logged_registry.blob_gets()[mark:]]
        assert after == [], f"the start read blobs from the registry: {after}"
        # a second preheat with pull of the same image finds it there (reused layers, same manifest)
        again = subprocess.run([sys.executable, "-m", "remora.cli", "peer", "preheat", image, "--pull", "--wait",
                                "--json", "--address", address, "--preheat-token-file", str(token)],
                               capture_output=True, text=True, timeout=180)
        assert again.returncode == 0, again.stdout + again.stderr
        assert json.loads(again.stdout)["pull"]["manifest_digest"] == status["pull"]["manifest_digest"]
    finally:
        if peer is not None:
            peer.stop()
        st.close()


def test_a_preheat_with_pull_fails_clearly_when_no_pull_service_answers(logged_registry, tmp_path):
    """The peer's --runtime-pull-api names a socket nobody serves (a snapshotter that is down): the blobs
    are preheated, the task fails and says why; a peer without --runtime-pull-api refuses the request."""
    import json

    image = converted_busybox(logged_registry, "preheat-nopull")
    peer, address, token = _start_peer(logged_registry, tmp_path, extra=(
        "--runtime-pull-api", str(tmp_path / "nobody.sock")))
    try:
        pre = subprocess.run([sys.executable, "-m", "remora.cli", "peer", "preheat", image, "--pull", "--wait",
                              "--json", "--address", address, "--preheat-token-file", str(token)],
                             capture_output=True, text=True, timeout=180)
        assert pre.returncode == 1, pre.stdout + pre.stderr
        status = json.loads(pre.stdout)
        assert status["state"] == "failed" and status["pull"]["state"] == "failed", status
        assert "--runtime-pull-api" in status["error"] and "nobody.sock" in status["error"], status["error"]
        assert all(b["verified"] for b in status["blobs"]), status["blobs"]
    finally:
        peer.stop()
    (tmp_path / "plain").mkdir()
    plain, address, token = _start_peer(logged_registry, tmp_path / "plain")
    try:
        pre = subprocess.run([sys.executable, "-m", "remora.cli", "peer", "preheat", image, "--pull",
                              "--address", address, "--preheat-token-file", str(token)],
                             capture_output=True, text=True, timeout=60)
        assert pre.returncode == 3, pre.stdout + pre.stderr
        assert "--runtime-pull-api" in pre.stderr, pre.stderr
    finally:
        plain.stop()


def test_a_lying_mirror_is_skipped_for_bootstrap_manifest_and_config(logged_registry, tmp_path):
    image = converted_busybox(logged_registry, "mirror-liar")
    roles = _roles(image)
    boot = next(d for d, r in roles.items() if r == "bootstrap")
    config = next(d for d, r in roles.items() if r == "config")
    mark = len(logged_registry.blob_gets())
    with CountingProxy(logged_registry.url, mode="flip") as liar:
        st = Stack(tmp_path / "stack", snapshotter_args=("--mirror", liar.url))
        try:
            ns = f"mirror-liar-{uuid.uuid4().hex[:6]}"
            st.namespaces.append(ns)
            _pull(st, ns, image)
            # busybox's bytes are the image's: they were verified (the liar's were refused)
            out = st.run(image, "sh", "-c", "echo started-$((6*7))", namespace=ns).stdout
            assert out == "started-42\n"
            log = st.snap_log(400)
        finally:
            st.close()
        asked = liar.requests
    # the mirror was asked first, for each of them, and lied
    assert any(f"/blobs/{boot}" in r for r in asked), asked
    assert any(f"/blobs/{config}" in r for r in asked), asked
    assert any("/manifests/" in r for r in asked), asked
    assert re.search(rf"bootstrap {boot[:19]} from {re.escape(liar.url)}.*(digest|mismatch)", log, re.I), log
    # ... then the registry served the real bytes, which were mounted
    served = [d for d, s in logged_registry.blob_gets()[mark:] if s == "200"]
    assert boot in served and config in served, served
    assert re.search(rf"bootstrap {boot[:19]}: \d+ bytes from the registry", log), log


def test_a_remote_mirror_serves_by_digest_only_never_a_tag(logged_registry, tmp_path):
    """A mirror that is not on this node (here ``[::ffff:127.0.0.1]``: not a loopback name to remora's
    rule, while the bytes still go over 127.0.0.1) is asked for the config and the bootstrap, which
    are checked against their digests, but never to resolve the tag: nothing could check its answer."""
    image = converted_busybox(logged_registry, "mirror-remote")
    roles = _roles(image)
    boot = next(d for d, r in roles.items() if r == "bootstrap")
    config = next(d for d, r in roles.items() if r == "config")
    with CountingProxy(logged_registry.url) as remote:
        port = remote.server.server_address[1]
        st = Stack(tmp_path / "stack", snapshotter_args=("--mirror", f"http://[::ffff:127.0.0.1]:{port}"))
        try:
            ns = f"mirror-remote-{uuid.uuid4().hex[:6]}"
            st.namespaces.append(ns)
            _pull(st, ns, image)
            assert st.run(image, "sh", "-c", "echo started-$((6*7))", namespace=ns).stdout == "started-42\n"
        finally:
            st.close()
        asked = remote.requests
    assert not any("/manifests/" in r for r in asked), asked
    assert any(f"/blobs/{boot}" in r for r in asked) and any(f"/blobs/{config}" in r for r in asked), asked


def test_an_unreachable_mirror_costs_one_failure_then_cools_down(logged_registry, tmp_path):
    """A dead peer (connection refused) does not stop the pull: the registry serves manifest, config and
    bootstrap; and the next image's pull does not ask the dead peer again while it cools down."""
    from lazy_support import dead_port_url

    first = converted_busybox(logged_registry, "mirror-dead")
    second = converted_busybox(logged_registry, "mirror-dead")
    dead = dead_port_url()
    st = Stack(tmp_path / "stack", snapshotter_args=("--mirror", dead))
    try:
        for image in (first, second):
            ns = f"mirror-dead-{uuid.uuid4().hex[:6]}"
            st.namespaces.append(ns)
            _pull(st, ns, image)
            assert st.run(image, "sh", "-c", "echo started-$((6*7))", namespace=ns).stdout == "started-42\n"
        log = st.snap_log(600)
    finally:
        st.close()
    assert re.search(rf"{re.escape(dead)}\S* unreachable .*not asked for 30s", log), log
    assert f"mirror {dead}: skipped (unreachable less than 30s ago)" in log, log
    for image in (first, second):
        assert re.search(rf"pulled {re.escape(image)} ", log), log
