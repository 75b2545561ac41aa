"""Which credentials the snapshotter uses for one image repository, in order.

1. credentials captured from the CRI pull of that very repository (:mod:`.criproxy`), so a pod's
   own imagePullSecrets win;
2. the keychains of the credentials config (``--credentials-config``): Kubernetes secrets by reference;
3. nothing here: the registry client then falls back to the node's own (``REMORA_USERNAME``,
   root's docker config and its helpers), as for every other remora command.

When none of these has credentials and the registry refuses anonymous access, the lazy mount fails
with :func:`missing_credentials_message` and containerd's pull fails with it: a remora image must
never fall back to a local layer, whose root fs would hold the bootstrap file, not the application.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from remora.errors import UsageError
from remora.registry.auth import Credentials

from .store import CredentialStore

log = logging.getLogger(__name__)


class CredentialResolver:
    def __init__(self, store: CredentialStore | None = None, keychains: Sequence = ()):
        self.store = store
        self.keychains = list(keychains)

    def resolve(self, host: str, repository: str) -> Credentials | None:
        if self.store is not None:
            creds = self.store.get(host, repository)
            if creds is not None:
                return creds
        for keychain in self.keychains:
            try:
                creds = keychain.lookup(host, repository)
            except Exception as exc:  # noqa: BLE001 - one broken source must not hide the others
                log.warning("credentials for %s/%s from %s: %s", host, repository, type(keychain).__name__, exc)
                continue
            if creds is not None:
                return creds
        return None


def missing_credentials_message(host: str, repository: str, cause: str = "") -> str:
    return (f"cannot mount {host}/{repository} lazily: the registry requires credentials and the remora "
            f"snapshotter has none that it accepts for this repository{f' ({cause})' if cause else ''}. "
            "Provide them by one of: kubelet --image-service-endpoint pointing at the snapshotter's "
            "--cri-proxy socket (the pod's imagePullSecrets are then captured per repository); "
            "'remora credential-provider' as a kubelet credential provider; a dockerconfigjson secret "
            "named in --credentials-config; or `docker login` / REMORA_USERNAME for the snapshotter "
            "on the node (docs/credentials.md)")


def load_config(path: str | Path) -> dict:
    """The credentials config: ``{"kubeconfig": PATH (else in-cluster), "secrets": ["ns/name", ...],
    "refresh": seconds}``, JSON or YAML."""
    from .kubesecrets import read_mapping

    path = Path(path)
    cfg = read_mapping(path, "credentials config")
    unknown = set(cfg) - {"kubeconfig", "secrets", "refresh", "context"}
    if unknown:
        raise UsageError(f"credentials config {path}: unknown keys {sorted(unknown)}")
    return cfg


def keychains_from_config(path: str | Path | None) -> list:
    """The keychains a credentials config names (none without a config)."""
    if not path:
        return []
    from .kubesecrets import KubeClient, SecretRef, SecretsKeychain

    cfg = load_config(path)
    refs = [SecretRef.parse(s) for s in cfg.get("secrets") or []]
    if not refs:
        return []
    client = (KubeClient.from_kubeconfig(cfg["kubeconfig"], cfg.get("context")) if cfg.get("kubeconfig")
              else KubeClient.in_cluster())
    return [SecretsKeychain(client, refs, refresh=float(cfg.get("refresh", 60)))]
