"""The client side of a peer's task API (``POST/GET/DELETE /api/v1/tasks``): wire names and a small
synchronous client.

It lives in the core because two components speak it: ``remora peer preheat`` (the peer's own CLI) and
``remora place plan --preheat`` (the placement planner); the server side is
:mod:`remora.plugins.peer.preheat`. Components reach each other only through the core.
"""
from __future__ import annotations

import os
from typing import overload

from remora.errors import InvalidInput


@overload
def load_token(path: None) -> None: ...
@overload
def load_token(path: str | os.PathLike[str]) -> str: ...
def load_token(path: str | os.PathLike[str] | None) -> str | None:
    """The preheat token from ``path`` (first line, stripped); None when no path is configured."""
    if path is None:
        return None
    from pathlib import Path

    from remora.errors import UsageError
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read --preheat-token-file {path}: {exc.strerror or exc}") from None
    if len(token) < 16:
        raise UsageError(f"--preheat-token-file {path}: the token must be at least 16 characters")
    return token


class PreheatClient:
    """A small synchronous client of one peer's task API (requests, no environment proxy)."""

    def __init__(self, address: str, token: str, timeout: float = 10.0):
        import requests

        self.url = (address if address.startswith(("http://", "https://")) else f"http://{address}").rstrip("/")
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def _call(self, method: str, path: str, **kw):
        import requests

        from remora.errors import AuthError, NotFound, RegistryError
        try:
            r = self.http.request(method, self.url + path, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            raise RegistryError(f"cannot reach the peer at {self.url}: {exc.__class__.__name__} (is `remora peer` "
                                "running there? --address is its mirror listener)") from None
        try:
            body = r.json() if r.content else {}
        except ValueError:
            body = {"error": r.text[:200]}
        if r.status_code in (401, 403):
            raise AuthError(f"peer {self.url} refused the preheat request: {body.get('error', r.status_code)}")
        if r.status_code == 404:
            raise NotFound(f"peer {self.url}: {body.get('error', 'not found')}")
        if r.status_code == 400:
            raise InvalidInput(f"peer {self.url}: {body.get('error')}")
        if r.status_code >= 300 and r.status_code != 409:
            raise RegistryError(f"peer {self.url}: HTTP {r.status_code} {body.get('error', '')}")
        return body

    def create(self, task_id: str, image: str, want_all: bool, pull: bool = False) -> dict:
        """Start a preheat; ``pull``: then have the node's snapshotter pull the image into containerd
        (sent only when asked, so a peer older than the field still takes the plain preheat)."""
        body = {"id": task_id, "type": "preheat", "image": image, "all": want_all}
        if pull:
            body["pull"] = True
        return self._call("POST", "/api/v1/tasks", json=body)

    def get(self, task_id: str) -> dict:
        return self._call("GET", f"/api/v1/tasks/{task_id}")

    def cancel(self, task_id: str) -> None:
        self._call("DELETE", f"/api/v1/tasks/{task_id}")


def new_task_id(prefix: str = "cli") -> str:
    import uuid

    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def read_token(path, env: str = "REMORA_PREHEAT_TOKEN") -> str:
    """The token for a client: ``path`` when given, else ``$REMORA_PREHEAT_TOKEN``."""
    import os

    from remora.errors import UsageError
    if path is not None:
        return load_token(path)
    token = os.environ.get(env, "").strip()
    if not token:
        raise UsageError(f"the peer's preheat token is needed: --preheat-token-file FILE or ${env}")
    return token


def progress_of(status: dict) -> tuple[int, int]:
    """(verified bytes, total bytes) of a task status."""
    blobs = status.get("blobs") or []
    return (sum(int(b.get("verified_bytes", 0)) for b in blobs), sum(int(b.get("size", 0)) for b in blobs))
