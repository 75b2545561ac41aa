"""A bootstrap bomb pulled through the real stack: the snapshotter's memory stays bounded.

The image is a real conversion pushed to the registry, whose bootstrap layer is then replaced with a
hand-built zstd bomb (digest-valid: manifest, config and annotations rewritten). ``remora pull``
through a private containerd makes the real ``remora snapshotter`` process fetch it; the pull must
fail with a clear error, the snapshotter's peak RSS (``VmHWM`` of its /proc status: the high-water
mark over its whole life) must stay under 256 MiB, and the same snapshotter must still pull the
untouched image afterwards.
"""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "format"))
from bootstrap_craft import bomb_layer, edit, layer_from_db, replace_bootstrap, sample_bootstrap

from remora_testing.imagebuild import busybox_image

pytestmark = pytest.mark.timeout(300)

RSS_LIMIT = 256 << 20


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def _pull(containerd, ref: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remora.cli", "pull", "--address", str(containerd.address),
                           "-n", containerd.namespace, ref], capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("usize", [300 << 20, 4 << 30], ids=["under-cap-300m", "declared-4g"])
def test_snapshotter_memory_stays_bounded_through_a_bootstrap_bomb(registry, snapshotter_proc, containerd, usize):
    src = f"{registry.host}/bomb-{uuid.uuid4().hex[:6]}/busybox:1"
    busybox_image(src)
    good = src + "-remora"
    subprocess.run([sys.executable, "-m", "remora.cli", "convert", "--no-progress", src, good],
                   check=True, capture_output=True, timeout=240)
    layer = bomb_layer(usize)
    bomb = replace_bootstrap(good, None, layer, new_tag="bomb")
    pid = snapshotter_proc.daemon.pid
    before = _peak_rss(pid)

    t0 = time.monotonic()
    proc = _pull(containerd, bomb)
    took = time.monotonic() - t0
    peak = _peak_rss(pid)
    print(f"snapshotter through a {len(layer)}-byte bootstrap layer ({usize >> 20} MiB): pull exit "
          f"{proc.returncode} in {took:.2f}s, peak RSS {before >> 20} -> {peak >> 20} MiB; "
          f"{proc.stderr.strip()[-300:]}")
    assert proc.returncode != 0
    assert "bootstrap" in proc.stderr, proc.stderr
    assert snapshotter_proc.daemon.alive()
    assert peak < RSS_LIMIT, f"snapshotter peak RSS {peak >> 20} MiB"
    log = snapshotter_proc.log_path.read_text(errors="replace")
    assert "over the" in log or "not an SQLite database" in log, log[-3000:]
    # nothing of the bomb is kept: no bootstrap file, no spooled layer
    boots = snapshotter_proc.root / "bootstraps"
    assert not [p for p in boots.rglob("*") if p.is_file()], list(boots.rglob("*"))

    # the same snapshotter still pulls (and validates) a real image
    ok = _pull(containerd, good)
    assert ok.returncode == 0, ok.stderr
    assert _peak_rss(pid) < RSS_LIMIT


def test_snapshotter_refuses_a_hostile_bootstrap_before_mounting(registry, snapshotter_proc, containerd, tmp_path):
    """A digest-valid bootstrap whose ``meta`` is a view over an endless recursive query (it hangs an
    unguarded reader) is refused by the snapshotter's validation, quickly, and not kept for a mount."""
    src = f"{registry.host}/hostile-{uuid.uuid4().hex[:6]}/busybox:1"
    busybox_image(src)
    good = src + "-remora"
    subprocess.run([sys.executable, "-m", "remora.cli", "convert", "--no-progress", src, good],
                   check=True, capture_output=True, timeout=240)
    db = edit(sample_bootstrap(tmp_path / "b.db"), "DROP TABLE meta",
              "CREATE VIEW meta(key, value) AS WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
              "SELECT 'format_version', n FROM r")
    bad = replace_bootstrap(good, None, layer_from_db(db, tmp_path / "enc"), new_tag="hostile")
    t0 = time.monotonic()
    proc = _pull(containerd, bad)
    took = time.monotonic() - t0
    assert proc.returncode != 0 and "bootstrap" in proc.stderr, proc.stderr
    assert took < 60
    log = snapshotter_proc.log_path.read_text(errors="replace")
    assert "schema is not remora's: unexpected view meta" in log, log[-3000:]
    boots = snapshotter_proc.root / "bootstraps"
    assert not [p for p in boots.rglob("*") if p.is_file()], list(boots.rglob("*"))   # nothing kept to mount
    assert snapshotter_proc.daemon.alive()
