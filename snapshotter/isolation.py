"""Cache isolation across tenants: may a lazily mounted layer of one tenant serve another's Prepare?

containerd's remote-snapshot handshake names a layer by its chain ID only (the ``snapshot.ref``
label), and that name is global in the snapshotter: when namespace B prepares a layer whose chain ID
namespace A has already committed remotely, the snapshotter answers ALREADY_EXISTS and containerd
links A's snapshot into B's namespace, so B's container runs on A's lazy mount, served from A's
cache partition. A chain ID is no secret (it is computed from the config's ``diff_ids``, and for a
remote layer containerd never checks a diff_id against content), so with ``--cache-isolation`` other
than ``none`` such a Prepare is allowed only when B could have fetched the whole image itself: its
registry serves, with B's credentials and in B's repository, the first byte of the bootstrap and of
every data blob the bootstrap reads from (a one-byte range GET, not a HEAD: the mirrors and proxies
in front of registries serve GETs, not always HEADs). Otherwise the Prepare fails (FAILED_PRECONDITION)
with the reason. An unreachable registry refuses too: here there is no lazy read to fall back to, only
another tenant's bytes.
"""
from __future__ import annotations

from pathlib import Path

from remora.errors import AuthError, NotFound, RemoraError


def prove_access(client, repo: str, bootstrap_digest: str, bootstrap: Path | str) -> None:
    """Raise :class:`PermissionError` unless ``client`` (a RegistryClient with the asking tenant's
    credentials) may read ``bootstrap_digest`` and every data blob of ``bootstrap`` in ``repo``."""
    from remora.format.bootstrap import Bootstrap

    bs = Bootstrap(bootstrap)
    try:
        blobs = list(bs.blobs)
    finally:
        close = getattr(bs, "close", None)
        if close is not None:
            close()
    for digest in [bootstrap_digest, *blobs]:
        try:
            client.get_blob_range(repo, digest, 0, 0)
        except NotFound:
            raise PermissionError(f"{client.host}/{repo} does not hold {digest}") from None
        except AuthError as exc:
            raise PermissionError(f"{client.host}/{repo} refuses {digest}: {exc}") from None
        except RemoraError as exc:
            raise PermissionError(f"cannot check {digest} in {client.host}/{repo}: {exc}") from None
