"""Fixtures for the snapshotter tests: an in-process server (fast RPC tests, custom remote handlers),
the real snapshotter process, and a private containerd that uses it as a proxy plugin."""
from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from pathlib import Path

import grpc
import pytest

from remora._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from remora.snapshotter.remote import RemoteLayerHandler
from remora.snapshotter.server import SnapshotterServer
from remora.snapshotter.storage import mountpoints_under
from remora_testing.containerd import PrivateContainerd, RemoraSnapshotter


class ServerThread:
    """A SnapshotterServer on its own event loop in a background thread, plus a sync gRPC stub.

    ``call(ns, "Prepare", request)`` sends the containerd-namespace header like containerd does.
    """

    def __init__(self, root: Path, address: Path, handler: RemoteLayerHandler | None = None):
        self.root, self.address, self.handler = root, address, handler
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: SnapshotterServer | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> ServerThread:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            SnapshotterServer(self.root, self.address, self.handler).start(), self.loop).result(30)
        self.channel = grpc.insecure_channel(f"unix://{self.address}")
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        return self

    def call(self, method: str, request, namespace: str = "default"):
        fn = getattr(self.stub, method)
        md = [("containerd-namespace", namespace)]
        if method == "List":
            return [info for resp in fn(request, metadata=md, timeout=30) for info in resp.info]
        return fn(request, metadata=md, timeout=30)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self.channel:
            self.channel.close()
        if self.server:
            asyncio.run_coroutine_threadsafe(self.server.stop(1), self.loop).result(30)
            self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _unmount_all_below(path: Path) -> None:
    from remora.snapshotter.storage import detach_mount

    for mp in mountpoints_under(path):
        detach_mount(mp)


@pytest.fixture
def short_dir():
    """A short directory under /tmp for unix sockets (107-byte path limit); removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="rsn-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_server(tmp_path, short_dir):
    """Factory: start an in-process server (optionally with a remote handler) on tmp_path/root."""
    started: list[ServerThread] = []

    def start(handler: RemoteLayerHandler | None = None, root: Path | None = None) -> ServerThread:
        st = ServerThread(root or tmp_path / "root", short_dir / f"s{len(started)}.sock", handler).start()
        started.append(st)
        return st

    yield start
    for st in started:
        st.stop()
    _unmount_all_below(tmp_path)


@pytest.fixture
def server(start_server) -> ServerThread:
    return start_server()


@pytest.fixture
def snapshotter_proc(tmp_path):
    """The real ``remora snapshotter`` process on tmp_path/snap."""
    snap = RemoraSnapshotter(tmp_path / "snap").start()
    yield snap
    snap.close()
    _unmount_all_below(tmp_path)


@pytest.fixture
def containerd(tmp_path, snapshotter_proc):
    """A private containerd whose proxy plugin ``remora`` is ``snapshotter_proc``."""
    ctd = PrivateContainerd(tmp_path / "containerd", snapshotter_proc.address).start()
    yield ctd
    ctd.close()
    _unmount_all_below(tmp_path)


@pytest.fixture
def proxy(registry):
    """A counting (and, on demand, misbehaving) HTTP proxy in front of the session's registry."""
    from lazy_support import CountingProxy

    with CountingProxy(registry.url) as p:
        yield p
