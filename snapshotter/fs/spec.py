"""What a lazy-mount process needs to know, as one JSON file (the process boundary's contract).

The snapshotter writes a :class:`MountSpec` next to its mount state; the fs process reads it. The same
file is what a restarted snapshotter uses to find and restore its mounts, so it holds everything
needed to re-mount (it can contain registry credentials: written 0600).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from remora.errors import InvalidInput
from remora.snapshotter.sources import SourceSpec

DEFAULT_TIMEOUT = 24 * 3600.0  # entry/attr cache lifetime: the fs is immutable


@dataclass
class MountSpec:
    id: str
    bootstrap: str
    mountpoint: str
    cache_dir: str
    sources: list[SourceSpec]
    stats_file: str
    cache_limit: int = 10 << 30
    # the chunk cache partition this mount reads and writes (remora.cache; "" = shared): its tenant's
    cache_partition: str = ""
    prefetch: bool = True
    prefetch_all: bool = False
    max_gap: int = 256 << 10
    max_range: int = 16 << 20
    parallel: int = 4
    kernel_timeout: float = DEFAULT_TIMEOUT
    read_ahead_kb: int = 1024  # kernel readahead of the mount (FUSE default 128 KiB: 8x more requests)
    stats_interval: float = 1.0
    log_level: str = "INFO"
    # The bootstrap has not been validated yet: the fs process runs remora.format.validate on it
    # before it opens it or mounts anything, and writes its verdict ("ok" or "invalid: <why>") to
    # ``validation_file`` (off the snapshotter's CPU and GIL: docs/snapshotter.md).
    validate_bootstrap: bool = False
    validation_file: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MountSpec:
        try:
            raw = json.loads(text)
            raw["sources"] = [SourceSpec(**s) for s in raw["sources"]]
            return cls(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidInput(f"bad mount spec: {exc}") from None

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> MountSpec:
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as exc:
            raise InvalidInput(f"cannot read mount spec {path}: {exc}") from None
