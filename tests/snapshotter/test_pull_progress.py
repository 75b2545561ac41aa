"""`remora pull` is never silent for more than a second: a slow registry or a slow Prepare (the
snapshotter fetching and mounting the bootstrap) gets a "still waiting" line every second, and the
fast path prints nothing extra."""
from __future__ import annotations

import subprocess
import sys

from remora.converter.convert import ConvertOptions, convert
from remora.procutil import wait_until
from remora.snapshotter.pull import Heartbeat
from remora_testing.imagebuild import LayerSpec, busybox_rootfs, write_image


def test_heartbeat_speaks_every_interval_while_waiting_and_never_after():
    lines: list[str] = []
    with Heartbeat(lines.append, "layer 1/2", every=0.05) as hb:
        wait_until(lambda: len(lines) >= 3, 10, interval=0.01, what="three heartbeats")
    assert not hb._thread.is_alive()
    said = len(lines)
    assert all(line.startswith("layer 1/2: still waiting (") for line in lines), lines
    quick: list[str] = []
    with Heartbeat(quick.append, "fast", every=30):
        pass  # a call done within the interval says nothing
    assert quick == [] and len(lines) == said


def test_pull_through_a_slow_registry_reports_progress(registry, proxy, containerd, tmp_path):
    src = f"{registry.host}/progress/bb:1"
    write_image(src, None, [LayerSpec(busybox_rootfs(tmp_path / "bb"))])
    convert(src, f"{registry.host}/progress/bb:1-remora", ConvertOptions(progress=False))
    proxy.delay = 1.2  # every registry request (the pull's and the snapshotter's) takes over a second
    ref = f"{proxy.host}/progress/bb:1-remora"
    proc = subprocess.run([sys.executable, "-m", "remora.cli", "pull", "--local", "--address",
                           str(containerd.address), "-n", containerd.namespace, ref],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert f"{ref}: resolving in the registry: still waiting (1s)" in proc.stderr, proc.stderr
    assert "remote, mounted lazily" in proc.stderr
