"""Talking to OCI registries: the client (:mod:`.client`), credentials (:mod:`.auth`) and the I/O-free
auth rules both registry clients share (:mod:`.authcore`).

``from remora.registry import RegistryClient`` is the entry point for every component. The names are
resolved lazily so that importing this package (or a CLI ``register``) does not pay for requests
(~0.1-0.3 s).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "RegistryClient": "remora.registry.client",
    "BlobStream": "remora.registry.client",
    "MANIFEST_MEDIA_TYPES": "remora.registry.client",
    "Credentials": "remora.registry.auth",
    "load_credentials": "remora.registry.auth",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'remora.registry' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
