"""How a remora image is described in OCI manifests.

containerd forwards every layer annotation whose key starts with ``containerd.io/snapshot/`` to the
snapshotter's Prepare as a label, with no client help. So everything the snapshotter needs to mount a
remora image lazily is put there, on every layer of the remora manifest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from remora.errors import InvalidInput
from remora.format import FORMAT_VERSION

PREFIX = "containerd.io/snapshot/remora."
VERSION = PREFIX + "version"          # format version, on every layer
ROLE = PREFIX + "role"                # "blob" or "bootstrap"
BOOTSTRAP = PREFIX + "bootstrap"      # digest of the bootstrap layer, on every layer
BOOTSTRAP_SIZE = PREFIX + "bootstrap-size"
REPOSITORY = PREFIX + "repository"    # "host/repository" the image was pushed to (may be stale after a copy)
# On the data blob that holds the prefetch files (in prefetch order): how many bytes from its start a
# reader should fetch as soon as it sees the layer, before it has the bootstrap (the blob's size).
PREFETCH_BYTES = PREFIX + "prefetch-bytes"

# The bootstrap layer is a zstd-compressed tar with one member; data blobs are plain tar layers.
BOOTSTRAP_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"
BLOB_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
BOOTSTRAP_MEMBER = "remora/bootstrap.db"

# Manifest-level annotations.
MANIFEST_SOURCE = "dev.remora.image.source-digest"  # the OCI manifest this was converted from
MANIFEST_MARKER = VERSION                            # its presence marks a remora manifest in an index


@dataclass(frozen=True)
class LayerInfo:
    role: str
    bootstrap: str
    version: int


def layer_annotations(role: str, bootstrap_digest: str, bootstrap_size: int,
                      repository: str | None = None, prefetch_bytes: int = 0) -> dict[str, str]:
    out = {VERSION: str(FORMAT_VERSION), ROLE: role, BOOTSTRAP: bootstrap_digest, BOOTSTRAP_SIZE: str(bootstrap_size)}
    if repository:
        out[REPOSITORY] = repository
    if prefetch_bytes:
        out[PREFETCH_BYTES] = str(prefetch_bytes)
    return out


def prefetch_bytes(labels: dict[str, str]) -> int:
    """The ``remora.prefetch-bytes`` of a layer's labels; 0 when absent or not a positive integer
    (it is a hint: a bad value disables early fetching, never the mount)."""
    try:
        n = int(labels.get(PREFETCH_BYTES, "0"))
    except ValueError:
        return 0
    return max(n, 0)


def parse_labels(labels: dict[str, str]) -> LayerInfo | None:
    """Remora facts from layer annotations or snapshot labels; ``None`` if the layer is not remora's."""
    if VERSION not in labels:
        return None
    try:
        version = int(labels[VERSION])
    except ValueError:
        raise InvalidInput(f"bad {VERSION} label {labels[VERSION]!r}") from None
    if version != FORMAT_VERSION:
        raise InvalidInput(f"remora format version {version} is not supported (this remora reads {FORMAT_VERSION})")
    role, bootstrap = labels.get(ROLE, ""), labels.get(BOOTSTRAP, "")
    if role not in ("blob", "bootstrap") or not bootstrap.startswith("sha256:"):
        raise InvalidInput(f"incomplete remora labels: role={role!r} bootstrap={bootstrap!r}")
    return LayerInfo(role, bootstrap, version)


def is_remora_manifest(manifest: dict[str, Any]) -> bool:
    layers = manifest.get("layers") or []
    return bool(layers) and all(VERSION in (layer.get("annotations") or {}) for layer in layers)
