"""The checks every manifest read makes, without I/O (the core's registry client, the peer's async upstream
and the snapshotter's mirror-first store each read the body their own way, then call these).

* the size bound: at most :data:`MAX_MANIFEST_SIZE` bytes, the limit containerd and distribution use —
  refused from the declared ``Content-Length`` before reading, and from the bytes read (the caller
  reads at most ``MAX_MANIFEST_SIZE + 1``: a body that lies about its length is still bounded);
* the digest: by digest the bytes must hash to it; by tag, to the ``Docker-Content-Digest`` the server
  claims when it sends one in an algorithm we know (sha256, sha512). Who may be asked for a tag at all
  is the caller's rule.
"""
from __future__ import annotations

import hashlib
import re

from remora.errors import DigestMismatch, InvalidInput

MAX_MANIFEST_SIZE = 4 << 20
#: A digest the registry API accepts (the client validates references with it too).
DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")


def check_declared_length(content_length: str | int | None, what: str) -> None:
    """Refuse a manifest whose declared length (a header value, or None) is over the bound."""
    text = str(content_length).strip() if content_length is not None else ""
    if text.isdigit() and int(text) > MAX_MANIFEST_SIZE:
        raise InvalidInput(f"{what} is {int(text)} bytes, over the {MAX_MANIFEST_SIZE} byte limit")


def check_manifest(data: bytes, reference: str, header_digest: str, what: str) -> str:
    """The digest of ``data`` read for ``reference`` (a tag or a digest) once it passed both checks:
    ``reference`` itself when it is a digest, else the sha256 of the bytes. ``header_digest`` is the
    server's ``Docker-Content-Digest`` ("" when it sent none). Raises :class:`InvalidInput` for a body
    over the bound and :class:`DigestMismatch` for bytes that are not what was asked or claimed."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise InvalidInput(f"{what} is over the {MAX_MANIFEST_SIZE} byte limit")
    if DIGEST_RE.match(reference):
        actual = hash_digest(data, reference.split(":", 1)[0])
        if actual != reference:
            raise DigestMismatch(what, reference, actual)
        return reference
    digest = hash_digest(data, "sha256")
    if DIGEST_RE.match(header_digest):
        claimed = hash_digest(data, header_digest.split(":", 1)[0])
        if claimed != header_digest:
            raise DigestMismatch(f"{what} (the server's Docker-Content-Digest)", header_digest, claimed)
    return digest


def hash_digest(data: bytes, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of ``data``."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
