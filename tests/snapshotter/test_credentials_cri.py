"""Private remora images pulled through CRI start lazily when kubelet talks to remora's CRI proxy.

Everything is real: Debian's docker-registry with htpasswd auth, ``remora convert``, the
``remora snapshotter`` process (with ``--cri-proxy``), containerd 1.6 with its CRI plugin, and
kubelet's calls made with :class:`~remora_testing.cri.CRIImageClient` (PullImage with the
``auth`` kubelet fills from a pod's imagePullSecrets).

The snapshotter gets an empty docker config, so the only credentials it can have are the ones the
proxy captured: what is asserted is where credentials come from, and what happens without them.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from remora.errors import RemoraError
from remora.format import annotations as ann
from remora.registry.client import RegistryClient
from remora.snapshotter.mount import FSTYPE, MountManager
from remora.snapshotter.storage import detach_mount, mountpoints_under
from remora_testing.containerd import PrivateContainerd, RemoraSnapshotter
from remora_testing.cri import CRIImageClient
from remora_testing.imagebuild import LayerSpec, write_image
from remora_testing.registry import LocalRegistry

pytestmark = pytest.mark.timeout(300)

USER, PASSWORD = "tenant-a", "pull-secret-a"
CRI_NS = "k8s.io"


class AuthLoggingRegistry(LocalRegistry):
    """htpasswd auth and an info-level request log, to count the blob bytes it served."""

    _LINE = re.compile(r'msg="response completed".*http\.request\.method=GET.*'
                       r'http\.request\.uri="/v2/.+?/blobs/(sha256:[0-9a-f]{64})".*http\.response\.written=(\d+)')

    def config_text(self) -> str:
        return super().config_text().replace("level: warn", "level: info", 1)

    def mark(self) -> int:
        return (self.root / "registry.log").stat().st_size

    def blob_gets(self, since: int) -> dict[str, int]:
        with open(self.root / "registry.log", "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out: dict[str, int] = {}
        for m in self._LINE.finditer(text):
            out[m.group(1)] = out.get(m.group(1), 0) + int(m.group(2))
        return out


class PrivateImage:
    def __init__(self, reg: LocalRegistry, ref: str, payload: bytes):
        self.ref, self.payload = ref, payload
        self.repo, tag = ref.split("/", 1)[1].rsplit(":", 1)
        with RegistryClient(reg.host, credentials=(USER, PASSWORD)) as c:
            data, _, _ = c.get_manifest(self.repo, tag)
        self.layers = json.loads(data)["layers"]
        self.blobs = [layer["digest"] for layer in self.layers if layer["annotations"][ann.ROLE] == "blob"]


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    r = AuthLoggingRegistry(root=tmp_path_factory.mktemp("cred-registry"), users={USER: PASSWORD}).start()
    yield r
    r.stop()


def _private_image(reg: LocalRegistry, tmp: Path, name: str) -> PrivateImage:
    """A converted remora image in a private repository; its file ``data/payload.bin`` is random."""
    payload = os.urandom(300_000)
    root = tmp / name
    (root / "data").mkdir(parents=True)
    (root / "data" / "payload.bin").write_bytes(payload)
    env = {**os.environ, "REMORA_USERNAME": USER, "REMORA_PASSWORD": PASSWORD}
    src = f"{reg.host}/cred-{uuid.uuid4().hex[:6]}/{name}:1"
    old = {k: os.environ.get(k) for k in ("REMORA_USERNAME", "REMORA_PASSWORD")}
    os.environ.update(REMORA_USERNAME=USER, REMORA_PASSWORD=PASSWORD)
    try:
        write_image(src, None, [LayerSpec(root)], {"Cmd": ["/bin/sh"]})
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    dst = src + "-remora"
    subprocess.run([sys.executable, "-m", "remora.cli", "convert", "--no-progress", "--json", src, dst],
                   check=True, capture_output=True, timeout=240, env=env)
    return PrivateImage(reg, dst, payload)


@pytest.fixture(scope="module")
def images(reg, tmp_path_factory) -> dict[str, PrivateImage]:
    tmp = tmp_path_factory.mktemp("cred-images")
    return {name: _private_image(reg, tmp, name) for name in ("a", "b")}


class CRIStack:
    """A snapshotter with ``--cri-proxy`` and a containerd with CRI; ``close()`` leaves nothing."""

    def __init__(self, base: Path, reg: LocalRegistry):
        self.base = base
        self.snap = RemoraSnapshotter(base / "snap", log_level="info",
                                      argv=[sys.executable, "-m", "remora.snapshotter.cli"])
        self.ctd = PrivateContainerd(base / "ctd", self.snap.address, cri=True, registry_mirrors={reg.host: reg.url})
        self.proxy_socket = self.snap.address.parent / "cri.sock"
        self.snap.argv += ["--cri-proxy", str(self.proxy_socket), "--cri-upstream", str(self.ctd.address)]
        self.snap.start()
        try:
            self.ctd.start()
        except BaseException:
            self._stop_snapshotter()
            raise

    def snap_log(self) -> str:
        return self.snap.log_path.read_text(errors="replace")

    def fuse_mounts(self) -> list[Path]:
        root = str(self.snap.root.resolve()) + "/"
        out = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            if right.split()[0] == FSTYPE and left.split()[4].startswith(root):
                out.append(Path(left.split()[4]))
        return out

    def content(self) -> set[str]:
        return set(self.ctd.ctr("content", "ls", "-q", namespace=CRI_NS).stdout.split())

    def _stop_snapshotter(self) -> None:
        self.snap.close()
        MountManager(self.snap.root / "lazy", self.snap.root / "cache").unmount_all()
        for mp in mountpoints_under(self.base):
            detach_mount(mp)

    def close(self) -> None:
        try:
            self.ctd.close()
        finally:
            self._stop_snapshotter()


@pytest.fixture
def stack(tmp_path, monkeypatch, reg):
    # The snapshotter must have no credentials of its own: an empty docker config, no REMORA_* env.
    empty = tmp_path / "docker-config"
    empty.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(empty))
    monkeypatch.delenv("REMORA_USERNAME", raising=False)
    monkeypatch.delenv("REMORA_PASSWORD", raising=False)
    st = CRIStack(tmp_path / "s", reg)
    yield st
    st.close()


def test_private_image_pulled_through_proxy_is_mounted_lazily(stack, reg, images):
    """PullImage with auth through the proxy: the credentials reach the snapshotter, the image is
    mounted lazily (containerd downloads no layer, the registry serves no data blob at pull time),
    and a file reads correctly through the lazy mount, its chunks fetched with those credentials."""
    image = images["a"]
    mark = reg.mark()
    with CRIImageClient(stack.proxy_socket, timeout=120) as cri:
        image_id = cri.pull(image.ref, username=USER, password=PASSWORD)
        assert image_id.startswith("sha256:")
        # other ImageService calls pass through the proxy unchanged
        assert cri.status(image.ref).id == image_id
        assert any(image.ref in i.repo_tags for i in cri.list())
    assert stat.S_IMODE(stack.proxy_socket.stat().st_mode) == 0o600
    # a RuntimeService method the proxy has no stub for goes through byte for byte
    import grpc

    answers = []
    for address in (stack.proxy_socket, stack.ctd.address):
        with grpc.insecure_channel(f"unix://{address}") as ch:
            answers.append(ch.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=30))
    assert answers[0] == answers[1] and b"containerd" in answers[0]
    assert f"captured pull credentials for {reg.host}/{image.repo}" in stack.snap_log()
    assert PASSWORD not in stack.snap_log()
    assert not stack.content() & {desc["digest"] for desc in image.layers}, "containerd downloaded a layer"
    assert not set(reg.blob_gets(mark)) & set(image.blobs), "a data blob was fetched at pull time"
    mounts = stack.fuse_mounts()
    assert len(mounts) == 1, mounts
    assert (mounts[0] / "data" / "payload.bin").read_bytes() == image.payload
    assert set(reg.blob_gets(mark)) & set(image.blobs), "the file was read without fetching its blob?"
    # on disk, the password is only in the mount's spec (so a restarted snapshotter can re-mount), 0600
    holding = []
    for path in stack.snap.root.rglob("*"):
        rel = path.relative_to(stack.snap.root).parts
        if rel[0] in ("snapshots", "cache") or not path.is_file():  # the mounts themselves; chunk data
            continue
        if PASSWORD.encode() in path.read_bytes():
            holding.append(path)
    assert [p.parent.name for p in holding] == ["mounts"], holding
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 and p.stat().st_uid == 0 for p in holding)


def test_private_image_pulled_straight_to_containerd_fails_clearly(stack, reg, images):
    """Without the proxy containerd has the pod's credentials but the snapshotter does not: the pull
    fails with an error naming the image and the ways to provide credentials, and no lazy mount, no
    image and no half-prepared snapshot is left (falling back to applying the bootstrap layer as a
    tar would give a root fs without the application)."""
    image = images["a"]
    with CRIImageClient(stack.ctd.address, timeout=120) as cri:
        with pytest.raises(RemoraError) as err:
            cri.pull(image.ref, username=USER, password=PASSWORD)
        assert cri.status(image.ref) is None
    msg = str(err.value)
    assert f"cannot mount {reg.host}/{image.repo} lazily" in msg, msg
    assert "--cri-proxy" in msg and "credential-provider" in msg, msg
    assert stack.fuse_mounts() == []
    # the image's first Prepare was refused: no snapshot at all is left behind
    assert [p for p in (stack.snap.root / "snapshots").iterdir() if p.is_dir()] == []


def test_captured_credentials_are_not_used_for_another_repository(stack, reg, images):
    """Credentials captured for repository A open A only: B (same registry, same user) pulled
    straight to containerd still finds none, although the proxy holds a valid secret for A."""
    a, b = images["a"], images["b"]
    with CRIImageClient(stack.proxy_socket, timeout=120) as cri:
        cri.pull(a.ref, username=USER, password=PASSWORD)
    with CRIImageClient(stack.ctd.address, timeout=120) as cri, pytest.raises(RemoraError) as err:
        cri.pull(b.ref, username=USER, password=PASSWORD)
    assert f"cannot mount {reg.host}/{b.repo} lazily" in str(err.value)
    # and through the proxy, B gets its own captured credentials and mounts; containerd's errors
    # (wrong password) come back through the proxy as they are
    with CRIImageClient(stack.proxy_socket, timeout=120) as cri:
        with pytest.raises(RemoraError, match="401 Unauthorized"):
            cri.pull(b.ref, username=USER, password="wrong")
        cri.pull(b.ref, username=USER, password=PASSWORD)
    assert len(stack.fuse_mounts()) == 2


def test_cached_bootstrap_does_not_mount_without_access(stack, reg, images):
    """The bootstrap is cached on the node from an earlier pull, but this pull's snapshotter has no
    credentials (restarted: the captured ones are gone): the access check fails the pull clearly
    instead of mounting an image whose chunk reads would fail inside the container."""
    image = images["a"]
    with CRIImageClient(stack.proxy_socket, timeout=120) as cri:
        cri.pull(image.ref, username=USER, password=PASSWORD)
        cri.remove(image.ref)  # CRI deletes synchronously: snapshots and the lazy mount go
    assert stack.fuse_mounts() == []
    assert list((stack.snap.root / "bootstraps").glob("sha256-*.db")), "the bootstrap is not cached"
    stack.snap.stop()
    stack.snap.start()
    # containerd reconnects to the proxy plugin with back-off: wait until its calls reach the new process
    stack.ctd.wait_snapshotter(namespace=CRI_NS)
    refused = f"cannot mount {re.escape(reg.host)}/{re.escape(image.repo)} lazily"

    def pull_once() -> str:
        with CRIImageClient(stack.ctd.address, timeout=120) as cri:
            try:
                cri.pull(image.ref, username=USER, password=PASSWORD)
            except RemoraError as exc:
                return str(exc)
        return "pulled"

    # A transport error of containerd's channel to the restarted snapshotter ("connection closed:
    # unavailable": grpc-go's last connection error while it backs off, seen in CI when the wait above
    # was a `ctr snapshots ls`, which containerd answers without the snapshotter) is not the answer under
    # test: try again after a pause, a bounded number of times; the snapshotter's refusal must come, the
    # snapshotter must stay up, and nothing may be mounted meanwhile.
    answers = []
    for attempt in range(6):
        answers.append(pull_once())
        if "connection closed" not in answers[-1] and "connection error" not in answers[-1]:
            break
        assert stack.snap.daemon is not None and stack.snap.daemon.alive(), stack.snap_log()[-6000:]
        assert stack.fuse_mounts() == []
        time.sleep(0.5 * (attempt + 1))
    assert re.search(refused, answers[-1]), (
        "\n".join(answers) + f"\n--- snapshotter log:\n{stack.snap_log()[-6000:]}"
        f"\n--- containerd log:\n{stack.ctd.log_tail(30)}")
    assert stack.fuse_mounts() == []
