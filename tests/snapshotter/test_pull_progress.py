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


class _GcRacingContainerd:
    """A containerd whose garbage collector removes layer 0 (a failed pull's leftover) right after the
    pull found it present: the Prepare of layer 1 on it then fails like containerd's does."""

    def __init__(self):
        self.present = {"chain0"}
        self.calls: list[tuple[str, str]] = []
        self.raced = False

    def stat(self, snapshotter, key):
        self.calls.append(("stat", key))
        if key == "chain0" and not self.raced:
            self.raced = True
            self.present.discard("chain0")   # gone before the next call
            return object()
        return object() if key in self.present else None

    def prepare(self, snapshotter, key, parent, labels):
        from remora.errors import NotFound
        from remora.snapshotter.containerd_client import AlreadyExists

        chain = key.split()[-1]
        self.calls.append(("prepare", chain))
        if parent and parent not in self.present:
            raise NotFound(f"containerd prepare snapshot {key!r} on remora: NOT_FOUND: parent snapshot {parent} "
                           "does not exist: not found")
        self.present.add(chain)
        raise AlreadyExists("remote")   # the remora snapshotter's "mounted lazily"


def test_a_layer_removed_under_the_pull_is_prepared_again():
    """Found in CI: a pull right after a failed one found layer 0 present, containerd's GC removed it
    (the failed pull's lease was gone) and the Prepare of layer 1 said "parent snapshot does not exist".
    The pull checks its layers again from the first and prepares the vanished one anew."""
    from types import SimpleNamespace

    from remora.snapshotter.pull import _prepare_all

    layers = [SimpleNamespace(annotations={}, digest=f"sha256:{i}" * 2) for i in range(2)]
    ctd = _GcRacingContainerd()
    said: list[str] = []
    remote, reused = _prepare_all(ctd, "remora", SimpleNamespace(layers=layers), ["chain0", "chain1"],
                                  [{}, {}], "img", said.append, lambda what: None)
    assert (remote, reused) == (2, 0)
    # (once chain0 had to be prepared, chain1 is not asked about: its parent was missing, so it is too)
    assert ctd.calls == [("stat", "chain0"), ("stat", "chain1"), ("prepare", "chain1"),
                         ("stat", "chain0"), ("prepare", "chain0"), ("prepare", "chain1")]
    assert any("went away under this pull" in line for line in said), said


def test_layers_above_a_missing_one_are_prepared_without_a_stat():
    """A chain whose parent is missing cannot exist: after the first missing layer a pull sends only
    Prepares (one containerd round trip per layer instead of two); layers below it are still found."""
    from types import SimpleNamespace

    from remora.snapshotter.pull import _prepare_all

    class Ctd(_GcRacingContainerd):
        def stat(self, snapshotter, key):
            self.calls.append(("stat", key))
            return object() if key in self.present else None

    layers = [SimpleNamespace(annotations={}, digest=f"sha256:{i}" * 2) for i in range(4)]
    chains = [f"chain{i}" for i in range(4)]
    fresh = Ctd()
    fresh.present = set()
    assert _prepare_all(fresh, "remora", SimpleNamespace(layers=layers), chains, [{}] * 4, "img", lambda s: None,
                        lambda what: None) == (4, 0)
    assert fresh.calls == [("stat", "chain0")] + [("prepare", c) for c in chains]
    shared = Ctd()
    shared.present = {"chain0", "chain1"}        # a base image's layers are there already
    assert _prepare_all(shared, "remora", SimpleNamespace(layers=layers), chains, [{}] * 4, "img", lambda s: None,
                        lambda what: None) == (2, 2)
    assert shared.calls == [("stat", "chain0"), ("stat", "chain1"), ("stat", "chain2"), ("prepare", "chain2"),
                            ("prepare", "chain3")]
