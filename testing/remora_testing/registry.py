"""An embedded OCI registry: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1.

Used by ``remora demo`` and by the test-suite. Plain HTTP on loopback, filesystem storage in a
directory of its own, deletes enabled, optional htpasswd (bcrypt) authentication.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from remora.errors import RemoraError
from remora.procutil import Daemon, free_port, port_open, wait_until

REGISTRY_BINARIES = ("docker-registry", "registry")


def find_registry_binary() -> str:
    for name in REGISTRY_BINARIES:
        path = shutil.which(name)
        if path:
            return path
    raise RemoraError("no registry binary found: install Debian's 'docker-registry' package "
                      "(apt-get install docker-registry)")


class LocalRegistry:
    """``with LocalRegistry() as reg: reg.host`` -> ``"127.0.0.1:PORT"``."""

    def __init__(self, root: Path | str | None = None, port: int | None = None,
                 users: dict[str, str] | None = None, host: str = "127.0.0.1"):
        self._tmp = None
        if root is None:
            self._tmp = tempfile.mkdtemp(prefix="remora-registry-")
            root = self._tmp
        self.root = Path(root)
        self.port = port or free_port(host)
        self.bind = host
        self.users = dict(users or {})
        self.daemon: Daemon | None = None

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _write_htpasswd(self) -> Path:
        path = self.root / "htpasswd"
        lines = []
        for user, password in self.users.items():
            try:
                import bcrypt  # type: ignore
                hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
            except ImportError:
                out = subprocess.run(["htpasswd", "-nbB", "-C", "5", user, password], check=True,
                                     capture_output=True, text=True).stdout.strip()
                hashed = out.split(":", 1)[1]
            lines.append(f"{user}:{hashed}")
        path.write_text("\n".join(lines) + "\n")
        return path

    def config_text(self) -> str:
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.users:
            auth = f"""auth:
  htpasswd:
    realm: remora-test
    path: {self._write_htpasswd()}
"""
        return f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {self.host}
  headers:
    X-Content-Type-Options: [nosniff]
{auth}"""

    def start(self, timeout: float = 15.0) -> LocalRegistry:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "config.yml"
        cfg.write_text(self.config_text())
        self.daemon = Daemon([find_registry_binary(), "serve", str(cfg)], self.root / "registry.log").start()
        try:
            wait_until(lambda: port_open(self.bind, self.port) or not self.daemon.alive(), timeout, what="registry")
        except TimeoutError:
            self.stop()
            raise
        if not self.daemon.alive():
            raise RemoraError(f"registry exited at start:\n{self.daemon.log_tail()}")
        return self

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()
            self.daemon = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
