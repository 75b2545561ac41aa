"""``remora peer hosts-toml``: containerd's per-registry hosts.toml pointing at the local peer.

For each registry, ``<dir>/<registry>/hosts.toml`` lists the peer's mirror first (pull and resolve)
and keeps the registry itself as ``server``, the fallback containerd uses when the mirror answers 404
or 5xx or cannot be dialed. A short ``dial_timeout`` bounds the cost of a dead peer to a fraction of a
second (containerd 1.7 and 2.x; 1.6 does not know the key, so it is left out for 1.6 and the kernel's
immediate "connection refused" on a local port is what makes the fallback fast there).

containerd appends ``?ns=<registry>`` to mirror requests; that is how the peer knows the upstream.
"""
from __future__ import annotations

import os
from pathlib import Path

from remora.errors import StorageError, UsageError

from .upstream import HUB_ALIASES

CONTAINERD_VERSIONS = ("1.6", "1.7", "2.x")

CONFIG_HINT = {
    "1.6": '[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "{dir}"',
    "1.7": '[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "{dir}"',
    "2.x": "[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = '{dir}'",
}


def registry_server(registry: str, plain_http: bool = False) -> str:
    host = HUB_ALIASES.get(registry, registry)
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    plain = plain_http or name in ("localhost", "127.0.0.1", "::1") or name.startswith("127.")
    return f"{'http' if plain else 'https'}://{host}"


def render(registry: str, mirror: str, containerd: str = "2.x", dial_timeout: str = "200ms",
           plain_http: bool = False) -> str:
    """The text of one hosts.toml (``registry == "_default"``: every registry without its own file)."""
    if containerd not in CONTAINERD_VERSIONS:
        raise UsageError(f"unknown containerd version {containerd!r}: use one of {', '.join(CONTAINERD_VERSIONS)}")
    if not mirror.startswith(("http://", "https://")):
        raise UsageError(f"mirror {mirror!r} must be a URL, e.g. http://127.0.0.1:65001")
    if containerd == "1.6" and registry == "_default":
        raise UsageError("containerd 1.6 has no _default hosts directory: name each registry")
    lines = [f"# Written by `remora peer hosts-toml` for containerd {containerd}: pull through the local",
             "# remora peer, fall back to the registry when the peer is down or answers 404/5xx."]
    if registry != "_default":
        lines.append(f'server = "{registry_server(registry, plain_http)}"')
    else:
        lines.append("# no `server`: the fallback is the registry named in each image reference (https)")
    lines += ["", f'[host."{mirror.rstrip("/")}"]', '  capabilities = ["pull", "resolve"]']
    if containerd != "1.6" and dial_timeout:
        lines.append(f'  dial_timeout = "{dial_timeout}"')
    return "\n".join(lines) + "\n"


def write(directory: Path, registries: list[str], mirror: str, containerd: str = "2.x",
          dial_timeout: str = "200ms", plain_http: list[str] | None = None) -> list[Path]:
    """Write one hosts.toml per registry, atomically; returns the paths written."""
    if not registries:
        raise UsageError("name at least one registry (e.g. --registry docker.io), or _default")
    written = []
    for registry in registries:
        text = render(registry, mirror, containerd, dial_timeout, registry in (plain_http or []))
        path = Path(directory) / registry / "hosts.toml"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(".hosts.toml.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
        written.append(path)
    return written
