"""The interop harness works: containerd 2.1, dockerd 28 and a CRI client, each against containerd's own
overlayfs snapshotter and against a proxy snapshotter (``remora snapshotter`` behind a SnapshotRecorder,
which also pins down which labels each client sends on Prepare: the table in docs/interop.md).

These tests prove the pieces the interop suite stands on (remora_testing.containerd_v2 / docker / cri
and scripts/fetch-newer-runtimes.sh), not remora's lazy loading: a failure here means the runtime
setup is broken, not the snapshotter. Every daemon gets its own root, sockets and containerd
namespace, and the last test checks that stopping them leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from remora.errors import NotFound
from remora.snapshotter.storage import mountpoints_under
from remora_testing.containerd import PrivateContainerd, RemoraSnapshotter
from remora_testing.containerd_v2 import RUNC_STATE, PrivateContainerd2
from remora_testing.cri import CRIImageClient
from remora_testing.docker import PrivateDocker
from remora_testing.imagebuild import LayerSpec, busybox_layer, write_image
from remora_testing.snaprecorder import SnapshotRecorder

PROBE = "containerd.io/snapshot/interop-probe"  # a layer annotation containerd should pass through
CRI_LABELS = {f"containerd.io/snapshot/cri.{k}" for k in ("image-ref", "layer-digest", "manifest-digest",
                                                          "image-layers")}
REF_LABEL = "containerd.io/snapshot.ref"


@pytest.fixture(scope="module")
def busybox_ref(registry) -> str:
    """A one-layer busybox image whose layer carries the PROBE annotation (and one containerd drops)."""
    ref = f"{registry.host}/interop-harness-{uuid.uuid4().hex[:8]}/busybox:1"
    write_image(ref, None, [LayerSpec(busybox_layer(), annotations={PROBE: "yes", "org.example.dropped": "x"})],
                {"Cmd": ["sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]})
    return ref


@pytest.fixture(scope="module")
def snapshotter(tmp_path_factory):
    """``remora snapshotter`` behind a recorder: containerds get ``recorder.address`` as proxy address."""
    sockdir = Path(tempfile.mkdtemp(prefix="rrec-", dir="/tmp"))
    with RemoraSnapshotter(tmp_path_factory.mktemp("interop") / "snap") as snap, \
            SnapshotRecorder(sockdir / "recorder.sock", snap.address) as recorder:
        yield recorder
    shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture(scope="module")
def containerd_v2(tmp_path_factory, snapshotter):
    """containerd 2.1 with overlayfs built in and remora as proxy plugin, shared by the module's tests."""
    with PrivateContainerd2(tmp_path_factory.mktemp("interop") / "ctd2", snapshotter.address) as ctd:
        yield ctd


def _labels(recorder: SnapshotRecorder, namespace: str) -> dict[str, str]:
    """The labels of the one Prepare a one-layer pull sent in ``namespace``."""
    calls = recorder.take(namespace)
    assert len(calls) == 1, calls
    return calls[0].labels


def _snapshot_keys(ctd, snapshotter_name: str, namespace: str) -> list[str]:
    out = ctd.ctr("snapshots", "--snapshotter", snapshotter_name, "ls", namespace=namespace).stdout
    return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]


def test_containerd2_version_and_config(containerd_v2):
    out = containerd_v2.ctr("version").stdout
    assert "Version:  2." in out.split("Server:")[1], out  # sid: 2.1.x when written
    config = containerd_v2.config_path.read_text()
    assert config.startswith("version = 3\n")
    assert 'enable_remote_snapshot_annotations = "true"' in config
    assert 'snapshotter = "remora"' in config
    plugins = containerd_v2.ctr("plugins", "ls").stdout
    assert any("remora" in line and line.split()[-1] == "ok" for line in plugins.splitlines()), plugins


def test_containerd2_ctr_pull_and_run_overlayfs(containerd_v2, busybox_ref):
    containerd_v2.ctr("images", "pull", "--plain-http", busybox_ref)
    assert busybox_ref in containerd_v2.ctr("images", "ls", "-q").stdout
    out = containerd_v2.ctr("run", "--rm", busybox_ref, f"c-{uuid.uuid4().hex[:6]}", "echo", "overlayfs-ok").stdout
    assert out.strip() == "overlayfs-ok"
    assert _snapshot_keys(containerd_v2, "overlayfs", containerd_v2.namespace)


def test_containerd2_transfer_pull_through_proxy_snapshotter(containerd_v2, snapshotter, busybox_ref):
    ns = f"{containerd_v2.namespace}-proxy"
    containerd_v2.ctr("images", "pull", "--plain-http", "--snapshotter", "remora", busybox_ref, namespace=ns)
    assert _snapshot_keys(containerd_v2, "remora", ns), "the layer was not committed in the proxy snapshotter"
    # Transfer service + enable_remote_snapshot_annotations export: the full remote-snapshot label set.
    labels = _labels(snapshotter, ns)
    assert CRI_LABELS | {REF_LABEL, PROBE} == set(labels)
    assert labels["containerd.io/snapshot/cri.image-ref"] == busybox_ref
    out = containerd_v2.ctr("run", "--rm", "--snapshotter", "remora", busybox_ref, "c-proxy", "cat", "/etc/passwd",
                          namespace=ns).stdout
    assert out.startswith("root:x:0:0:")


def test_containerd2_local_pull_passes_no_labels(containerd_v2, snapshotter, busybox_ref):
    ns = f"{containerd_v2.namespace}-local"
    containerd_v2.ctr("images", "pull", "--local", "--plain-http", "--snapshotter", "remora", busybox_ref,
                    namespace=ns)
    assert _labels(snapshotter, ns) == {}


def test_containerd2_without_export_passes_ref_and_layer_annotations(tmp_path, snapshotter, busybox_ref):
    with PrivateContainerd2(tmp_path / "ctd2", snapshotter.address, remote_snapshot_annotations=False) as ctd:
        assert "enable_remote_snapshot_annotations" not in ctd.config_path.read_text()
        ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "remora", busybox_ref)
        assert set(_labels(snapshotter, ctd.namespace)) == {REF_LABEL, PROBE}


@pytest.mark.parametrize("driver", ["overlayfs", "remora"])
def test_docker_pull_and_run(tmp_path, containerd_v2, snapshotter, registry, busybox_ref, driver):
    with PrivateDocker(tmp_path / "docker", containerd_v2.address, snapshotter=driver,
                       insecure_registries=[registry.host]) as dk:
        docker = dk.client()
        info = docker.system.info()
        assert info.driver == driver
        image = docker.pull(busybox_ref, quiet=True)
        assert image.os == "linux" and image.architecture == "amd64"
        if driver == "remora":  # moby sends the cri.* labels to any snapshotter name
            assert set(_labels(snapshotter, dk.namespace)) == CRI_LABELS | {REF_LABEL, PROBE}
        assert docker.run(busybox_ref, ["echo", f"docker-{driver}-ok"], remove=True).strip() == f"docker-{driver}-ok"
        assert docker.container.list(all=True) == []  # --rm removed it
        # dockerd keeps its images in containerd, in its own namespace, on the chosen snapshotter.
        assert busybox_ref in containerd_v2.ctr("images", "ls", "-q", namespace=dk.namespace).stdout
        assert _snapshot_keys(containerd_v2, driver, dk.namespace)
        snapshotter.take(dk.namespace)  # the container's own Prepares


@pytest.mark.parametrize("proxy", [False, True], ids=["overlayfs", "remora"])
def test_cri_image_service_on_containerd16(tmp_path, registry, busybox_ref, snapshotter, proxy):
    kw = {"snapshotter_name": "overlayfs"} if not proxy else {}
    snapshotter.take("k8s.io")  # CRI always uses k8s.io: forget what an earlier (failed) test left
    with PrivateContainerd(tmp_path / "ctd16", snapshotter.address if proxy else None, cri=True,
                           registry_mirrors={registry.host: registry.url}, **kw) as ctd, \
            CRIImageClient(ctd.address, timeout=60) as cri:
        image_id = cri.pull(busybox_ref)
        assert image_id.startswith("sha256:")
        status = cri.status(busybox_ref)
        assert status is not None and status.id == image_id and status.size > 0
        assert busybox_ref in status.repo_tags
        assert [i.id for i in cri.list(busybox_ref)] == [image_id]
        assert _snapshot_keys(ctd, "remora" if proxy else "overlayfs", "k8s.io")
        if proxy:
            assert set(_labels(snapshotter, "k8s.io")) == CRI_LABELS | {REF_LABEL, PROBE}
            # while plain `ctr images pull` on 1.6 sends no label at all: why `remora pull` exists
            ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "remora", busybox_ref)
            assert _labels(snapshotter, ctd.namespace) == {}
        with pytest.raises(NotFound):
            cri.pull(f"{registry.host}/interop-harness-missing/none:1")
        assert cri.status(f"{registry.host}/interop-harness-missing/none:1") is None
        cri.remove(busybox_ref)
        cri.remove(busybox_ref)  # idempotent, as kubelet expects
        assert cri.status(busybox_ref) is None


def test_cri_image_service_on_containerd2(tmp_path, registry, busybox_ref, snapshotter):
    snapshotter.take("k8s.io")
    with PrivateContainerd2(tmp_path / "ctd2cri", snapshotter.address, cri=True,
                            registry_mirrors={registry.host: registry.url}) as ctd, \
            CRIImageClient(ctd.address, timeout=60) as cri:
        image_id = cri.pull(busybox_ref)
        assert cri.status(busybox_ref).id == image_id
        assert _snapshot_keys(ctd, "remora", "k8s.io")
        assert set(_labels(snapshotter, "k8s.io")) == CRI_LABELS | {REF_LABEL, PROBE}


def test_teardown_leaves_nothing(tmp_path, registry, busybox_ref):
    """Stopping containerd 2 and dockerd ends their processes and removes their mounts, sockets,
    runc state and cgroups, even after a container ran."""
    ctd = PrivateContainerd2(tmp_path / "ctd2").start()
    dk = PrivateDocker(tmp_path / "docker", ctd.address, snapshotter="overlayfs",
                       insecure_registries=[registry.host]).start()
    try:
        docker = dk.client()
        docker.pull(busybox_ref, quiet=True)
        assert docker.run(busybox_ref, ["true"], remove=True) == ""
        extra_ns = f"{ctd.namespace}-extra"
        ctd.ctr("images", "pull", "--plain-http", busybox_ref, namespace=extra_ns)
        ctd.ctr("run", "--rm", busybox_ref, "c-teardown", "true", namespace=extra_ns)
        assert (RUNC_STATE / extra_ns).is_dir()  # what runc leaves behind, until close()
        pids = [dk.daemon.pid, ctd.daemon.pid]
        sockets = [dk.socket, ctd.address]
    finally:
        dk.close()
        ctd.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any(s.exists() for s in sockets)
    assert mountpoints_under(tmp_path) == []
    for ns in (extra_ns, dk.namespace):
        assert not (RUNC_STATE / ns).exists()
    for cgroup in (dk.cgroup_parent, extra_ns):
        assert not list(Path("/sys/fs/cgroup").glob(f"*/{cgroup}"))


def test_a_start_that_fails_any_way_leaves_nothing(tmp_path, monkeypatch):
    """A readiness probe that raises something else than the deadline (a CI run once leaked dockerd's
    data-root mount that way) still stops the daemon and removes what it left: the error goes up."""
    ctd = PrivateContainerd2(tmp_path / "ctd2").start()
    try:
        dk = PrivateDocker(tmp_path / "docker", ctd.address, snapshotter="overlayfs")
        seen: list[int] = []

        def probe():
            seen.append(dk.daemon.pid)
            if len(seen) < 20:    # let dockerd get going (its data-root mount is made early)
                return False
            raise RuntimeError("probe broke")

        monkeypatch.setattr(dk, "_answers", probe)
        with pytest.raises(RuntimeError, match="probe broke"):
            dk.start()
        with pytest.raises(ProcessLookupError):
            os.kill(seen[0], 0)
        assert mountpoints_under(tmp_path / "docker") == []
        assert not dk.socket.exists()
    finally:
        ctd.close()


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_examples_match_the_tested_configs(tmp_path):
    """The shipped config snippets say what the harness runs: same proxy plugin, export, unpack
    pairs, CRI snapshotter settings and Docker keys (so a drift in either shows up here)."""
    import json
    import tomllib

    sock = tmp_path / "snap.sock"
    ctd2 = PrivateContainerd2(tmp_path / "c2", sock, cri=True)
    ctd16 = PrivateContainerd(tmp_path / "c16", sock, cri=True)
    try:
        tested2, tested16 = tomllib.loads(ctd2.config_text()), tomllib.loads(ctd16.config_text())
    finally:
        ctd2.close()
        ctd16.close()
    ex2 = tomllib.loads((EXAMPLES / "snapshotter" / "containerd-2.x.toml").read_text())
    assert ex2["version"] == tested2["version"] == 3
    assert ex2["proxy_plugins"]["remora"]["exports"] == tested2["proxy_plugins"]["remora"]["exports"]
    assert ex2["proxy_plugins"]["remora"]["type"] == "snapshot"
    transfer = "io.containerd.transfer.v1.local"
    assert ex2["plugins"][transfer]["unpack_config"] == tested2["plugins"][transfer]["unpack_config"]
    for key in ("snapshotter", "disable_snapshot_annotations"):
        images = "io.containerd.cri.v1.images"
        assert ex2["plugins"][images][key] == tested2["plugins"][images][key]
    cri16 = "io.containerd.grpc.v1.cri"
    for name in ("containerd-1.6.toml", "containerd-1.7.toml"):
        ex = tomllib.loads((EXAMPLES / "snapshotter" / name).read_text())
        assert ex["version"] == tested16["version"] == 2
        assert ex["proxy_plugins"]["remora"]["type"] == tested16["proxy_plugins"]["remora"]["type"]
        assert ex["plugins"][cri16]["containerd"] == {k: tested16["plugins"][cri16]["containerd"][k]
                                                      for k in ("snapshotter", "disable_snapshot_annotations")}
    k8s = (EXAMPLES / "kubernetes" / "snapshotter-daemonset.yaml").read_text()
    assert 'enable_remote_snapshot_annotations = "true"' in k8s and "disable_snapshot_annotations = false" in k8s

    daemon = json.loads((EXAMPLES / "docker" / "daemon.json").read_text())
    dk = PrivateDocker(tmp_path / "dk", sock, snapshotter="remora")
    try:
        tested = dk.daemon_config()
    finally:
        dk.close()
    for key in ("features", "storage-driver"):
        assert daemon[key] == tested[key]
    assert "containerd" in daemon
