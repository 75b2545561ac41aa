"""remora images run LAZILY through real containerd, end to end.

Everything is real: Debian's docker-registry, ``remora convert``, the ``remora snapshotter`` process
with its FUSE mounts, containerd 1.6 (and 2.1 / dockerd 28 from scripts/fetch-newer-runtimes.sh),
runc containers started with ``ctr run``. Laziness is measured where it matters, at the registry:
its request log (level info) records every GET and the bytes written, so "the registry served a
fraction of the image" counts what containerd, the snapshotter and the fs processes fetched.

Each test gets its own snapshotter and containerd (a containerd's GC removes every snapshot it does
not know, so two containerds must never share a snapshotter) and a unique containerd namespace;
the teardown kills containers, stops the daemons and detaches every FUSE/overlay mount left behind.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from remora.format import annotations as ann
from remora.procutil import wait_until
from remora.registry.client import RegistryClient
from remora.snapshotter.storage import detach_mount, mountpoints_under
from remora_testing.containerd import PrivateContainerd, RemoraSnapshotter
from remora_testing.imagebuild import LayerSpec, busybox_image, debian_rootfs, write_image
from remora_testing.registry import LocalRegistry

pytestmark = pytest.mark.timeout(300)

PY_WORKLOAD = ["python3", "-c", "import json; print(json.dumps(1))"]
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LoggingRegistry(LocalRegistry):
    """A LocalRegistry that logs every request at level info, so the test can count served bytes."""

    _LINE = re.compile(r'msg="response completed".*http\.request\.method=(\w+).*'
                       r'http\.request\.uri="/v2/(.+?)/blobs/(sha256:[0-9a-f]{64})".*'
                       r'http\.response\.written=(\d+)')

    def config_text(self) -> str:
        return super().config_text().replace("level: warn", "level: info", 1)

    @property
    def log_path(self) -> Path:
        return self.root / "registry.log"

    def mark(self) -> int:
        return self.log_path.stat().st_size

    def blob_gets(self, since: int = 0) -> dict[str, int]:
        """``{digest: bytes served by GET}`` since log offset ``since`` (blobs never asked for are absent)."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out: dict[str, int] = {}
        for line in text.splitlines():
            m = self._LINE.search(line)
            if m and m.group(1) == "GET":
                out[m.group(3)] = out.get(m.group(3), 0) + int(m.group(4))
        return out


class RemoraImage:
    """A converted image in the registry: its reference and its manifest's layers."""

    def __init__(self, registry: LocalRegistry, source_ref: str, ref: str):
        self.source_ref, self.ref = source_ref, ref
        repo, tag = ref.split("/", 1)[1].rsplit(":", 1)
        with RegistryClient(registry.host) as c:
            data, _, self.manifest_digest = c.get_manifest(repo, tag)
        manifest = json.loads(data)
        self.layers = manifest["layers"]
        self.size = sum(layer["size"] for layer in self.layers)
        self.blobs = [layer["digest"] for layer in self.layers if layer["annotations"][ann.ROLE] == "blob"]
        self.bootstrap = next(layer["digest"] for layer in self.layers if layer["annotations"][ann.ROLE] == "bootstrap")


def _convert(registry: LocalRegistry, source_ref: str) -> RemoraImage:
    ref = source_ref + "-remora"
    subprocess.run([sys.executable, "-m", "remora.cli", "convert", "--no-progress", "--json", source_ref, ref],
                   check=True, capture_output=True, timeout=240)
    return RemoraImage(registry, source_ref, ref)


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    r = LoggingRegistry(root=tmp_path_factory.mktemp("e2e-registry")).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def busybox(reg) -> RemoraImage:
    ref = f"{reg.host}/e2e-{uuid.uuid4().hex[:6]}/busybox:1"
    busybox_image(ref)
    return _convert(reg, ref)


@pytest.fixture(scope="module")
def python_image(reg, cache_dir) -> RemoraImage:
    """Debian bookworm minbase + python3 (~175 MB uncompressed), converted with defaults."""
    ref = f"{reg.host}/e2e-{uuid.uuid4().hex[:6]}/python:1"
    write_image(ref, None, [LayerSpec(debian_rootfs(cache_dir), created_by="debootstrap --include=python3")],
                {"Cmd": ["python3"], "Env": [PATH_ENV]}, compression="none")
    return _convert(reg, ref)


# -- stacks: snapshotter + containerd, torn down completely -----------------------------------------
def _reap(ctd: PrivateContainerd, namespace: str | None = None) -> None:
    """Kill and delete every task and container of the namespace (else shims and mounts outlive us)."""
    if ctd.daemon is None:
        return
    for tid in ctd.ctr("tasks", "ls", "-q", check=False, namespace=namespace).stdout.split():
        ctd.ctr("tasks", "kill", "-s", "SIGKILL", tid, check=False, namespace=namespace)
        try:  # deletable once the kill has landed
            wait_until(lambda tid=tid: ctd.ctr("tasks", "delete", tid, check=False,
                                               namespace=namespace).returncode == 0,
                       5, interval=0.1, what=f"task {tid} to be deleted")
        except TimeoutError:
            pass  # the containers' delete below and the stack's teardown report what is left
    for cid in ctd.ctr("containers", "ls", "-q", check=False, namespace=namespace).stdout.split():
        ctd.ctr("containers", "delete", cid, check=False, namespace=namespace)


class Stack:
    """One snapshotter + one containerd under ``base``; ``close()`` leaves nothing behind."""

    def __init__(self, base: Path, cri: bool = False, registry_mirrors=None, containerd_cls=PrivateContainerd,
                 snapshotter_args: tuple[str, ...] = (), **ctd_kw):
        self.base = base
        argv = [sys.executable, "-m", "remora.snapshotter.cli", *snapshotter_args]
        self.snap = RemoraSnapshotter(base / "snap", log_level="info", argv=argv).start()
        self.namespaces: list[str] = []
        try:
            self.ctd = containerd_cls(base / "ctd", self.snap.address, cri=cri, registry_mirrors=registry_mirrors,
                                      **ctd_kw).start()
        except BaseException:
            self._stop_snapshotter()
            raise
        self.namespaces.append(self.ctd.namespace)

    @property
    def ns(self) -> str:
        return self.ctd.namespace

    def pull(self, image: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "remora.cli", "pull", "--address", str(self.ctd.address),
                               "-n", self.ns, *args, image], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"remora pull failed ({proc.returncode}):\n{proc.stderr}\n--- snapshotter log ---\n"
                                 f"{self.snap_log()}")
        return proc

    def run(self, image: str, *cmd: str, check: bool = True, timeout: float = 120,
            namespace: str | None = None) -> subprocess.CompletedProcess:
        cid = f"c-{uuid.uuid4().hex[:8]}"
        proc = self.ctd.ctr("run", "--rm", "--snapshotter", "remora", image, cid, *cmd, check=False,
                            timeout=timeout, namespace=namespace)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr run failed ({proc.returncode}): {proc.stderr}\n--- snapshotter log ---\n"
                                 f"{self.snap_log()}")
        return proc

    def content_digests(self, namespace: str | None = None) -> set[str]:
        return set(self.ctd.ctr("content", "ls", "-q", namespace=namespace).stdout.split())

    def snapshot_labels(self, key: str, namespace: str | None = None) -> dict[str, str]:
        out = self.ctd.ctr("snapshots", "--snapshotter", "remora", "info", key, namespace=namespace).stdout
        return json.loads(out).get("Labels", {})

    def snap_log(self, n: int = 60) -> str:
        try:
            return "\n".join(self.snap.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _stop_snapshotter(self) -> None:
        from remora.snapshotter.mount import MountManager

        self.snap.close()
        # Lazy mounts outlive the snapshotter on purpose (running containers keep their root fs):
        # stop them explicitly.
        MountManager(self.snap.root / "lazy", self.snap.root / "cache").unmount_all()
        for mp in mountpoints_under(self.base):
            detach_mount(mp)

    def close(self) -> None:
        """Every step runs even if an earlier one fails; the first failure is raised at the end."""
        errors: list[BaseException] = []
        for step in [*(lambda ns=ns: _reap(self.ctd, ns) for ns in self.namespaces), self.ctd.close,
                     self._stop_snapshotter, self._remove_namespace_leftovers]:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                errors.append(exc)
        if errors:
            raise errors[0]

    def _remove_namespace_leftovers(self) -> None:
        """runc's per-namespace state dir and the namespace's cgroups, once empty."""
        for ns in self.namespaces:
            try:
                os.rmdir(Path("/run/containerd/runc") / ns)
            except OSError:
                pass
            for cg in Path("/sys/fs/cgroup").glob(f"*/{ns}"):
                for dirpath, _, _ in sorted(os.walk(cg), key=lambda t: len(t[0]), reverse=True):
                    try:
                        os.rmdir(dirpath)
                    except OSError:
                        pass


@pytest.fixture
def stacks(tmp_path):
    """Factory of stacks; all of them are torn down after the test, whatever happened."""
    made: list[Stack] = []

    def make(name: str = "s", **kw) -> Stack:
        st = Stack(tmp_path / f"{name}{len(made)}", **kw)
        made.append(st)
        return st

    yield make
    errors = []
    for st in reversed(made):
        try:
            st.close()
        except Exception as exc:  # noqa: BLE001 - close the other stacks too
            errors.append(exc)
    if errors:
        raise errors[0]


def _assert_lazy(reg: LoggingRegistry, since: int, image: RemoraImage, fraction: float) -> dict[str, int]:
    served = reg.blob_gets(since)
    total = sum(served.values())
    assert total < image.size * fraction, \
        f"registry served {total} of {image.size} image bytes (limit {fraction:.2f}): {served}"
    return served


# -- (1) (2) remora pull + ctr run ------------------------------------------------------------------
@pytest.mark.parametrize("annotations_only", [False, True], ids=["cri-labels", "annotations-only"])
def test_pull_and_run_python_lazily(stacks, reg, python_image, annotations_only):
    st = stacks()
    mark = reg.mark()
    args = ["--annotations-only"] if annotations_only else []
    out = st.pull(python_image.ref, *args).stdout
    assert out.split() == [python_image.ref, python_image.manifest_digest]
    # The pull fetched manifest, config and bootstrap only: no data blob byte.
    served = reg.blob_gets(mark)
    assert not set(served) & set(python_image.blobs), served
    assert python_image.bootstrap in served

    proc = st.run(python_image.ref, *PY_WORKLOAD)
    assert proc.stdout == "1\n", proc.stderr
    served = _assert_lazy(reg, mark, python_image, 1 / 3)
    assert set(served) & set(python_image.blobs), "python ran without reading any data blob?"
    # containerd never downloaded a layer: its content store has the manifest and config only.
    content = st.content_digests()
    assert not content & {layer["digest"] for layer in python_image.layers}, content
    # What the snapshotter received is what the mode promises.
    layer_key = next(k for k in _committed(st) if st.snapshot_labels(k).get(ann.ROLE) == "bootstrap")
    labels = st.snapshot_labels(layer_key)
    assert labels[ann.BOOTSTRAP] == python_image.bootstrap
    assert ("containerd.io/snapshot/cri.image-ref" in labels) is (not annotations_only)


def _committed(st: Stack) -> list[str]:
    lines = st.ctd.ctr("snapshots", "--snapshotter", "remora", "ls").stdout.splitlines()[1:]
    return [line.split()[0] for line in lines if line.split() and line.split()[-1] == "Committed"]


def test_pull_and_run_busybox_gc_and_remove(stacks, reg, busybox):
    """Small image: right output; a second pull is a no-op; containerd's GC keeps the image (the
    gc.ref labels are right) and removing the image removes the snapshots and the lazy mount."""
    st = stacks()
    st.pull(busybox.ref)
    assert st.run(busybox.ref, "sh", "-c", "echo hello from $(basename $0)").stdout == "hello from sh\n"
    # The image has no xattrs, so the lazy fs told the kernel it has none (ENOSYS): overlayfs must
    # still copy a lower file up when a container writes to it.
    out = st.run(busybox.ref, "sh", "-c", "echo 'extra:x:1:1::/:/bin/false' >> /etc/passwd && tail -n 2 /etc/passwd")
    assert out.stdout == "nobody:x:65534:65534:nobody:/:/bin/false\nextra:x:1:1::/:/bin/false\n"
    again = st.pull(busybox.ref)
    assert f"{len(busybox.layers)} already present" in again.stderr, again.stderr
    # A synchronous GC (deleting any lease with --sync runs one): the pull's lease is gone, so only
    # the image record -> manifest -> config -> gc.ref.snapshot.remora chain keeps things alive.
    st.ctd.ctr("leases", "create", "--id", "gc-trigger")
    st.ctd.ctr("leases", "delete", "--sync", "gc-trigger")
    assert len(_committed(st)) == len(busybox.layers)
    assert busybox.manifest_digest in st.content_digests()
    assert st.run(busybox.ref, "ls", "/bin/busybox").stdout.strip() == "/bin/busybox"
    assert _fuse_mounts(st)
    st.ctd.ctr("images", "rm", "--sync", busybox.ref)
    assert _committed(st) == []
    assert _fuse_mounts(st) == []


def _fuse_mounts(st: Stack) -> list[str]:
    from remora.snapshotter.mount import FSTYPE

    root = str(st.snap.root.resolve()) + "/"
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == FSTYPE and left.split()[4].startswith(root):
            out.append(left.split()[4])
    return out


def test_pull_picks_remora_entry_of_fallback_index(stacks, reg, busybox):
    """``--with-oci-fallback`` tags an index [original, remora]: remora pull takes the remora entry."""
    ref = busybox.source_ref.rsplit(":", 1)[0] + ":fallback"
    subprocess.run([sys.executable, "-m", "remora.cli", "convert", "--no-progress", "--json", "--with-oci-fallback",
                    busybox.source_ref, ref], check=True, capture_output=True, timeout=120)
    st = stacks()
    out = st.pull(ref).stdout.split()
    assert out == [ref, busybox.manifest_digest]  # same remora manifest as the plain conversion
    assert st.run(ref, "echo", "fallback-ok").stdout == "fallback-ok\n"


@pytest.mark.parametrize("annotations_only", [False, True], ids=["cri-labels", "annotations-only"])
def test_hot_blob_is_fetched_early_and_once(stacks, reg, busybox, tmp_path, annotations_only):
    """A layer marked remora.prefetch-bytes is streamed from its own Prepare on (before the bootstrap
    is mounted) and the fs process reads it from there: the registry serves it exactly once, whole,
    whichever labels the client sends (annotations only: the digest comes from the base layer's chain ID)."""
    hot_list = tmp_path / "hot.txt"
    hot_list.write_text("/bin/busybox\n")
    ref = busybox.source_ref.rsplit(":", 1)[0] + f":hot-{annotations_only:d}"
    subprocess.run([sys.executable, "-m", "remora.cli", "convert", "--no-progress", "--json", "--prefetch-list",
                    str(hot_list), busybox.source_ref, ref], check=True, capture_output=True, timeout=120)
    image = RemoraImage(reg, busybox.source_ref, ref)
    hot = image.layers[0]
    assert ann.prefetch_bytes(hot["annotations"]) == hot["size"]
    st = stacks()
    mark = reg.mark()
    st.pull(ref, *(["--annotations-only"] if annotations_only else []))
    assert st.run(ref, "sh", "-c", "echo hot-$((6*7))").stdout == "hot-42\n"
    served = reg.blob_gets(mark)
    assert served.get(hot["digest"]) == hot["size"], served
    assert f"early prefetch of {hot['digest'][:19]}: {hot['size']} bytes" in st.snap_log(200)


# -- (3) CRI -----------------------------------------------------------------------------------------
def test_cri_pull_is_remote(stacks, reg, busybox):
    from remora_testing.cri import CRIImageClient

    st = stacks("cri", cri=True, registry_mirrors={reg.host: reg.url})
    mark = reg.mark()
    with CRIImageClient(st.ctd.address, timeout=120) as cri:
        image_id = cri.pull(busybox.ref)
        assert image_id.startswith("sha256:")
    served = reg.blob_gets(mark)
    assert not set(served) & set(busybox.blobs), f"CRI pull downloaded a layer: {served}"
    keys = st.ctd.ctr("snapshots", "--snapshotter", "remora", "ls", namespace="k8s.io").stdout
    st.namespaces.append("k8s.io")
    committed = [line.split()[0] for line in keys.splitlines()[1:] if line.strip()]
    assert len(committed) == len(busybox.layers), keys
    roles = sorted(st.snapshot_labels(k, namespace="k8s.io").get(ann.ROLE, "") for k in committed)
    assert roles == ["blob"] * len(busybox.blobs) + ["bootstrap"]
    # The lazy mount really is there: the container's root fs comes from it.
    assert st.run(busybox.ref, "echo", "cri-ok", namespace="k8s.io").stdout == "cri-ok\n"


# -- ctr-remote (stargz-snapshotter's client) ---------------------------------------------------------
def test_ctr_remote_rpull_is_remote(stacks, reg, busybox):
    """``ctr-remote images rpull`` sends stargz-style labels (remote/stargz.reference, no cri.*):
    remora locates the image from them and mounts it lazily."""
    st = stacks()
    mark = reg.mark()
    proc = subprocess.run(["ctr-remote", "--address", str(st.ctd.address), "-n", st.ns, "images", "rpull",
                           "--plain-http", "--snapshotter", "remora", busybox.ref],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + st.snap_log()
    assert not set(reg.blob_gets(mark)) & set(busybox.blobs)
    labels = st.snapshot_labels(next(k for k in _committed(st)
                                     if st.snapshot_labels(k).get(ann.ROLE) == "bootstrap"))
    assert "containerd.io/snapshot/remote/stargz.reference" in labels
    assert st.run(busybox.ref, "echo", "rpull-ok").stdout == "rpull-ok\n"


# -- (4) ordinary images fall back to overlayfs behaviour ---------------------------------------------
def test_oci_image_runs_like_overlayfs(stacks, busybox):
    st = stacks()
    ref = busybox.source_ref
    # Image content only (runc adds /proc, /dev, /sys, /etc mounts at run time): modes, owners,
    # sizes, mtimes and link targets of every entry, then a write into the container's upper dir.
    listing = ["sh", "-c", "find /bin /root /tmp /usr /var -exec ls -lnd --full-time {} + | md5sum; "
                           "md5sum /bin/busybox; echo data > /tmp/x && cat /tmp/x"]
    st.ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "remora", ref, timeout=120)
    st.ctd.ctr("images", "pull", "--plain-http", ref, timeout=120)  # overlayfs
    ours = st.run(ref, *listing).stdout
    cid = f"ovl-{uuid.uuid4().hex[:6]}"
    theirs = st.ctd.ctr("run", "--rm", ref, cid, *listing).stdout
    assert ours == theirs and ours.endswith("data\n"), (ours, theirs)
    # Not remote: the snapshotter stored the layer itself.
    keys = _committed(st)
    assert keys and all(ann.ROLE not in st.snapshot_labels(k) for k in keys)


def test_pull_of_oci_image_says_use_ctr(stacks, busybox):
    st = stacks()
    proc = st.pull(busybox.source_ref, check=False)
    assert proc.returncode == 3, proc.stderr
    assert "not a remora image" in proc.stderr and "ctr images pull" in proc.stderr


def test_pull_refuses_non_remote_layers(stacks, busybox):
    """A snapshotter that does not mount lazily (--no-lazy) or a wrong snapshotter name: a clear
    error, no image record, no snapshot left behind."""
    st = stacks(snapshotter_args=("--no-lazy",))
    proc = st.pull(busybox.ref, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "was not mounted remotely" in proc.stderr and "ctr images pull" in proc.stderr
    assert st.ctd.ctr("images", "ls", "-q").stdout.split() == []
    assert st.ctd.ctr("snapshots", "--snapshotter", "remora", "ls").stdout.splitlines()[1:] == []
    proc = st.pull(busybox.ref, "--snapshotter", "nosuch", check=False)
    assert proc.returncode == 2 and "no snapshotter named 'nosuch'" in proc.stderr, proc.stderr


# -- (5) registry gone: clear errors in bounded time --------------------------------------------------
def test_registry_down_fails_fast(stacks, tmp_path):
    gone = LocalRegistry(root=tmp_path / "gone-registry").start()
    try:
        ref = f"{gone.host}/gone/busybox:1"
        busybox_image(ref)
        image = _convert(gone, ref)
        st = stacks()
        st.pull(image.ref)
    finally:
        gone.stop()
    # Pulled while it was up, the data was never fetched: running now must fail, not hang.
    t0 = time.monotonic()
    proc = st.run(image.ref, "echo", "unreachable", check=False, timeout=150)
    assert proc.returncode != 0 and "unreachable" not in proc.stdout
    assert "input/output error" in proc.stderr, proc.stderr  # EIO from the lazy fs, not a hang
    assert time.monotonic() - t0 < 90
    # Pulling with the registry stopped: exit code 6 (registry error) naming the registry.
    t0 = time.monotonic()
    proc = st.pull(image.ref, check=False, timeout=120)
    assert proc.returncode == 6, proc.stderr
    assert gone.host in proc.stderr
    assert time.monotonic() - t0 < 60
    # And a missing containerd socket is a usage error that says so.
    proc = subprocess.run([sys.executable, "-m", "remora.cli", "pull", "--address", str(tmp_path / "nope.sock"),
                           image.ref], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "containerd" in proc.stderr


# -- (6) snapshotter restart under a running container ------------------------------------------------
def _mount_pids(st: Stack) -> dict[str, str]:
    """``{mount id: "pid start-time"}`` of the lazy mounts' fs processes, as recorded."""
    return {p.name[:-4]: p.read_text() for p in (st.snap.root / "lazy" / "mounts").glob("*.pid")}


def _running(pid_record: str) -> bool:
    pid, start = pid_record.split()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == start


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_snapshotter_restart_keeps_containers(stacks, reg, python_image, how):
    """A graceful stop and a crash (kill -9, no cleanup at all) alike: the running container keeps its
    lazily mounted root fs, the restarted snapshotter adopts the mounts (same fs processes), lists the
    same snapshots, serves new containers, and its records are consistent (`remora stats`: all ok)."""
    st = stacks()
    st.pull(python_image.ref)
    cid = f"long-{uuid.uuid4().hex[:6]}"
    st.ctd.ctr("run", "-d", "--snapshotter", "remora", python_image.ref, cid, "sleep", "300")
    snapshots = st.ctd.ctr("snapshots", "--snapshotter", "remora", "ls").stdout
    mounts = _mount_pids(st)
    assert mounts and all(_running(r) for r in mounts.values())
    snap_pid = st.snap.daemon.pid
    if how == "sigkill":
        st.snap.kill()  # crash: no shutdown code runs, the socket file stays behind
    else:
        st.snap.stop()  # SIGTERM
    assert all(_running(r) for r in mounts.values()), "the fs processes outlive their snapshotter"
    st.snap.start()
    assert st.snap.daemon.pid != snap_pid
    # The running container's root fs still serves files it never read before (lazy fetch after restart).
    out = st.ctd.ctr("tasks", "exec", "--exec-id", "e1", cid, "python3", "-c",
                     "import email.parser, http.client; print('still here')").stdout
    assert out == "still here\n"
    assert _mount_pids(st) == mounts, "the restarted snapshotter adopted the mounts, not re-mounted them"
    # containerd reconnects to the restarted snapshotter (with backoff): a new container starts.
    result: list[subprocess.CompletedProcess] = []

    def new_container_runs() -> bool:
        result[:] = [st.run(python_image.ref, *PY_WORKLOAD, check=False)]
        return result[0].returncode == 0

    try:
        wait_until(new_container_runs, 30, interval=0.5, what="a new container on the restarted snapshotter")
    except TimeoutError:
        pass
    assert result and result[0].stdout == "1\n", (result[0].stderr if result else "") + st.snap_log()
    assert st.ctd.ctr("snapshots", "--snapshotter", "remora", "ls").stdout == snapshots
    stats = subprocess.run([sys.executable, "-m", "remora.cli", "stats", "--root", str(st.snap.root), "--json"],
                           capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    states = {m["id"]: m["state"] for m in json.loads(stats.stdout)["mounts"]}
    assert states == dict.fromkeys(mounts, "ok"), states


# -- (7) containerd 2.1 Transfer pull -----------------------------------------------------------------
def _containerd2():
    from remora.errors import NotFound
    from remora_testing.containerd_v2 import PrivateContainerd2, containerd2_bin_dir

    try:
        containerd2_bin_dir()
    except NotFound as exc:
        pytest.fail(f"{exc}")
    return PrivateContainerd2


def test_containerd2_transfer_pull_is_lazy(stacks, reg, python_image):
    st = stacks("c2", containerd_cls=_containerd2())
    mark = reg.mark()
    st.ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "remora", python_image.ref, timeout=180)
    served = reg.blob_gets(mark)
    assert not set(served) & set(python_image.blobs), f"containerd 2.1 downloaded layers: {served}"
    assert st.run(python_image.ref, *PY_WORKLOAD).stdout == "1\n"
    _assert_lazy(reg, mark, python_image, 1 / 3)


# -- (8) Docker on containerd 2.1 ---------------------------------------------------------------------
def test_docker_pull_and_run_is_lazy(stacks, reg, python_image, tmp_path):
    from remora_testing.docker import PrivateDocker

    st = stacks("dk", containerd_cls=_containerd2())
    mark = reg.mark()
    with PrivateDocker(tmp_path / "docker", st.ctd.address, snapshotter="remora",
                       insecure_registries=[reg.host]) as dk:
        st.namespaces.append(dk.namespace)
        docker = dk.client()
        docker.pull(python_image.ref, quiet=True)
        served = reg.blob_gets(mark)
        assert not set(served) & set(python_image.blobs), f"docker pull downloaded layers: {served}"
        out = docker.run(python_image.ref, PY_WORKLOAD, remove=True)
        assert out.strip() == "1"
        _assert_lazy(reg, mark, python_image, 1 / 3)
        docker.image.remove(python_image.ref, force=True)
