"""The warm spare fs process: a mount is handed to a process that has already paid for its imports.

What must hold: the mount is served by the spare (same bytes, same checks as a cold start), a new
spare replaces it, a spare never outlives its snapshotter (EOF on its stdin), a restarted manager
adopts spare-started mounts by pid + start time, and a recycled pid is neither adopted nor killed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from lazy_support import build_image

from remora.errors import InvalidInput
from remora.procutil import wait_until
from remora.snapshotter.mount import MountManager, detach, mounted_fstype
from remora.snapshotter.sources import SourceSpec


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    return build_image(tmp_path_factory.mktemp("standby-image"), registry.host, n_small=8)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _spare_pid(mm: MountManager) -> int:
    wait_until(lambda: mm._spare is not None and mm._spare[0].poll() is None, 10, what="a spare fs process")
    return mm._spare[0].pid


@pytest.fixture
def standby(tmp_path):
    """One spare: the hand-over and succession, step by step (the pool of two: test_two_mounts_...)."""
    mm = MountManager(tmp_path / "state", tmp_path / "cache", mount_timeout=30, standby=True, spares=1)
    yield mm
    mm.close()
    mm.unmount_all()
    for mnt in tmp_path.glob("mnt*"):
        detach(mnt)
        assert mounted_fstype(mnt) is None


def _mount(mm, image, tmp_path, registry, name="m1"):
    return mm.mount(name, image.bootstrap, tmp_path / f"mnt-{name}",
                    [SourceSpec.registry(registry.host, image.repo, retries=0)], prefetch=False).mountpoint


def test_mount_is_served_by_the_spare_and_a_new_spare_follows(standby, image, registry, tmp_path):
    spare = _spare_pid(standby)
    wait_until(lambda: b"remora.snapshotter.fs --standby" in _cmdline(spare), 10, what="the spare's command line")
    mnt = _mount(standby, image, tmp_path, registry)
    assert standby.pid("m1") == spare, "the warm spare took the mount"
    policies = {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{spare}/task")}
    assert policies == {os.SCHED_OTHER}, "a spare that took a mount runs (every thread) at normal priority"
    for path in (b"/etc/hot.conf", b"/bin/big", b"/etc/small003.txt"):
        with open(os.fsencode(mnt) + path, "rb") as f:
            assert f.read() == image.contents[path], path
    assert "mounting" in standby.log_tail("m1"), "the spare's log became the mount's log"
    successor = _spare_pid(standby)
    assert successor != spare
    assert os.sched_getscheduler(successor) == os.SCHED_IDLE, "a successor imports on idle cycles only"

    mnt2 = _mount(standby, image, tmp_path, registry, name="m2")
    assert standby.pid("m2") == successor
    with open(os.fsencode(mnt2) + b"/etc/hot.conf", "rb") as f:
        assert f.read() == image.contents[b"/etc/hot.conf"]

    # a snapshotter restart adopts both (pid + start time recorded), and the spare goes with close()
    last = _spare_pid(standby)
    standby.close()
    wait_until(lambda: not _alive(last), 10, what="the spare to exit on close")
    restarted = MountManager(tmp_path / "state", tmp_path / "cache")
    assert restarted.restore() == {"m1": "adopted", "m2": "adopted"}
    assert _alive(spare) and _alive(successor), "closing the manager never stops mounts"


def test_in_a_burst_the_successor_imports_at_normal_priority(standby, image, registry, tmp_path):
    """A mount announced (prevalidate: an image's warm-up has its bootstrap) marks a burst: the successor
    of the spare that takes it starts at normal priority, so that the next function placed on this node
    finds it ready on a busy machine instead of one still waiting for idle cycles."""
    spare = _spare_pid(standby)
    assert standby.prevalidate(image.bootstrap)
    assert standby.in_burst()
    _mount(standby, image, tmp_path, registry)
    assert standby.pid("m1") == spare
    successor = _spare_pid(standby)
    assert successor != spare
    assert os.sched_getscheduler(successor) == os.SCHED_OTHER, "a burst's successor must not wait for idle CPU"
    assert standby.wait_spare(20), "the successor finished its imports"


def test_two_mounts_at_once_both_find_a_warm_spare(image, registry, tmp_path):
    """The default pool of two: two functions placed on one node start together, and both mounts are
    served by processes that had done their imports before the mounts were asked for (none waits for a
    fresh interpreter); the keeper then brings the pool back to two."""
    import threading

    mm = MountManager(tmp_path / "state", tmp_path / "cache", mount_timeout=30, standby=True)
    try:
        assert mm.spares_wanted == 2
        wait_until(lambda: len([sp for sp in mm._spares if sp.proc.poll() is None]) == 2, 20, what="two spares")
        assert mm.wait_spare(30)
        wait_until(lambda: all(sp.is_ready() for sp in mm._spares), 30, what="both spares' imports")
        before = {sp.proc.pid for sp in mm._spares}
        assert mm.prevalidate(image.bootstrap) and mm.prevalidate(image.bootstrap)
        assert sorted(sp.announced for sp in mm._spares) == [1, 1], "a burst's announcements go to different spares"
        errors: list[BaseException] = []

        def mount(name: str) -> None:
            try:
                _mount(mm, image, tmp_path, registry, name=name)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=mount, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert {mm.pid("a"), mm.pid("b")} == before, "both mounts were taken by the spares started before them"
        for name in ("a", "b"):
            with open(os.fsencode(tmp_path / f"mnt-{name}") + b"/etc/hot.conf", "rb") as f:
                assert f.read() == image.contents[b"/etc/hot.conf"]
        wait_until(lambda: len([sp for sp in mm._spares if sp.proc.poll() is None]) == 2, 20,
                   what="the pool refilled")
        assert not before & {sp.proc.pid for sp in mm._spares}
    finally:
        mm.close()
        mm.unmount_all()
        for mnt in tmp_path.glob("mnt*"):
            detach(mnt)


def test_spare_count_is_checked():
    with pytest.raises(InvalidInput, match="spare fs processes: 0"):
        MountManager("/nonexistent/state", "/nonexistent/cache", standby=True, spares=0)


def test_spare_exits_when_its_snapshotter_dies(tmp_path):
    """The spare's stdin is a pipe from the snapshotter: if the snapshotter dies, EOF ends the spare."""
    code = ("import os, sys\n"
            "from remora.snapshotter.mount import MountManager\n"
            f"mm = MountManager({str(tmp_path / 'state')!r}, {str(tmp_path / 'cache')!r}, standby=True)\n"
            "print(mm._spare[0].pid, flush=True)\n"
            "os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    spare = int(out.stdout.split()[0])
    wait_until(lambda: not _alive(spare), 20, what="the orphaned spare to exit")


def test_recycled_pid_is_not_adopted_nor_killed(standby, image, registry, tmp_path):
    mnt = _mount(standby, image, tmp_path, registry)
    real = standby.pid("m1")
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        # the record now names a live process that is not the mount's (as after pid reuse)
        start_time = Path(f"/proc/{real}/stat").read_text().rsplit(")", 1)[1].split()[19]
        (tmp_path / "state" / "mounts" / "m1.pid").write_text(f"{stranger.pid} {start_time}")
        restarted = MountManager(tmp_path / "state", tmp_path / "cache")
        assert restarted.check("m1").state == "dead"
        # it is re-mounted (the old process is told to go by the unmount it gets), never the stranger killed
        assert restarted.restore() == {"m1": "remounted"}
        assert stranger.poll() is None, "an unrelated process with a recycled pid was signalled"
        assert restarted.check("m1").ok and restarted.pid("m1") not in (real, stranger.pid)
        with open(os.fsencode(mnt) + b"/etc/hot.conf", "rb") as f:
            assert f.read() == image.contents[b"/etc/hot.conf"]
        restarted.unmount("m1")
    finally:
        stranger.kill()
        stranger.wait()
    wait_until(lambda: not _alive(real), 10, what="the displaced fs process to exit")


def test_remount_after_a_crash_keeps_the_dead_process_log(standby, image, registry, tmp_path):
    """A restore re-mounts cold, appending to the mount's log: why the old process died stays there."""
    import signal

    mnt = _mount(standby, image, tmp_path, registry)
    dead = standby.pid("m1")
    os.kill(dead, signal.SIGKILL)
    wait_until(lambda: standby.check("m1", timeout=1.0).state == "dead", 10, what="the dead mount")
    assert standby.restore_mount("m1") == "remounted"
    assert standby.pid("m1") != dead
    log_text = (tmp_path / "state" / "mounts" / "m1.log").read_text()
    assert log_text.count("mounting ") == 2, log_text
    with open(os.fsencode(mnt) + b"/etc/hot.conf", "rb") as f:
        assert f.read() == image.contents[b"/etc/hot.conf"]


# -- the spare is the snapshotter's: readers leave it alone, and a dead one is replaced ---------------
def _spares_of(parent: int) -> list[int]:
    """Live ``--standby`` fs processes whose parent is ``parent`` (a snapshotter)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"--standby" in _cmdline(int(entry)) and _alive(int(entry)):
            out.append(int(entry))
    return out


def _the_spares(parent: int, count: int = 2) -> list[int]:
    """The snapshotter's warm spares once there are ``count`` (its default --fs-spares is 2)."""
    found: list[int] = []

    def ready() -> bool:
        found[:] = sorted(_spares_of(parent))
        return len(found) == count

    wait_until(ready, 20, what=f"{count} spare fs processes of the snapshotter")
    return found


def test_stats_leaves_the_spares_alone_and_a_dead_spare_is_replaced(snapshotter_proc):
    snap = snapshotter_proc
    spares = _the_spares(snap.daemon.pid)
    logs = sorted((snap.root / "lazy" / "mounts").glob("spare-*.log"))
    assert len(logs) == 2
    for args in (["--json"], []):
        proc = subprocess.run(["remora", "stats", "--root", str(snap.root), *args], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    assert all(_alive(p) for p in spares) and all(log.exists() for log in logs), \
        "remora stats touched the snapshotter's warm spares"
    assert sorted(_spares_of(snap.daemon.pid)) == spares

    spare = spares[0]
    os.kill(spare, 9)  # the OOM killer, an operator, a crash: the snapshotter starts another
    wait_until(lambda: len(_spares_of(snap.daemon.pid)) == 2 and spare not in _spares_of(snap.daemon.pid), 20,
               what="a successor of the killed spare")
    now = sorted((snap.root / "lazy" / "mounts").glob("spare-*.log"))
    assert len(now) == 2 and spares[1] in _spares_of(snap.daemon.pid), "the other spare stays"
    wait_until(lambda: f"spare fs process {spare} exited" in snap.log_path.read_text(), 10,
               what="the snapshotter to log the dead spare")


@pytest.mark.parametrize("kind", ["missing", "not-a-snapshotter-root"])
def test_stats_on_a_wrong_root_is_an_error_and_creates_nothing(tmp_path, kind):
    root = tmp_path / "nope"
    if kind == "not-a-snapshotter-root":
        root.mkdir()
        (root / "data.txt").write_text("x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = subprocess.run(["remora", "stats", "--root", str(root)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5, (proc.returncode, proc.stderr)
    assert str(root) in proc.stderr and "--root" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "stats created files"


def test_a_spare_that_keeps_dying_is_restarted_with_a_growing_backoff(tmp_path, caplog):
    """A broken interpreter: every spare exits at once. The manager keeps trying, but not in a tight
    loop: the wait between attempts doubles, and the spare's last words are logged."""
    import logging

    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'spare cannot start: broken install' >&2\nexit 9\n")
    broken.chmod(0o755)
    caplog.set_level(logging.WARNING, logger="remora.snapshotter.mount")
    mm = MountManager(tmp_path / "state", tmp_path / "cache", standby=True, python=str(broken))
    try:
        wait_until(lambda: "starting another in 2.0s" in caplog.text, 20, what="the backoff to reach 2 s")
        assert "broken install" in caplog.text and "code 9" in caplog.text
        assert "starting another in 4.0s" not in caplog.text
    finally:
        mm.close()


def test_wait_spare_returns_once_the_spare_has_its_imports(standby, tmp_path):
    """The snapshotter says it is ready only when a first pull finds everything warm: wait_spare()
    returns True once the spare has loaded the FUSE library (libfuse mapped into it) and created the
    chunk cache's index on this fresh node, not merely once the process exists."""
    pid = _spare_pid(standby)
    assert standby.wait_spare(30) is True
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libfuse" in maps, "wait_spare returned before the spare had loaded libfuse"
    assert (tmp_path / "cache" / "index.db").is_file(), "the first mount would create the cache index"
    assert standby.wait_spare(0.1) is True  # already ready: at once


def test_wait_spare_is_false_when_the_spare_dies_before_its_imports(tmp_path):
    """A spare that cannot import (here: a python that exits at once) is reported, not waited for."""
    mm = MountManager(tmp_path / "state", tmp_path / "cache", standby=True, python="/bin/false")
    try:
        assert mm.wait_spare(10) is False
    finally:
        mm.close()
