"""Configuration of one peer daemon, and the small parsers its command line needs.

Everything a peer does is decided here, from flags, so that a peer can run unchanged in a network
namespace of the lab, a DaemonSet pod or a test on loopback.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import uuid
from pathlib import Path

from remora.errors import UsageError
from remora.piecelayout import (  # noqa: F401 - the piece layout rule, re-exported for the peer's modules
    MAX_PIECE_SIZE,
    MIN_PIECE_SIZE,
    TARGET_PIECES,
    piece_bounds,
    piece_size_for,
    set_piece_bounds,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: The header of the seed's 503 meaning "this fresh piece went to another child: get it from the children"
#: (upload.py sends it, download.py understands it).
RELAYED_HEADER = "X-Remora-Relayed"
#: How many uploads the parent serves, this one included: its uplink is shared among them, so the child
#: allows the piece that much longer before calling the parent crawling.
UPLOADS_HEADER = "X-Remora-Uploads"


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 1024 * GiB, "tb": 1024 * GiB, "tib": 1024 * GiB}


def parse_size(text: str) -> int:
    """``"10GiB"`` -> bytes. Units are binary (k = 1024), as for every size remora prints."""
    m = _SIZE_RE.match(str(text))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise UsageError(f"bad size {text!r}: use a number with an optional unit (KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


@dataclasses.dataclass(frozen=True)
class Watermark:
    """A disk threshold: either bytes used by the store, or a percentage of the filesystem in use."""

    bytes: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str) -> Watermark:
        text = str(text).strip()
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                raise UsageError(f"bad watermark {text!r}") from None
            if not 0 < pct <= 100:
                raise UsageError(f"watermark {text!r} must be between 0% and 100%")
            return cls(percent=pct)
        return cls(bytes=parse_size(text))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"{self.bytes} bytes"


def parse_duration(text: str) -> float:
    """``"30s"``, ``"200ms"``, ``"24h"``, ``"7d"`` -> seconds."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", str(text))
    if not m:
        raise UsageError(f"bad duration {text!r}: use e.g. 200ms, 30s, 10m, 24h, 7d")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``"10.0.0.7:65001"`` / ``"[::1]:65001"`` / ``":65001"`` -> ``(host, port)``.

    An empty host stays empty: the daemon picks loopback (mirror) or the node's address (upload), never
    every address; ``0.0.0.0`` must be written out by whoever wants it."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not port:
        if default_port is None:
            raise UsageError(f"address {text!r} needs a port (HOST:PORT)")
        port = str(default_port)
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"bad port in address {text!r}")
    return host, int(port)


def parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"bad label {item!r}: use KEY=VALUE (e.g. zone=eu-1a)")
        labels[key.strip()] = value.strip()
    return labels


def default_host_id() -> str:
    """A stable id per machine: two peers on one host must never be chosen as each other's parent."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value:
            return f"{socket.gethostname()}-{value[:12]}"
    return socket.gethostname()


@dataclasses.dataclass
class PeerConfig:
    data_dir: Path
    listen: tuple[str, int] = ("127.0.0.1", 65001)          # mirror API for containerd (+ /metrics, status)
    upload_listen: tuple[str, int] = ("", 65002)            # piece server for other peers; "" = advertised
                                                            # address, else the route to the scheduler, else
                                                            # loopback (never 0.0.0.0 unless asked)
    advertise_ip: str = ""                                  # address other peers dial; "" = guess
    advertise_port: int = 0                                 # 0 = the upload port actually bound
    schedulers: list[str] = dataclasses.field(default_factory=list)   # "host:port" gRPC addresses
    upstream: str = ""                                      # default registry when no ?ns= and no header
    registries: list[str] = dataclasses.field(default_factory=list)   # ?ns= allow-list (+ upstream)
    plain_http: list[str] = dataclasses.field(default_factory=list)   # registries spoken to over http
    registry_config: Path | None = None                     # docker config.json with this node's credentials
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    host_id: str = dataclasses.field(default_factory=default_host_id)
    peer_id: str = ""
    upload_slots: int = 16
    upload_bandwidth: int = 0
    concurrency: int = 8                                    # pieces fetched at once per task
    piece_timeout: float = 10.0                             # floor of the per-piece deadline
    min_piece_rate: int = 1 * MiB                           # slower than this (bytes/s) counts as crawling
    max_parent_failures: int = 6                            # failed parents before back-to-source
    scheduler_timeout: float = 2.0                          # per scheduler RPC
    upstream_timeout: float = 30.0
    gc_ttl: float = 24 * 3600.0
    gc_high: Watermark = dataclasses.field(default_factory=lambda: Watermark(percent=85.0))
    gc_low: Watermark = dataclasses.field(default_factory=lambda: Watermark(percent=75.0))
    gc_interval: float = 60.0
    offline_tag_max_age: float = 24 * 3600.0                # a kept tag record serves this long offline (offline.py)
    tls_dir: Path | None = None                             # ca.pem + cert.pem + key.pem: mutual TLS mesh
    insecure_plain_mesh: bool = False                       # explicit plain mode (no TLS between peers)
    preheat_token_file: Path | None = None                  # bearer token of the preheat task API (preheat.py)
    # A preheat with "pull": the node's snapshotter pull service, and the containerd it pulls into (preheat.py)
    runtime_pull_api: Path | None = None
    runtime_address: str = "/run/containerd/containerd.sock"
    runtime_namespace: str = "k8s.io"
    runtime_snapshotter: str = "remora"
    manager: str = ""                                       # manager URL: schedulers + dynamic config from it
    manager_token_file: Path | None = None                  # the manager's join token
    seed_peer: bool = False                                 # register with the manager as a seed peer
    idc: str = ""                                           # scopes the manager matches clusters by
    location: str = ""

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.peer_id:
            self.peer_id = f"{self.host_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if (self.gc_high.percent is None) != (self.gc_low.percent is None):
            raise UsageError("--gc-high and --gc-low must both be percentages or both be sizes")
        hi = self.gc_high.percent if self.gc_high.percent is not None else self.gc_high.bytes
        lo = self.gc_low.percent if self.gc_low.percent is not None else self.gc_low.bytes
        if lo > hi:
            raise UsageError(f"--gc-low ({self.gc_low}) must not exceed --gc-high ({self.gc_high})")
        if self.tls_dir is None and not self.insecure_plain_mesh:
            raise UsageError("the peer needs mutual TLS with the other peers and the scheduler (--tls-dir DIR with "
                             "ca.pem, cert.pem, key.pem from 'remora certs issue --role peer') or, knowingly, "
                             "--insecure-plain-mesh")
        if self.tls_dir is not None and self.insecure_plain_mesh:
            raise UsageError("--tls-dir and --insecure-plain-mesh exclude each other")
        if self.tls_dir is not None:
            self.tls_dir = Path(self.tls_dir)
        if self.runtime_pull_api is not None:
            self.runtime_pull_api = Path(self.runtime_pull_api)
            if not self.runtime_pull_api.is_absolute() or not os.path.isabs(self.runtime_address):
                raise UsageError("--runtime-pull-api and --runtime-address must be absolute paths (unix sockets)")
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,75}$", self.runtime_namespace):
                raise UsageError(f"--runtime-namespace {self.runtime_namespace!r}: not a containerd namespace name")
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", self.runtime_snapshotter):
                raise UsageError(f"--runtime-snapshotter {self.runtime_snapshotter!r}: not a snapshotter name")
        if self.manager:
            if not re.match(r"^https?://[^/\s]+/?$", self.manager):
                raise UsageError(f"--manager {self.manager!r}: expected https://HOST:PORT (or http:// with "
                                 "--insecure-plain-mesh)")
            if self.manager.startswith("https://") and self.tls_dir is None:
                raise UsageError("an https:// manager needs --tls-dir (the node's member certificate)")
            if self.manager.startswith("http://") and self.tls_dir is not None:
                raise UsageError("with --tls-dir the manager is reached over mutual TLS: use an https:// URL")
            if self.manager_token_file is None:
                raise UsageError("--manager needs --manager-token-file (a join token: 'remora cluster join-token')")
        elif self.seed_peer:
            raise UsageError("--seed-peer needs --manager")
