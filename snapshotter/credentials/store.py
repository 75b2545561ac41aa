"""An in-memory credential store, scoped per image repository, with expiry.

Why in memory: credentials captured from a CRI pull belong to one pod's imagePullSecrets; writing them
to a file would hand them to whoever can read that file later. They live in the snapshotter process
only and expire (``ttl``), so a pod deleted long ago does not keep lending its secret.

Why per repository: a node pulls for many tenants. Credentials captured for ``host/team-a/app`` are
used for exactly that host and repository, never for ``host/team-b/app`` (another tenant's secret must
not open a repository its own pod was not given), and never for another host.

Bounded: at most ``max_entries`` scopes (the least recently stored goes first).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

from remora.errors import UsageError
from remora.registry.auth import Credentials

DEFAULT_TTL = 3600.0
DEFAULT_MAX_ENTRIES = 4096
_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


def normalize_host(host: str) -> str:
    """``Registry-1.Docker.io`` -> ``docker.io``; ``localhost:5000`` and ``127.0.0.1:5000`` stay apart
    (they are the same server only by convention, and a scope must not widen by convention)."""
    h = host.strip().lower().rstrip("/")
    return "docker.io" if h in _DOCKER_HUB else h


def scope_of(image: str) -> tuple[str, str]:
    """``(host, repository)`` of an image reference, as the snapshotter's labels will name it."""
    from remora.reference import ImageRef, parse_reference

    ref = parse_reference(image)  # UsageError for what is not a reference
    if not isinstance(ref, ImageRef):
        raise UsageError(f"{image!r} is not a registry image reference")
    return normalize_host(ref.registry), ref.repository


class CredentialStore:
    """``put(image, creds)`` then ``get(host, repository)``; thread-safe."""

    def __init__(self, ttl: float = DEFAULT_TTL, max_entries: int = DEFAULT_MAX_ENTRIES, clock=time.monotonic):
        if ttl <= 0 or max_entries <= 0:
            raise UsageError("credential store: ttl and max_entries must be positive")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], tuple[Credentials, float]] = OrderedDict()

    def put(self, image: str, creds: Credentials, ttl: float | None = None) -> tuple[str, str]:
        """Remember ``creds`` for the repository of ``image`` (a reference); returns its scope."""
        scope = scope_of(image)
        expires = self._clock() + (self.ttl if ttl is None else ttl)
        with self._lock:
            self._entries.pop(scope, None)
            self._entries[scope] = (creds, expires)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return scope

    def get(self, host: str, repository: str) -> Credentials | None:
        """The credentials stored for exactly this host and repository, unless expired."""
        scope = (normalize_host(host), repository)
        with self._lock:
            entry = self._entries.get(scope)
            if entry is None:
                return None
            if entry[1] <= self._clock():
                del self._entries[scope]
                return None
            return entry[0]

    def forget(self, host: str, repository: str) -> None:
        with self._lock:
            self._entries.pop((normalize_host(host), repository), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
