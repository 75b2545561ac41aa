"""The thin ``remora pull`` ends without the interpreter's teardown, and loses no output doing so.

Once the snapshotter's pull service has answered, the client has nothing left to do but exit; the
interpreter's teardown (finalising every module and object) cost ~80 ms of every cold start. So the
thin path flushes and calls ``os._exit`` (remora.cli.exit_now). What must hold: stdout and stderr
arrive complete through pipes (block-buffered), atexit handlers still run, the exit code is the
pull's (also for an error the service reports), and the teardown really is skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from lazy_support import converted_busybox
from test_remote_e2e import Stack

pytestmark = pytest.mark.timeout(300)

# Runs the CLI as its console script does, with two probes: an atexit handler (must run) and an
# object only the interpreter's module teardown would finalise (must not be).
PROBE = """
import atexit, runpy, sys
out = sys.argv[1]
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
class Teardown:
    def __del__(self, _open=open, _path=out + ".teardown"):  # builtins may be gone by then
        _open(_path, "w").write("ran")
probe = type(sys)("_teardown_probe")
probe.obj = Teardown()
sys.modules["_teardown_probe"] = probe
sys.argv = ["remora", *sys.argv[2:]]
runpy.run_module("remora.cli", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def image(registry) -> str:
    """A converted busybox image (its remora reference)."""
    return converted_busybox(registry, "fast-exit")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    st = Stack(tmp_path_factory.mktemp("fast-exit"))
    yield st
    st.close()


def _pull(st: Stack, ref: str, probe: str, *extra: str, verbose: bool = False) -> subprocess.CompletedProcess:
    ns = f"fast-exit-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    st.namespaces.append(ns)
    argv = [sys.executable, "-c", PROBE, probe, *(["-v"] if verbose else []), "pull",
            "--address", str(st.ctd.address), "-n", ns, "--api", str(st.snap.api_address), *extra, ref]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_thin_pull_output_is_complete_and_teardown_skipped(stack, image, tmp_path):
    probe = str(tmp_path / "ok")
    proc = _pull(stack, image, probe, verbose=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "by the snapshotter's pull service" in proc.stderr, proc.stderr  # the thin path
    lines = proc.stdout.splitlines()
    assert proc.stdout.endswith("\n") and len(lines) == 1, proc.stdout
    name, digest = lines[0].split()
    assert name == image and digest.startswith("sha256:") and len(digest) == 71
    # every progress line the service streamed, up to the last one, reached stderr
    assert "(bootstrap): remote, mounted lazily" in proc.stderr and proc.stderr.rstrip().splitlines()[-1].startswith(
        "pulled in "), proc.stderr
    assert os.path.exists(probe + ".atexit"), "atexit handlers run before the fast exit"
    assert not os.path.exists(probe + ".teardown"), "the interpreter's teardown was skipped"


def test_thin_pull_error_exits_with_its_code_and_message(stack, image, tmp_path):
    probe = str(tmp_path / "err")
    missing = image.rsplit(":", 1)[0] + ":no-such-tag"
    proc = _pull(stack, missing, probe)
    assert proc.returncode == 5, (proc.returncode, proc.stderr[-3000:])  # not found, as an in-process pull
    assert proc.stderr.rstrip().splitlines()[-1].startswith("remora pull: error: "), proc.stderr
    assert os.path.exists(probe + ".atexit")
    assert not os.path.exists(probe + ".teardown")


def test_in_process_pull_exits_the_ordinary_way(stack, image, tmp_path):
    """--local is not the thin path: its gRPC channels and threads get the normal shutdown."""
    probe = str(tmp_path / "local")
    proc = _pull(stack, image, probe, "--local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == image
    assert os.path.exists(probe + ".teardown"), "the interpreter's teardown ran"
