"""A private containerd 2.1 (Debian sid, unpacked by scripts/fetch-newer-runtimes.sh) for interop tests.

Why a second class: containerd 2.x reads config ``version = 3`` (new plugin IDs for CRI,
``io.containerd.cri.v1.images``), pulls through the Transfer service by default (which unpacks only
for the platform/snapshotter pairs listed in ``unpack_config``) and passes the ``cri.*`` snapshot labels
to a proxy snapshotter only when the plugin exports ``enable_remote_snapshot_annotations = "true"``.
Everything else -- ``ctr()``, stop by PID, removing the namespace's cgroups -- is
:class:`remora_testing.containerd.PrivateContainerd`'s, which this class subclasses.

Isolation from the host and from other tests: root, state, ``opt``, the sockets, NRI (disabled: it
would share ``/var/run/nri/nri.sock``), the CRI registry ``config_path`` and the containerd namespace are
all private. The daemon runs with ``PATH`` starting at the 2.1 tree so the matching
``containerd-shim-runc-v2`` is picked (Debian 12's 1.6 shim sits in /usr/bin); runc stays bookworm's.

Example::

    with PrivateContainerd2(tmp / "ctd2", snap.address) as ctd:
        ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "remora", ref)
        ctd.ctr("run", "--rm", "--snapshotter", "remora", ref, "c1", "echo", "hi")
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from remora.errors import NotFound
from remora_testing.containerd import PrivateContainerd

RUNTIMES_DIR = Path(os.environ.get("REMORA_RUNTIMES_DIR", "/opt/remora-runtimes"))
CONTAINERD2_DIR = RUNTIMES_DIR / "containerd2"
RUNC_STATE = Path("/run/containerd/runc")  # runc's --root for every containerd: per-namespace dirs


def containerd2_bin_dir() -> Path:
    """The directory holding containerd 2.1's ``containerd``, ``ctr`` and shim, or a clear error."""
    bindir = CONTAINERD2_DIR / "usr" / "bin"
    if not (bindir / "containerd").is_file():
        raise NotFound(f"containerd 2.x not found under {CONTAINERD2_DIR}: run scripts/fetch-newer-runtimes.sh")
    return bindir


class PrivateContainerd2(PrivateContainerd):
    """containerd 2.1 of our own; same constructor as :class:`PrivateContainerd` plus:

    ``unpack_platform``: the platform the Transfer service unpacks for (one ``unpack_config`` entry is
    written for the default ``overlayfs`` snapshotter and one for the proxy snapshotter, so both
    ``ctr images pull`` and ``ctr images pull --snapshotter remora`` unpack).
    ``remote_snapshot_annotations``: the proxy plugin's ``enable_remote_snapshot_annotations`` export
    (True: Transfer and CRI pulls pass ``cri.*`` labels, which remora's remote path needs).
    ``registry_mirrors`` (CRI only): ``{"127.0.0.1:5000": "http://127.0.0.1:5000"}`` becomes a
    ``hosts.toml`` under ``<base_dir>/certs.d``, the only registry configuration CRI 2.x reads.
    """

    def __init__(self, base_dir: Path | str, snapshotter_socket: Path | str | None = None, *,
                 snapshotter_name: str = "remora", cri: bool = False,
                 registry_mirrors: Mapping[str, str] | None = None, namespace: str | None = None,
                 unpack_platform: str = "linux/amd64", remote_snapshot_annotations: bool = True,
                 extra_config: str = ""):
        bindir = containerd2_bin_dir()
        super().__init__(base_dir, snapshotter_socket, snapshotter_name=snapshotter_name, cri=cri,
                         registry_mirrors=registry_mirrors, namespace=namespace,
                         containerd=str(bindir / "containerd"), ctr=str(bindir / "ctr"),
                         extra_config=extra_config)
        self.bin_dir = bindir
        self.unpack_platform = unpack_platform
        self.remote_snapshot_annotations = remote_snapshot_annotations
        self.certs_dir = self.base_dir / "certs.d"
        self._namespaces = {self.namespace}

    def ctr(self, *args: str, namespace: str | None = None, **kw):
        """As :meth:`PrivateContainerd.ctr`. Namespaces named ``<self.namespace>-<suffix>`` are ours too:
        close() cleans up after them (shared ones such as ``k8s.io`` are left alone)."""
        if namespace and namespace.startswith(self.namespace + "-"):
            self._namespaces.add(namespace)
        return super().ctr(*args, namespace=namespace, **kw)

    def config_text(self) -> str:
        q = json.dumps  # TOML basic strings accept JSON string escapes
        disabled = [] if self.cri else ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images",
                                        "io.containerd.cri.v1.runtime"]
        lines = [
            "version = 3",
            f"root = {q(str(self.root))}",
            f"state = {q(str(self.state))}",
            f"disabled_plugins = {q(disabled)}",
            "[grpc]",
            f"  address = {q(str(self.address))}",
            "[ttrpc]",
            f"  address = {q(str(self.address) + '.ttrpc')}",
            "[debug]",
            '  level = "info"',
            "[plugins.'io.containerd.internal.v1.opt']",
            f"  path = {q(str(self.base_dir / 'opt'))}",
            "[plugins.'io.containerd.nri.v1.nri']",
            "  disable = true",
            "[plugins.'io.containerd.image-verifier.v1.bindir']",
            f"  bin_dir = {q(str(self.base_dir / 'image-verifier'))}",
        ]
        snapshotters = ["overlayfs"] + ([self.snapshotter_name] if self.snapshotter_socket else [])
        for name in snapshotters:
            lines += ["[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]",
                      f"  platform = {q(self.unpack_platform)}", f"  snapshotter = {q(name)}"]
        if self.cri:
            lines += self._cri_lines()
        if self.snapshotter_socket:
            lines += [f"[proxy_plugins.{q(self.snapshotter_name)}]", '  type = "snapshot"',
                      f"  address = {q(str(self.snapshotter_socket))}"]
            if self.remote_snapshot_annotations:
                lines += [f"[proxy_plugins.{q(self.snapshotter_name)}.exports]",
                          '  enable_remote_snapshot_annotations = "true"']
        return "\n".join(lines) + "\n" + self.extra_config

    def _cri_lines(self) -> list[str]:
        q = json.dumps
        return [
            "[plugins.'io.containerd.cri.v1.images']",
            f"  snapshotter = {q(self.snapshotter_name if self.snapshotter_socket else 'overlayfs')}",
            "  disable_snapshot_annotations = false",
            "[plugins.'io.containerd.cri.v1.images'.registry]",
            f"  config_path = {q(str(self.certs_dir))}",
            "[plugins.'io.containerd.cri.v1.runtime']",
            "  enable_cdi = false",
            "[plugins.'io.containerd.cri.v1.runtime'.cni]",
            f"  bin_dirs = [{q(str(self.base_dir / 'cni' / 'bin'))}]",
            f"  conf_dir = {q(str(self.base_dir / 'cni' / 'conf'))}",
            "[plugins.'io.containerd.grpc.v1.cri']",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
        ]

    def _write_hosts(self) -> None:
        """One ``certs.d/<host>/hosts.toml`` per mirror: CRI 2.x has no inline mirror table any more."""
        for host, endpoint in self.registry_mirrors.items():
            d = self.certs_dir / host
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts.toml").write_text(f"server = {json.dumps(endpoint)}\n"
                                          f"[host.{json.dumps(endpoint)}]\n"
                                          '  capabilities = ["pull", "resolve"]\n')

    label = "containerd 2"

    def prepare_files(self) -> None:
        self._write_hosts()

    def daemon_env(self) -> dict[str, str]:
        return dict(os.environ, PATH=f"{self.bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}")

    def close(self) -> None:
        """Stop, then remove the socket dir and, for every namespace ctr() used, the empty cgroups and
        runc state directory that containers leave behind."""
        super().close()
        for ns in self._namespaces:
            remove_namespace_leftovers(ns)


def remove_namespace_leftovers(namespace: str, cgroup_name: str | None = None) -> None:
    """Remove what runc leaves per containerd namespace after its containers are gone, if empty:
    /run/containerd/runc/<ns> (shared by every containerd on the host) and the cgroup directories
    named ``cgroup_name`` (default: the namespace) under each controller."""
    try:
        (RUNC_STATE / namespace).rmdir()
    except OSError:
        pass
    base = Path("/sys/fs/cgroup")
    name = cgroup_name or namespace
    for cg in [base / name, *base.glob(f"*/{name}")]:
        if not cg.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(cg), key=lambda t: len(t[0]), reverse=True):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
