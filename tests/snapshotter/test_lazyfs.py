"""The lazy filesystem end to end: real FUSE mounts in their own processes, a real registry.

Metadata must come from the bootstrap alone (counted by a loopback proxy in front of the registry),
data must be byte-exact and verified, failures must surface as EIO quickly, and a dead fs process must
be detected and re-mounted. Every mount is torn down at the end, even when a test fails.
"""
from __future__ import annotations

import errno
import os
import signal
import stat
import time

import pytest
from lazy_support import CountingProxy, build_image, dead_port_url

from remora.cache import ChunkCache
from remora.errors import InvalidInput, StorageError
from remora.procutil import wait_until
from remora.snapshotter.mount import MountManager, detach, mounted_fstype
from remora.snapshotter.sources import SourceSpec


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    return build_image(tmp_path_factory.mktemp("lazyfs-image"), registry.host)


@pytest.fixture
def manager(tmp_path):
    mm = MountManager(tmp_path / "state", tmp_path / "cache", mount_timeout=30)
    yield mm
    mm.unmount_all()
    for mnt in tmp_path.glob("mnt*"):  # belt and braces: nothing stays mounted after a failure
        detach(mnt)
        assert mounted_fstype(mnt) is None


def source(url: str, repo: str, **kw) -> SourceSpec:
    return SourceSpec.registry(url.split("://", 1)[1], repo, retries=0, **kw)


def mount(manager, image, tmp_path, url, name="m1", **kw):
    kw.setdefault("prefetch", False)
    spec = manager.mount(name, image.bootstrap, tmp_path / f"mnt-{name}", [source(url, image.repo,
                         read_timeout=kw.pop("read_timeout", 5.0))], stats_interval=0.2, **kw)
    return spec.mountpoint


def host_path(mnt: str, path: bytes) -> bytes:
    return os.fsencode(mnt) + path


def published(manager, mount_id, key, section="fetch"):
    """A counter as the fs process publishes it, from a write made after this call."""
    since = time.time()
    wait_until(lambda: manager.stats(mount_id).get("time", 0) > since, 5, what="fresh stats file")
    return manager.stats(mount_id).get(section, {}).get(key)


def test_metadata_from_bootstrap_only_then_data_byte_exact(manager, image, proxy, tmp_path):
    mnt = mount(manager, image, tmp_path, proxy.url)
    seen = set()
    for path, node in image.tree.walk():
        p = host_path(mnt, path if path != b"/" else b"")
        st = os.lstat(p)
        seen.add(path)
        assert (st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid) == \
               (node.ino, node.mode, node.nlink, node.uid, node.gid), path
        if not stat.S_ISDIR(node.mode):
            assert st.st_size == node.size and st.st_mtime_ns == node.mtime_ns, path
        if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
            assert st.st_rdev == node.rdev
        if stat.S_ISLNK(node.mode):
            assert os.readlink(p) == node.target
        else:
            assert sorted(os.listxattr(p)) == sorted(node.xattrs)
            for k, v in node.xattrs.items():
                assert os.getxattr(p, k) == v
        if node.children is not None:
            assert sorted(os.listdir(p)) == sorted(node.children)
    found = set()
    for dirpath, dirnames, filenames in os.walk(os.fsencode(mnt)):
        for n in dirnames + filenames:
            found.add(os.path.join(dirpath, n)[len(os.fsencode(mnt)):])
    assert found | {b"/"} == seen
    assert os.stat(host_path(mnt, b"/bin/big")).st_ino == os.stat(host_path(mnt, b"/bin/hardlink-to-big")).st_ino
    with pytest.raises(OSError) as exc:
        os.getxattr(host_path(mnt, b"/etc/hot.conf"), "user.missing")
    assert exc.value.errno == errno.ENODATA
    with pytest.raises(OSError) as exc:
        open(host_path(mnt, b"/etc/hot.conf"), "ab")
    assert exc.value.errno == errno.EROFS
    dev = os.stat(mnt).st_dev
    bdi = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    assert open(bdi).read().strip() == "1024", "sequential reads reach the daemon in 1 MiB requests"
    assert proxy.blob_requests() == [], "metadata must never touch the network"
    assert published(manager, "m1", "requests") == 0

    for path, data in image.contents.items():
        with open(host_path(mnt, path), "rb") as f:
            assert f.read() == data, path
    assert published(manager, "m1", "chunks_verified") == len(image.table.chunks)
    ops = manager.stats("m1")["ops"]
    assert sum(ops["read"]["counts"]) > 0 and sum(ops["getattr"]["counts"]) > 0
    # open answered ENOSYS once; the kernel has opened every other file by itself since
    assert sum(ops["open"]["counts"]) == 1 and "release" not in ops, ops.keys()


def test_image_without_xattrs_makes_the_kernel_stop_asking(manager, registry, tmp_path):
    """Overlayfs asks a lower layer for trusted.overlay.* on every lookup and exec asks for
    security.capability; the kernel caches none of it. An image without any xattr answers ENOSYS
    once, after which the kernel answers EOPNOTSUPP itself: one round trip, not one per lookup."""
    plain = build_image(tmp_path / "img", registry.host, n_small=5, xattrs=False)
    mnt = mount(manager, plain, tmp_path, registry.url, name="nox")
    for path in (b"/etc/hot.conf", b"/etc/small000.txt", b"/bin/big", b"/etc"):
        for name in ("trusted.overlay.opaque", "security.capability", "user.x"):
            with pytest.raises(OSError) as exc:
                os.getxattr(host_path(mnt, path), name)
            assert exc.value.errno == errno.EOPNOTSUPP
        assert os.listxattr(host_path(mnt, path)) == []
    with open(host_path(mnt, b"/etc/hot.conf"), "rb") as f:
        assert f.read() == plain.contents[b"/etc/hot.conf"]
    assert sum(published(manager, "nox", "getxattr", section="ops")["counts"]) == 1


def test_reading_one_small_file_fetches_about_one_frame(manager, image, proxy, tmp_path):
    mnt = mount(manager, image, tmp_path, proxy.url)
    with open(host_path(mnt, b"/etc/small002.txt"), "rb") as f:
        assert f.read() == image.contents[b"/etc/small002.txt"]
    assert len(proxy.blob_requests()) == 1
    largest_frame = max(fr.csize for fr in image.table.frames)
    assert proxy.bytes <= largest_frame
    # the other small files of that frame came with it: reading them costs nothing more
    for i in range(60):
        with open(host_path(mnt, b"/etc/small%03d.txt" % i), "rb") as f:
            assert f.read() == image.contents[b"/etc/small%03d.txt" % i]
    small_frames = {c.frame for c in image.table.chunks if c.size < 10_000}
    assert len(proxy.blob_requests()) <= len(small_frames) < 20


def test_corrupted_cache_entry_is_refetched_through_the_mount(manager, image, proxy, tmp_path):
    mnt = mount(manager, image, tmp_path, proxy.url)
    target = b"/data/deep/er/file"
    with open(host_path(mnt, target), "rb") as f:
        assert f.read() == image.contents[target]
    manager.unmount("m1")
    cache = ChunkCache(tmp_path / "cache")
    digest = image.tree.lookup(target).chunks[0].digest
    cache.path(digest).write_bytes(b"\0" * len(image.contents[target]))
    proxy.reset()
    mnt = mount(manager, image, tmp_path, proxy.url)
    with open(host_path(mnt, target), "rb") as f:
        assert f.read() == image.contents[target]
    assert published(manager, "m1", "cache_corrupt", "cache") == 1
    assert len(proxy.blob_requests()) == 1
    wait_until(lambda: cache.get(digest) == image.contents[target], 5, what="refetched chunk cached")


def test_registry_returning_wrong_bytes_gives_eio_and_caches_nothing(manager, image, registry, tmp_path):
    with CountingProxy(registry.url, mode="flip") as liar:
        mnt = mount(manager, image, tmp_path, liar.url)
        with pytest.raises(OSError) as exc:
            with open(host_path(mnt, b"/etc/hot.conf"), "rb") as f:
                f.read()
        assert exc.value.errno == errno.EIO
        assert ChunkCache(tmp_path / "cache").info()["chunks"] == 0
        assert published(manager, "m1", "verify_failures") >= 1
        assert "digest mismatch" in manager.log_tail("m1") or "corrupt zstd" in manager.log_tail("m1")


@pytest.mark.parametrize("mode", ["down", "stall"])
def test_unreachable_registry_gives_eio_fast(manager, image, registry, tmp_path, mode):
    with CountingProxy(registry.url, mode="stall") as stall:
        url = dead_port_url() if mode == "down" else stall.url
        mnt = mount(manager, image, tmp_path, url, read_timeout=1.0)
        assert os.path.getsize(host_path(mnt, b"/bin/big")) == len(image.contents[b"/bin/big"])
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            with open(host_path(mnt, b"/bin/big"), "rb") as f:
                f.read(4096)
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - t0 < 6
        assert manager.check("m1").ok, "a failed read does not take the mount down"


def all_threads_stopped(pid: int) -> bool:
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:  # a thread that just exited
            continue
    return bool(states) and all(state in "tT" for state in states)


def test_dead_and_hung_fs_process_are_detected_and_restored(manager, image, proxy, tmp_path):
    mnt = mount(manager, image, tmp_path, proxy.url)
    assert manager.check("m1").ok
    pid = manager.pid("m1")

    os.kill(pid, signal.SIGSTOP)
    try:
        # kill() returns before the stop reaches every thread; a worker that has not stopped yet can
        # still answer the probe (seen in CI on a loaded machine)
        wait_until(lambda: all_threads_stopped(pid), 5, what="fs process stopped")
        t0 = time.monotonic()
        health = manager.check("m1", timeout=1.0)
        assert health.state == "hung" and time.monotonic() - t0 < 2.5
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: manager.check("m1").ok, 5, what="mount answering again")

    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    wait_until(lambda: manager.check("m1", timeout=1.0).state == "dead", 3, what="dead mount detected")
    assert time.monotonic() - t0 < 3
    with pytest.raises(OSError) as exc:
        os.stat(host_path(mnt, b"/etc/never-looked-up"))
    assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)

    restarted = MountManager(tmp_path / "state", tmp_path / "cache")  # a snapshotter restart
    assert restarted.restore() == {"m1": "remounted"}
    assert restarted.check("m1").ok and restarted.pid("m1") != pid
    with open(host_path(mnt, b"/etc/hot.conf"), "rb") as f:
        assert f.read() == image.contents[b"/etc/hot.conf"]
    assert MountManager(tmp_path / "state", tmp_path / "cache").restore() == {"m1": "adopted"}
    restarted.unmount("m1")
    assert mounted_fstype(mnt) is None and restarted.ids() == []
    assert ChunkCache(tmp_path / "cache").owners() == [], "unmount drops the mount's pins"


def test_prefetch_and_prometheus_metrics(manager, image, proxy, tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    mnt = mount(manager, image, tmp_path, proxy.url, prefetch=True, prefetch_all=True)
    wait_until(lambda: (manager.stats("m1").get("fetch") or {}).get("prefetch_done") == 1, 15, what="prefetch")
    assert sorted(os.listdir(mnt)) == sorted(n.decode() for n in image.tree.root.children)
    with pytest.raises(InvalidInput, match="already used by mount m1"):
        manager.mount("m2", image.bootstrap, mnt, [source(proxy.url, image.repo)])
    assert manager.check("m1").ok
    wait_until(lambda: "getattr" in manager.stats("m1").get("ops", {}), 5, what="op latencies published")
    cache = ChunkCache(tmp_path / "cache")
    assert cache.info()["chunks"] == len(image.table.chunks)
    # the pins follow the prefetch (off the cold start's critical path)
    wait_until(lambda: cache.info()["pinned_chunks"] == len(image.table.chunks), 10, what="pins")
    assert cache.owners() == ["m1"]
    reg = CollectorRegistry()
    reg.register(manager.collector(cache))
    text = generate_latest(reg).decode()
    assert 'remora_mount_up{mount="m1"} 1.0' in text
    assert 'remora_prefetch_complete{mount="m1"} 1.0' in text
    requests = [line for line in text.splitlines() if line.startswith('remora_fetch_requests_total{mount="m1"}')]
    assert requests and float(requests[0].split()[-1]) == len(proxy.blob_requests()) >= 1
    assert "remora_fuse_op_seconds_bucket" in text and "remora_cache_bytes" in text

    busy = open(os.path.join(mnt, "etc", "hot.conf"), "rb")  # a container still holding a file
    try:
        pid = manager.pid("m1")
        t0 = time.monotonic()
        manager.unmount("m1")
        assert time.monotonic() - t0 < 8
        assert mounted_fstype(mnt) is None and not os.path.exists(f"/proc/{pid}")
    finally:
        busy.close()


def test_a_mount_that_cannot_start_reports_why_and_leaves_nothing(manager, image, tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="not a remora bootstrap|not a database"):
        manager.mount("bad", bad, tmp_path / "mnt-bad", [source("http://127.0.0.1:1", image.repo)])
    assert manager.ids() == [] and mounted_fstype(tmp_path / "mnt-bad") is None


def test_prefetch_paths_are_looked_up_before_the_container_asks(manager, registry, proxy, tmp_path):
    """After the mount, the fs process looks every prefetch path up once itself: the kernel then
    answers a container's lookups of those paths without a round trip (metadata only, no data)."""
    hot = (b"/etc/hot.conf", b"/etc/small003.txt", b"/bin/big")
    image = build_image(tmp_path / "img", registry.host, n_small=8, prefetch_paths=hot)
    mnt = mount(manager, image, tmp_path, proxy.url, prefetch=True)
    wait_until(lambda: (manager.stats("m1").get("fetch") or {}).get("prefetch_lookups") == len(hot), 10,
               what="the lookup warm-up")

    def lookups() -> int:
        return sum(published(manager, "m1", "getattr", section="ops")["counts"])

    before = lookups()
    for path in hot:
        st = os.lstat(host_path(mnt, path))
        assert st.st_size == len(image.contents[path])
    assert lookups() == before, "the kernel answered from the entries the warm-up left"
    os.lstat(host_path(mnt, b"/etc/small005.txt"))  # not a prefetch file: a real lookup
    assert lookups() > before
