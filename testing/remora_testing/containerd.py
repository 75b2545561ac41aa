"""A private containerd (and a remora snapshotter process) for tests, benchmarks and the demo.

Nothing here touches the host's containerd: root, state, the gRPC/ttrpc sockets and the ``opt``
directory all live under a directory of the caller's; sockets go to a short directory under /tmp
because unix socket paths are limited to 107 bytes. The config is ``version = 2`` (containerd 1.6,
Debian 12) with ``[proxy_plugins.<name>]`` pointing at a snapshotter socket; the CRI plugin is
disabled unless asked for, and then configured the way a remote snapshotter needs it
(``snapshotter = "<name>"``, ``disable_snapshot_annotations = false``).

Example::

    with RemoraSnapshotter(tmp / "snap") as snap, PrivateContainerd(tmp / "ctd", snap.address) as ctd:
        ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "remora", ref)
        out = ctd.ctr("run", "--rm", "--snapshotter", "remora", ref, "c1", "echo", "hi").stdout

Start order is registry -> snapshotter -> containerd; stop in reverse (the context managers do).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from remora.errors import UsageError
from remora.procutil import Daemon, unix_socket_answers, wait_until


class RemoraSnapshotter:
    """``python -m remora.snapshotter.cli`` as a daemon with its own root and sockets.

    ``api_address`` is its pull service's socket (``remora pull --api``): by default ``api.sock``
    next to a default ``address``, or ``<address stem>-api.sock`` beside a given one, never the
    host's /run/remora/api.sock; ``""`` turns the service off.
    """

    def __init__(self, root: Path | str, address: Path | str | None = None, log_level: str = "info",
                 argv: Sequence[str] | None = None, api_address: Path | str | None = None):
        self.root = Path(root)
        self._sockdir = None
        if address is None:
            self._sockdir = tempfile.mkdtemp(prefix="rsnap-", dir="/tmp")
            address = Path(self._sockdir) / "snapshotter.sock"
        self.address = Path(address)
        if api_address is None:
            api_address = self.address.parent / ("api.sock" if self._sockdir else f"{self.address.stem}-api.sock")
        self.api_address: Path | None = Path(api_address) if api_address else None
        self.argv = list(argv or [sys.executable, "-m", "remora.snapshotter.cli"])
        self.log_level = log_level
        self.daemon: Daemon | None = None

    @property
    def log_path(self) -> Path:
        return self.root.parent / f"{self.root.name}.log"

    def start(self, timeout: float = 30.0) -> RemoraSnapshotter:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        api = str(self.api_address) if self.api_address else ""
        self.daemon = Daemon([*self.argv, "--root", str(self.root), "--address", str(self.address),
                              "--api-address", api, "--log-level", self.log_level], self.log_path).start()
        # The pull service opens last (after gRPC serves): ready means both answer.
        sockets = [self.address, *([self.api_address] if self.api_address else [])]
        try:
            wait_until(lambda: all(unix_socket_answers(s) for s in sockets) or not self.daemon.alive(), timeout,
                       what=f"snapshotter sockets {', '.join(map(str, sockets))}")
        except BaseException:  # a deadline, a probe that failed, ^C: the daemon and what it left go too
            self.stop()
            raise
        if not self.daemon.alive():
            raise UsageError(f"snapshotter exited at start:\n{self.daemon.log_tail()}")
        return self

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()
            self.daemon = None

    def kill(self) -> None:
        """SIGKILL (crash simulation): no cleanup runs, the socket file stays behind."""
        if self.daemon:
            self.daemon.kill()
            self.daemon = None

    def close(self) -> None:
        self.stop()
        if self._sockdir:
            shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> RemoraSnapshotter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class PrivateContainerd:
    """A containerd 1.6 of our own, with the remora snapshotter as a proxy plugin.

    ``base_dir`` holds ``root/``, ``state/``, ``opt/``, ``config.toml`` and ``containerd.log``.
    ``snapshotter_socket`` is the proxy plugin's address (None: no proxy plugin). ``cri=True`` enables
    the CRI plugin with ``snapshotter = snapshotter_name``; ``registry_mirrors`` maps registry hosts
    to endpoints for it (``{"127.0.0.1:5000": "http://127.0.0.1:5000"}`` for a plain-HTTP registry).
    ``namespace`` is the containerd namespace ``ctr()`` uses (unique by default).
    """

    def __init__(self, base_dir: Path | str, snapshotter_socket: Path | str | None = None, *,
                 snapshotter_name: str = "remora", cri: bool = False,
                 registry_mirrors: Mapping[str, str] | None = None, namespace: str | None = None,
                 containerd: str = "containerd", ctr: str = "ctr", extra_config: str = ""):
        self.base_dir = Path(base_dir).resolve()
        self.snapshotter_socket = Path(snapshotter_socket) if snapshotter_socket else None
        self.snapshotter_name = snapshotter_name
        self.cri = cri
        self.registry_mirrors = dict(registry_mirrors or {})
        self.namespace = namespace or f"remora-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.containerd_bin = shutil.which(containerd) or containerd
        self.ctr_bin = shutil.which(ctr) or ctr
        self.extra_config = extra_config
        self.root = self.base_dir / "root"
        self.state = self.base_dir / "state"
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "containerd.log"
        self._sockdir = Path(tempfile.mkdtemp(prefix="rctd-", dir="/tmp"))
        self.address = self._sockdir / "containerd.sock"
        self.daemon: Daemon | None = None

    def config_text(self) -> str:
        q = json.dumps  # TOML basic strings accept JSON string escapes
        lines = [
            "version = 2",
            f"root = {q(str(self.root))}",
            f"state = {q(str(self.state))}",
            "[grpc]",
            f"  address = {q(str(self.address))}",
            "[ttrpc]",
            f"  address = {q(str(self.address) + '.ttrpc')}",
            "[debug]",
            '  level = "info"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {q(str(self.base_dir / 'opt'))}",
        ]
        if not self.cri:
            lines.insert(1, 'disabled_plugins = ["io.containerd.grpc.v1.cri"]')
        else:
            lines += [
                '[plugins."io.containerd.grpc.v1.cri"]',
                '  stream_server_address = "127.0.0.1"',
                '  stream_server_port = "0"',
                '  enable_cdi = false',
                '[plugins."io.containerd.grpc.v1.cri".containerd]',
                f"  snapshotter = {q(self.snapshotter_name)}",
                "  disable_snapshot_annotations = false",
                '[plugins."io.containerd.grpc.v1.cri".cni]',
                f"  bin_dir = {q(str(self.base_dir / 'cni' / 'bin'))}",
                f"  conf_dir = {q(str(self.base_dir / 'cni' / 'conf'))}",
            ]
            for host, endpoint in self.registry_mirrors.items():
                lines += [f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors.{q(host)}]',
                          f"  endpoint = [{q(endpoint)}]"]
        if self.snapshotter_socket:
            lines += [f"[proxy_plugins.{q(self.snapshotter_name)}]", '  type = "snapshot"',
                      f"  address = {q(str(self.snapshotter_socket))}"]
        return "\n".join(lines) + "\n" + self.extra_config

    def daemon_env(self) -> dict[str, str] | None:
        """Environment of the containerd process (None: ours); subclasses put their shims on PATH."""
        return None

    def prepare_files(self) -> None:
        """Write what the daemon reads at start besides config.toml (hook for subclasses)."""

    def start(self, timeout: float = 20.0) -> PrivateContainerd:
        if self.daemon and self.daemon.alive():
            raise UsageError(f"{self.label} already running")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.prepare_files()
        self.config_path.write_text(self.config_text())
        self.daemon = Daemon([self.containerd_bin, "--config", str(self.config_path)], self.log_path,
                             env=self.daemon_env()).start()
        try:
            wait_until(lambda: not self.daemon.alive() or self._answers(), timeout, interval=0.1, what=self.label)
        except BaseException:  # a deadline, a probe that failed, ^C: the daemon and what it left go too
            self.stop()
            raise
        if not self.daemon.alive():
            raise UsageError(f"{self.label} exited at start:\n{self.daemon.log_tail()}")
        return self

    label = "containerd"

    def _answers(self) -> bool:
        """Whether containerd answers ``ctr version`` now; a probe that times out means "not yet" (the
        start's own deadline decides), not a failed start."""
        try:
            return self.ctr("version", check=False, timeout=5).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def ctr(self, *args: str, check: bool = True, timeout: float = 120.0, namespace: str | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``ctr --address <ours> -n <namespace> ARGS``; raises with ctr's stderr when it fails."""
        argv = [self.ctr_bin, "--address", str(self.address), "-n", namespace or self.namespace, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout,
                                                proc.stderr + "\n--- containerd log ---\n" + self.log_tail())
        return proc

    def wait_snapshotter(self, namespace: str | None = None, timeout: float = 30.0) -> None:
        """Wait until containerd's channel to the proxy snapshotter carries a call again (after the
        snapshotter restarted: grpc-go reconnects with a back-off of up to a few seconds, and a call made
        meanwhile fails at once with the last connection error, e.g. "connection closed: unavailable").

        The probe must reach the snapshotter itself: ``ctr snapshots ls`` does not (containerd answers a
        Walk from its own metadata store), so an empty active snapshot is prepared and removed."""
        key = f"reconnect-probe-{uuid.uuid4().hex[:8]}"

        def answers() -> bool:
            args = ("snapshots", "--snapshotter", self.snapshotter_name)
            if self.ctr(*args, "prepare", key, check=False, namespace=namespace).returncode != 0:
                return False
            self.ctr(*args, "rm", key, namespace=namespace)
            return True

        wait_until(answers, timeout, interval=0.2, what=f"containerd's calls reaching the {self.snapshotter_name} "
                   "snapshotter")

    def log_tail(self, n: int = 40) -> str:
        return self.daemon.log_tail(n) if self.daemon else ""

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()
            self.daemon = None

    def close(self) -> None:
        """Stop containerd and remove the socket directory (``base_dir`` is the caller's)."""
        self.stop()
        shutil.rmtree(self._sockdir, ignore_errors=True)
        self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        """runc leaves an empty cgroup per controller named after the namespace: remove ours."""
        base = Path("/sys/fs/cgroup")
        for cg in [base / self.namespace, *base.glob(f"*/{self.namespace}")]:
            if not cg.is_dir():
                continue
            for dirpath, _, _ in sorted(os.walk(cg), key=lambda t: len(t[0]), reverse=True):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass

    def __enter__(self) -> PrivateContainerd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
