"""The work-dir sweep removes only dead remora work dirs: locked, lock-less, foreign and symlinked
entries of a shared temp dir are left alone."""
from __future__ import annotations

import fcntl
import os

from remora.converter.workdir import LOCK_NAME, sweep, work_dir


def _dir(root, name, lock: bool):
    d = root / name
    d.mkdir()
    (d / "blob").write_bytes(b"x" * 100)
    if lock:
        (d / LOCK_NAME).write_text("1\n")
    return d


def test_sweep_takes_only_dead_work_dirs(tmp_path):
    dead = _dir(tmp_path, "remora-convert-dead", lock=True)
    live = _dir(tmp_path, "remora-unpack-live", lock=True)
    nolock = _dir(tmp_path, "remora-convert-nolock", lock=False)
    foreign = _dir(tmp_path, "remora-registry-abc", lock=True)       # not a kind of ours
    target = _dir(tmp_path, "elsewhere", lock=True)
    (tmp_path / "remora-check-link").symlink_to(target)
    fd = os.open(live / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)          # flock is per open file: this holds it like a live owner
    try:
        removed = sweep(tmp_path)
    finally:
        os.close(fd)
    assert removed == [dead] and not dead.exists()
    for kept in (live, nolock, foreign, target):
        assert (kept / "blob").exists()
    assert (tmp_path / "remora-check-link").is_symlink()


def test_work_dir_is_locked_while_used_and_removed_after(tmp_path, monkeypatch):
    monkeypatch.setenv("REMORA_TMPDIR", str(tmp_path))
    with work_dir("convert") as d:
        (d / "data").write_bytes(b"y")
        assert sweep(tmp_path) == [] and d.exists()     # our own lock: alive
    assert not d.exists()
    assert list(tmp_path.iterdir()) == []
