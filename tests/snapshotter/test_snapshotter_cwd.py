"""`remora snapshotter` started from a folder that holds a `remora/` checkout still mounts lazily.

The fs processes are Python processes started with ``-m``; without ``-P`` the snapshotter's working
directory comes first on their ``sys.path`` and a ``remora/`` folder there (an operator's source
tree, an older checkout) is imported instead of the installed package: every lazy mount failed with
``cannot import name '__version__'``. Here the folder's ``remora/__init__.py`` refuses to be imported
at all, so any child that picks it up fails loudly.
"""
from __future__ import annotations

import os
from pathlib import Path

from remote_support import NAMESPACE, lowest_dir, remote_busybox

from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb


def test_lazy_mount_works_when_started_from_a_folder_with_a_remora_checkout(registry, tmp_path, monkeypatch):
    checkout = tmp_path / "src"
    (checkout / "remora").mkdir(parents=True)
    (checkout / "remora" / "__init__.py").write_text(
        'raise ImportError("a remora/ folder in the working directory was imported")\n')
    monkeypatch.chdir(checkout)  # the snapshotter (and whatever it starts) inherits this cwd
    with remote_busybox(registry, tmp_path, "cwd/bb", command=["remora", "snapshotter"]) as (stub, top, root):
        resp = stub.Prepare(pb.PrepareSnapshotRequest(key="ctr-1", parent=top), metadata=NAMESPACE, timeout=30)
        mountpoint = lowest_dir(resp.mounts[0])
        data = Path(mountpoint, "bin", "busybox").read_bytes()  # a lazy read, served by the fs process
        assert len(data) > 100_000 and data[:4] == b"\x7fELF"
        [pid_file] = (root / "lazy" / "mounts").glob("*.pid")
        pid = int(pid_file.read_text().split()[0])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"-P" in argv and b"remora.snapshotter.fs" in argv, argv
        assert os.readlink(f"/proc/{pid}/cwd") == "/", "an fs process must not keep a user's folder busy"
        log = next((root / "lazy" / "mounts").glob("*.log")).read_text()
        assert "was imported" not in log
