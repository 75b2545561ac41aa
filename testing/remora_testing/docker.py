"""A private dockerd 28 (Debian sid, unpacked by scripts/fetch-newer-runtimes.sh) on a containerd of ours.

Docker reaches a containerd snapshotter only through its containerd image store: ``"features":
{"containerd-snapshotter": true}`` plus ``"storage-driver": "<snapshotter name>"`` makes dockerd pull,
unpack and run through containerd with that snapshotter, and moby passes ``containerd.io/snapshot.ref``
and the four ``cri.*`` labels to ANY snapshotter name, so remora's remote path works with ``docker pull``.

Nothing here touches the host's Docker or firewall: the daemon gets its own config file, data-root,
exec-root, pidfile, unix socket, containerd namespaces (``containerd-namespace`` and
``containerd-plugins-namespace``) and cgroup parent; networking is off (``"bridge": "none"``,
``iptables``/``ip6tables``/``ip-forward`` false), so containers run with loopback only. The CLI runs
with ``--config <base_dir>/cli`` so root's ~/.docker is not read or written.

Example::

    with PrivateDocker(tmp / "docker", ctd.address, snapshotter="remora",
                       insecure_registries=[registry.host]) as dk:
        docker = dk.client()
        docker.pull(ref)
        print(docker.run(ref, ["echo", "hi"], remove=True))
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

from remora.errors import NotFound, UsageError
from remora.procutil import Daemon, wait_until
from remora_testing.containerd_v2 import RUNTIMES_DIR, remove_namespace_leftovers

DOCKER_DIR = RUNTIMES_DIR / "docker"
RUN_DOCKER = Path("/run/docker")


def docker_binaries() -> tuple[Path, Path]:
    """(dockerd, docker) from the private Docker tree, or a clear error saying how to get them."""
    dockerd, docker = DOCKER_DIR / "usr" / "sbin" / "dockerd", DOCKER_DIR / "usr" / "bin" / "docker"
    for b in (dockerd, docker):
        if not b.is_file():
            raise NotFound(f"{b} not found: run scripts/fetch-newer-runtimes.sh")
    return dockerd, docker


class PrivateDocker:
    """dockerd with its own everything, using ``containerd_socket``'s containerd and ``snapshotter``.

    ``base_dir`` holds ``daemon.json``, ``data/`` (data-root), ``cli/`` (client config) and
    ``dockerd.log``; the socket, pidfile and exec-root sit in a short directory under /tmp (unix socket
    paths are limited to 107 bytes). ``insecure_registries``: hosts such as ``127.0.0.1:5000`` that
    dockerd may reach over plain HTTP. ``namespace``: the containerd namespace dockerd keeps images and
    containers in (unique by default, so parallel tests and a host Docker never see each other's).
    """

    def __init__(self, base_dir: Path | str, containerd_socket: Path | str, *, snapshotter: str = "remora",
                 insecure_registries: Iterable[str] = (), namespace: str | None = None):
        self.base_dir = Path(base_dir).resolve()
        self.containerd_socket = Path(containerd_socket)
        self.snapshotter = snapshotter
        self.insecure_registries = list(insecure_registries)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.namespace = namespace or f"remora-docker-{tag}"
        self.cgroup_parent = f"remora-docker-{tag}"
        self.dockerd_bin, self.docker_bin = docker_binaries()
        self.data_root = self.base_dir / "data"
        self.cli_config = self.base_dir / "cli"
        self.config_path = self.base_dir / "daemon.json"
        self.log_path = self.base_dir / "dockerd.log"
        self._rundir = Path(tempfile.mkdtemp(prefix="rdock-", dir="/tmp"))
        self.exec_root = self._rundir / "exec"
        self.socket = self._rundir / "docker.sock"
        self.pidfile = self._rundir / "docker.pid"
        self.daemon: Daemon | None = None
        self._made_run_docker = False

    @property
    def host(self) -> str:
        """The ``DOCKER_HOST`` value for this daemon."""
        return f"unix://{self.socket}"

    def daemon_config(self) -> dict:
        """The daemon.json written at start: also the reference for examples/docker/daemon.json."""
        return {
            "data-root": str(self.data_root),
            "exec-root": str(self.exec_root),
            "pidfile": str(self.pidfile),
            "hosts": [self.host],
            "containerd": str(self.containerd_socket),
            "containerd-namespace": self.namespace,
            "containerd-plugins-namespace": f"{self.namespace}-plugins",
            "features": {"containerd-snapshotter": True},
            "storage-driver": self.snapshotter,
            "bridge": "none",
            "iptables": False,
            "ip6tables": False,
            "ip-forward": False,
            "ip-masq": False,
            "userland-proxy": False,
            "cgroup-parent": self.cgroup_parent,
            "init-path": str(DOCKER_DIR / "usr" / "bin" / "docker-init"),
            "insecure-registries": self.insecure_registries,
            "log-level": "info",
        }

    def start(self, timeout: float = 30.0) -> PrivateDocker:
        if self.daemon and self.daemon.alive():
            raise UsageError("dockerd already running")
        for d in (self.base_dir, self.data_root, self.cli_config):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.daemon_config(), indent=2) + "\n")
        self._made_run_docker = not RUN_DOCKER.exists()
        # runc comes from PATH (bookworm's); the private tree first for docker-init/docker-proxy.
        path = f"{DOCKER_DIR / 'usr' / 'sbin'}:{DOCKER_DIR / 'usr' / 'bin'}:" \
               f"{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        self.daemon = Daemon([str(self.dockerd_bin), "--config-file", str(self.config_path)], self.log_path,
                             env=dict(os.environ, PATH=path)).start()
        try:
            wait_until(lambda: not self.daemon.alive() or self._answers(), timeout, interval=0.1, what="dockerd")
        except BaseException:  # a deadline, a probe that failed, ^C: the daemon and what it left go too
            self.close()
            raise
        if not self.daemon.alive():
            tail = self.daemon.log_tail()
            self.close()
            raise UsageError(f"dockerd exited at start:\n{tail}")
        return self

    def _answers(self) -> bool:
        """Whether dockerd answers ``docker version`` now. A daemon still starting may accept on its socket
        and answer late: a probe that times out means "not yet", not a failed start (that is the overall
        deadline's call)."""
        try:
            return self.docker("version", check=False, timeout=5).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def docker(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the private ``docker`` CLI against this daemon; raises with stderr and the daemon log."""
        argv = [str(self.docker_bin), "--config", str(self.cli_config), "--host", self.host, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout,
                                                proc.stderr + "\n--- dockerd log ---\n" + self.log_tail())
        return proc

    def client(self):
        """A python-on-whales ``DockerClient`` bound to this daemon and the private CLI."""
        from python_on_whales import DockerClient

        return DockerClient(host=self.host, config=self.cli_config, client_call=[str(self.docker_bin)])

    def log_tail(self, n: int = 40) -> str:
        return self.daemon.log_tail(n) if self.daemon else ""

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop(grace=15.0)
            self.daemon = None

    def close(self) -> None:
        """Stop dockerd, unmount what it left under its roots, remove the run dir and its cgroups."""
        self.stop()
        from remora.snapshotter.storage import detach_mount, mountpoints_under

        for root in (self.data_root, self._rundir):
            for mp in mountpoints_under(root):
                detach_mount(mp)
        shutil.rmtree(self._rundir, ignore_errors=True)
        remove_namespace_leftovers(self.namespace, cgroup_name=self.cgroup_parent)
        remove_namespace_leftovers(f"{self.namespace}-plugins")
        if self._made_run_docker:  # dockerd always creates /run/docker/plugins (plugin discovery)
            for d in (RUN_DOCKER / "plugins", RUN_DOCKER):
                try:
                    d.rmdir()
                except OSError:
                    break

    def __enter__(self) -> PrivateDocker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
