"""Real daemons inside lab namespaces: a registry that counts what it serves, and a private containerd.

Readiness is always checked from INSIDE the namespace (``probe wait-port`` / ``ctr version`` run with
nsenter): the root namespace never talks to a lab address.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from remora.errors import RemoraError
from remora.procutil import Daemon, wait_until
from remora_testing.netlab.namespaces import NetlabError, Node
from remora_testing.registry import LocalRegistry, find_registry_binary

PY = sys.executable

# distribution's access log is Apache "combined": ... "GET /v2/<repo>/blobs/<digest> HTTP/1.1" 200 <bytes> ...
_ACCESS_RE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>/v2/\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<size>\d+|-)')


def wait_port_in(node: Node, host: str, port: int, timeout: float = 15.0, daemon: Daemon | None = None) -> None:
    out = node.run([PY, "-m", "remora_testing.netlab.probe", "wait-port", f"{host}:{port}", "--timeout", str(timeout)],
                   check=False, timeout=timeout + 10)
    if out.returncode != 0:
        tail = daemon.log_tail() if daemon else ""
        raise NetlabError(f"[{node.name}] nothing listening on {host}:{port} after {timeout:.0f}s\n{tail}")


class NsRegistry:
    """docker-registry serving ``root`` on ``node.ip:port``, access log on, so bytes served are countable.

    Fill it before :meth:`start` with :meth:`loopback` (a registry on 127.0.0.1 in the root namespace
    over the same storage): content pushes then never cross into the lab.
    """

    def __init__(self, node: Node, root: Path, port: int = 5000):
        self.node, self.root, self.port = node, Path(root), port
        self.daemon: Daemon | None = None
        #: appended to distribution's configuration at :meth:`start` (e.g. an ``auth: token:`` section)
        self.extra_config = ""

    @property
    def host(self) -> str:
        return f"{self.node.ip}:{self.port}"

    def loopback(self) -> LocalRegistry:
        """A LocalRegistry on 127.0.0.1 over the same storage: ``with reg.loopback() as lr: push(lr.url)``."""
        return LocalRegistry(root=self.root)

    def start(self) -> NsRegistry:
        helper = LocalRegistry(root=self.root, host=self.node.ip, port=self.port)
        cfg = helper.config_text().replace("accesslog:\n    disabled: true", "accesslog:\n    disabled: false")
        cfg += self.extra_config
        path = self.root / "config-lab.yml"
        path.write_text(cfg)
        self.daemon = self.node.spawn([find_registry_binary(), "serve", str(path)], log_name="registry.log")
        wait_port_in(self.node, self.node.ip, self.port, daemon=self.daemon)
        return self

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()

    def blob_bytes_served(self) -> dict[str, int]:
        """Body bytes of successful blob GETs, per digest, from the access log (application level)."""
        served: dict[str, int] = {}
        if self.daemon is None:
            return served
        for line in self.daemon.log_path.read_text(errors="replace").splitlines():
            m = _ACCESS_RE.search(line)
            if not m or m["method"] != "GET" or "/blobs/" not in m["path"] or m["size"] == "-":
                continue
            if m["status"] not in ("200", "206"):
                continue
            digest = m["path"].rsplit("/blobs/", 1)[1].split("?")[0]
            served[digest] = served.get(digest, 0) + int(m["size"])
        return served

    def blob_gets(self) -> list[tuple[str, str, int]]:
        """(digest, status, size) of every blob GET seen, for assertions on who went to the registry."""
        rows = []
        if self.daemon is None:
            return rows
        for line in self.daemon.log_path.read_text(errors="replace").splitlines():
            m = _ACCESS_RE.search(line)
            if m and m["method"] == "GET" and "/blobs/" in m["path"]:
                size = 0 if m["size"] == "-" else int(m["size"])
                rows.append((m["path"].rsplit("/blobs/", 1)[1].split("?")[0], m["status"], size))
        return rows


class NsContainerd:
    """A private containerd in ``node``'s namespace (own root, state, sockets; CRI disabled).

    ``pull(ref, hosts_dir)`` runs ``ctr images pull`` INSIDE the namespace (with ctr 1.6 the fetch
    happens in the ctr process), so the mirror configured in ``hosts_dir`` is the peer of that node.
    """

    def __init__(self, node: Node, root: Path):
        self.node, self.root = node, Path(root)
        self.address = str(self.root / "containerd.sock")
        self.daemon: Daemon | None = None
        self.namespace = f"lab{node.lab.id}"

    def config(self) -> str:
        r = self.root
        return f"""version = 2
root = "{r / 'root'}"
state = "{r / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{r / 'containerd.sock.ttrpc'}"

[debug]
  address = "{r / 'debug.sock'}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{r / 'opt'}"
"""

    def start(self) -> NsContainerd:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "config.toml"
        cfg.write_text(self.config())
        self.daemon = self.node.spawn(["containerd", "--config", str(cfg)], log_name=f"containerd-{self.node.name}.log")
        wait_until(lambda: self.ctr(["version"], check=False).returncode == 0 or not self.daemon.alive(), 15,
                   interval=0.1, what=f"containerd in {self.node.name}")
        if not self.daemon.alive():
            raise NetlabError(f"containerd in {self.node.name} exited:\n{self.daemon.log_tail()}")
        return self

    def ctr(self, args: list[str], check: bool = True, timeout: float = 600):
        return self.node.run(["ctr", "--address", self.address, "--namespace", self.namespace] + args,
                             check=check, timeout=timeout)

    def pull(self, ref: str, hosts_dir: Path, plain_http: bool = True, timeout: float = 600):
        args = ["images", "pull", "--hosts-dir", str(hosts_dir)] + (["--plain-http"] if plain_http else []) + [ref]
        return self.ctr(args, timeout=timeout)

    def image_digest(self, ref: str) -> str:
        out = self.ctr(["images", "ls", "--quiet"]).stdout
        if ref not in out.split():
            raise RemoraError(f"{ref} not in containerd of {self.node.name}")
        for line in self.ctr(["images", "ls"]).stdout.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == ref:
                return next(p for p in parts if p.startswith("sha256:"))
        raise RemoraError(f"no digest for {ref} in containerd of {self.node.name}")

    def content_digests(self) -> set[str]:
        out = self.ctr(["content", "ls", "--quiet"]).stdout
        return set(out.split())

    def run_container(self, ref: str, argv: list[str], name: str, timeout: float = 120) -> str:
        """``ctr run --rm`` (runc, in the node's network namespace); returns stdout."""
        return self.ctr(["run", "--rm", "--net-host", ref, name] + argv, timeout=timeout).stdout

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()


def write_mirror_hosts(hosts_dir: Path, registry_host: str, mirror_url: str) -> Path:
    """containerd ``hosts.toml``: pull ``registry_host`` through ``mirror_url`` first, registry as fallback."""
    d = Path(hosts_dir) / registry_host
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(f"""server = "http://{registry_host}"

[host."{mirror_url}"]
  capabilities = ["pull", "resolve"]
""")
    return Path(hosts_dir)

