"""A bootstrap the snapshotter has not validated is validated by its fs process, before the mount.

The snapshotter hands a freshly fetched bootstrap to the (warm spare) fs process with
``validate_bootstrap``: that process runs remora.format.validate on it before it opens the file, so
no byte is served from a bootstrap that was not validated, and a hostile one is refused with the
validator's own InvalidInput (what the Prepare reports) without anything ever mounted.
"""
from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path

import pytest
from lazy_support import build_image

from remora.errors import InvalidInput
from remora.procutil import wait_until
from remora.snapshotter.mount import FSTYPE, MountManager, detach, mounted_fstype
from remora.snapshotter.sources import SourceSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "format"))
from bootstrap_craft import edit

HOSTILE_META = ("CREATE VIEW meta(key, value) AS WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
                "SELECT 'format_version', n FROM r")


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    return build_image(tmp_path_factory.mktemp("validate-image"), registry.host, n_small=4)


@pytest.fixture
def standby(tmp_path):
    mm = MountManager(tmp_path / "state", tmp_path / "cache", mount_timeout=30, standby=True)
    yield mm
    mm.close()
    mm.unmount_all()
    for mnt in tmp_path.glob("mnt*"):
        detach(mnt)
        assert mounted_fstype(mnt) is None


class MountWatch:
    """Samples the mountpoint's fstype while a mount is attempted: what was ever mounted there."""

    def __init__(self, mnt: Path):
        self.mnt, self.seen, self._stop = mnt, set(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.add(mounted_fstype(self.mnt))
            self._stop.wait(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self.seen.add(mounted_fstype(self.mnt))


def test_hostile_bootstrap_is_refused_by_the_fs_process_before_any_mount(standby, image, registry, tmp_path):
    hostile = tmp_path / "hostile.db"
    shutil.copy(image.bootstrap, hostile)
    edit(hostile, "DROP TABLE meta", HOSTILE_META)
    spare = standby._spare[0].pid if standby._spare else None
    mnt = tmp_path / "mnt-hostile"
    with MountWatch(mnt) as watch, pytest.raises(InvalidInput, match="schema is not remora's: unexpected view meta"):
        standby.mount("bad", hostile, mnt, [SourceSpec.registry(registry.host, image.repo, retries=0)],
                      prefetch=False, validate_bootstrap=True)
    assert FSTYPE not in watch.seen, "nothing was ever mounted from the unvalidated bootstrap"
    assert "bad" not in standby.ids(), "a refused mount is not kept (nor restored later)"
    assert spare is None or standby.pid("bad") is None
    # the same manager (and its next spare) still mounts a valid bootstrap, validating it first
    good = standby.mount("good", image.bootstrap, tmp_path / "mnt-good",
                         [SourceSpec.registry(registry.host, image.repo, retries=0)], prefetch=False,
                         validate_bootstrap=True)
    log = standby.log_tail("good", 200)
    assert "validated in" in log and log.index("validated in") < log.index("mounting"), log
    with open(Path(good.mountpoint) / "etc" / "hot.conf", "rb") as f:
        assert f.read() == image.contents[b"/etc/hot.conf"]


def test_without_the_flag_the_fs_process_does_not_validate_again(standby, image, registry, tmp_path):
    """A bootstrap the snapshotter already knows valid costs the mount no second validation."""
    standby.mount("known", image.bootstrap, tmp_path / "mnt-known",
                  [SourceSpec.registry(registry.host, image.repo, retries=0)], prefetch=False)
    assert "validated in" not in standby.log_tail("known", 200)
    assert not standby._file("known", ".validation").exists()


def test_early_validation_by_the_spare_counts_only_for_the_same_file(standby, image, registry, tmp_path):
    """The spare validates a bootstrap as soon as the snapshotter has it (prevalidate); if the file
    is another one by the time the mount comes (here: a hostile file renamed over it), the mount
    validates again and refuses it: an early verdict never vouches for other bytes."""
    path = tmp_path / "boot.db"
    shutil.copy(image.bootstrap, path)
    wait_until(lambda: standby.wait_spare(0.5), 30, what="a ready spare")
    assert standby.prevalidate(path), "the spare took the early validation"
    spare = standby._spare[0].pid
    hostile = tmp_path / "hostile.db"
    shutil.copy(image.bootstrap, hostile)
    edit(hostile, "DROP TABLE meta", HOSTILE_META)
    hostile.replace(path)
    mnt = tmp_path / "mnt-swapped"
    with MountWatch(mnt) as watch, pytest.raises(InvalidInput, match="schema is not remora's: unexpected view meta"):
        standby.mount("swapped", path, mnt, [SourceSpec.registry(registry.host, image.repo, retries=0)],
                      prefetch=False, validate_bootstrap=True)
    assert FSTYPE not in watch.seen

    # and the early verdict is used when the file is the one it validated
    wait_until(lambda: standby._spare is not None and standby._spare[0].pid != spare and standby.wait_spare(0.5), 60,
               what="the next spare")
    good = tmp_path / "good.db"
    shutil.copy(image.bootstrap, good)
    assert standby.prevalidate(good)
    spare = standby._spare[0].pid
    standby.mount("early", good, tmp_path / "mnt-early", [SourceSpec.registry(registry.host, image.repo, retries=0)],
                  prefetch=False, validate_bootstrap=True)
    assert standby.pid("early") == spare
    log = standby.log_tail("early", 200)
    assert "before its mount was asked for" in log and log.index("validated in") < log.index("mounting"), log
