"""The interop harness works: containerd 2.1, dockerd 28 and a CRI client, each against containerd's own
overlayfs snapshotter and against a proxy snapshotter (``remora snapshotter``).

These tests prove the pieces the interop suite stands on (remora.testenv.containerd2 / docker / cri
and scripts/fetch-newer-runtimes.sh), not remora's lazy loading: a failure here means the runtime
setup is broken, not the snapshotter. Every daemon gets its own root, sockets and containerd
namespace, and the last test checks that stopping them leaves nothing behind.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from remora.errors import NotFound
from remora.imagebuild import busybox_image
from remora.snapshotter.storage import mountpoints_under
from remora.testenv.containerd import PrivateContainerd, RemoraSnapshotter
from remora.testenv.containerd2 import RUNC_STATE, PrivateContainerd2
from remora.testenv.cri import CRIImageClient
from remora.testenv.docker import PrivateDocker


@pytest.fixture(scope="module")
def busybox_ref(registry) -> str:
    ref = f"{registry.host}/interop-harness-{uuid.uuid4().hex[:8]}/busybox:1"
    busybox_image(ref)
    return ref


@pytest.fixture(scope="module")
def snapshotter(tmp_path_factory):
    with RemoraSnapshotter(tmp_path_factory.mktemp("interop") / "snap") as snap:
        yield snap


@pytest.fixture(scope="module")
def containerd2(tmp_path_factory, snapshotter):
    """containerd 2.1 with overlayfs built in and remora as proxy plugin, shared by the module's tests."""
    with PrivateContainerd2(tmp_path_factory.mktemp("interop") / "ctd2", snapshotter.address) as ctd:
        yield ctd


def _snapshot_keys(ctd, snapshotter_name: str, namespace: str) -> list[str]:
    out = ctd.ctr("snapshots", "--snapshotter", snapshotter_name, "ls", namespace=namespace).stdout
    return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]


def test_containerd2_version_and_config(containerd2):
    out = containerd2.ctr("version").stdout
    assert "Version:  2.1." in out.split("Server:")[1], out
    config = containerd2.config_path.read_text()
    assert config.startswith("version = 3\n")
    assert 'enable_remote_snapshot_annotations = "true"' in config
    assert 'snapshotter = "remora"' in config
    plugins = containerd2.ctr("plugins", "ls").stdout
    assert any("remora" in line and line.split()[-1] == "ok" for line in plugins.splitlines()), plugins


def test_containerd2_ctr_pull_and_run_overlayfs(containerd2, busybox_ref):
    containerd2.ctr("images", "pull", "--plain-http", busybox_ref)
    assert busybox_ref in containerd2.ctr("images", "ls", "-q").stdout
    out = containerd2.ctr("run", "--rm", busybox_ref, f"c-{uuid.uuid4().hex[:6]}", "echo", "overlayfs-ok").stdout
    assert out.strip() == "overlayfs-ok"
    assert _snapshot_keys(containerd2, "overlayfs", containerd2.namespace)


def test_containerd2_transfer_pull_through_proxy_snapshotter(containerd2, busybox_ref):
    ns = f"{containerd2.namespace}-proxy"
    containerd2.ctr("images", "pull", "--plain-http", "--snapshotter", "remora", busybox_ref, namespace=ns)
    assert _snapshot_keys(containerd2, "remora", ns), "the layer was not committed in the proxy snapshotter"
    out = containerd2.ctr("run", "--rm", "--snapshotter", "remora", busybox_ref, "c-proxy", "cat", "/etc/passwd",
                          namespace=ns).stdout
    assert out.startswith("root:x:0:0:")


@pytest.mark.parametrize("driver", ["overlayfs", "remora"])
def test_docker_pull_and_run(tmp_path, containerd2, registry, busybox_ref, driver):
    with PrivateDocker(tmp_path / "docker", containerd2.address, snapshotter=driver,
                       insecure_registries=[registry.host]) as dk:
        docker = dk.client()
        info = docker.system.info()
        assert info.driver == driver
        image = docker.pull(busybox_ref, quiet=True)
        assert image.os == "linux" and image.architecture == "amd64"
        assert docker.run(busybox_ref, ["echo", f"docker-{driver}-ok"], remove=True).strip() == f"docker-{driver}-ok"
        assert docker.container.list(all=True) == []  # --rm removed it
        # dockerd keeps its images in containerd, in its own namespace, on the chosen snapshotter.
        assert busybox_ref in containerd2.ctr("images", "ls", "-q", namespace=dk.namespace).stdout
        assert _snapshot_keys(containerd2, driver, dk.namespace)


@pytest.mark.parametrize("proxy", [False, True], ids=["overlayfs", "remora"])
def test_cri_image_service_on_containerd16(tmp_path, registry, busybox_ref, snapshotter, proxy):
    kw = {"snapshotter_name": "overlayfs"} if not proxy else {}
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
        with pytest.raises(NotFound):
            cri.pull(f"{registry.host}/interop-harness-missing/none:1")
        assert cri.status(f"{registry.host}/interop-harness-missing/none:1") is None
        cri.remove(busybox_ref)
        cri.remove(busybox_ref)  # idempotent, as kubelet expects
        assert cri.status(busybox_ref) is None


def test_cri_image_service_on_containerd2(tmp_path, registry, busybox_ref, snapshotter):
    with PrivateContainerd2(tmp_path / "ctd2cri", snapshotter.address, cri=True,
                            registry_mirrors={registry.host: registry.url}) as ctd, \
            CRIImageClient(ctd.address, timeout=60) as cri:
        image_id = cri.pull(busybox_ref)
        assert cri.status(busybox_ref).id == image_id
        assert _snapshot_keys(ctd, "remora", "k8s.io")


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
        ctd.ctr("images", "pull", "--plain-http", busybox_ref)
        ctd.ctr("run", "--rm", busybox_ref, "c-teardown", "true")
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
    for ns in (ctd.namespace, dk.namespace):
        assert not (RUNC_STATE / ns).exists()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{dk.cgroup_parent}"))
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{ctd.namespace}"))
