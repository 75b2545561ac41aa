"""Content digests: compute, validate, and verify while streaming.

Every byte remora serves or stores is checked against the digest it was addressed by. The
:class:`VerifyingReader` makes that cheap for streams: it hashes as data passes through and fails at
EOF (before the caller can commit anything) when the bytes are wrong or the stream is short or long.
"""
from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import BinaryIO

from remora.errors import DigestMismatch, InvalidInput

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")
CHUNK = 1 << 20


def validate_digest(s: str) -> str:
    """Return ``s`` if it is a well-formed ``sha256:<64 hex>`` / ``sha512:<128 hex>`` digest.

    Lower-case hex only, as the OCI spec requires for these algorithms; anything else raises
    :class:`InvalidInput` (digests end up in file paths, so this is also a path-safety check).
    """
    if not isinstance(s, str):
        raise InvalidInput(f"digest must be a string, got {type(s).__name__}")
    m = _DIGEST_RE.fullmatch(s)
    if not m:
        raise InvalidInput(f"malformed digest {s!r}: expected sha256:<64 lower-case hex chars>")
    if len(m.group(2)) != _ALGORITHMS[m.group(1)]:
        raise InvalidInput(f"malformed digest {s!r}: wrong length for {m.group(1)}")
    return s


def split_digest(s: str) -> tuple[str, str]:
    """``"sha256:ab.."`` -> ``("sha256", "ab..")`` after validation."""
    algo, _, hexpart = validate_digest(s).partition(":")
    return algo, hexpart


def new_hasher(digest: str = "sha256:"):
    """A hashlib object for the algorithm of ``digest`` (default sha256)."""
    return hashlib.new(digest.partition(":")[0] or "sha256")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hash_file(path: str | Path, algorithm: str = "sha256") -> tuple[str, int]:
    """Return ``(digest, size)`` of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return f"{algorithm}:{h.hexdigest()}", size


def verify_bytes(data: bytes, expected: str, what: str = "blob") -> bytes:
    """Return ``data`` if it hashes to ``expected``; raise :class:`DigestMismatch` otherwise."""
    h = new_hasher(validate_digest(expected))
    h.update(data)
    actual = f"{expected.partition(':')[0]}:{h.hexdigest()}"
    if actual != expected:
        raise DigestMismatch(what, expected, actual)
    return data


class VerifyingReader(io.RawIOBase):
    """A read-only stream that hashes what passes through and checks it at EOF.

    - More bytes than ``expected_size`` -> :class:`InvalidInput` as soon as the excess is seen
      (we never hand out bytes beyond the declared size).
    - EOF before ``expected_size`` -> :class:`InvalidInput` ("truncated").
    - EOF with the wrong digest -> :class:`DigestMismatch`.

    The error is raised from the ``read`` that hits EOF, so a consumer that writes to a temp file
    and renames only after reading to EOF never commits bad data. ``close`` closes the wrapped
    stream. ``verified`` becomes True once the whole content checked out.
    """

    def __init__(self, fileobj: BinaryIO, expected_digest: str, expected_size: int | None = None,
                 what: str | None = None):
        super().__init__()
        self._f = fileobj
        self.expected_digest = validate_digest(expected_digest)
        self.expected_size = expected_size
        self._hash = new_hasher(expected_digest)
        self.bytes_read = 0
        self.verified = False
        self._what = what or f"blob {expected_digest}"

    def readable(self) -> bool:
        return True

    def _finish(self) -> None:
        if self.verified:
            return
        if self.expected_size is not None and self.bytes_read != self.expected_size:
            raise InvalidInput(f"{self._what}: truncated: got {self.bytes_read} of {self.expected_size} bytes")
        actual = f"{self.expected_digest.partition(':')[0]}:{self._hash.hexdigest()}"
        if actual != self.expected_digest:
            raise DigestMismatch(self._what, self.expected_digest, actual)
        self.verified = True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        if size == 0:
            return b""
        if self.expected_size is not None:
            # Ask for one byte past the declared end when we are there, to detect over-long streams.
            remaining = self.expected_size - self.bytes_read
            size = min(size, remaining) if remaining > 0 else 1
        data = self._f.read(size)
        if not data:
            self._finish()
            return b""
        self.bytes_read += len(data)
        if self.expected_size is not None and self.bytes_read > self.expected_size:
            raise InvalidInput(f"{self._what}: more data than the declared {self.expected_size} bytes")
        self._hash.update(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        if not self.closed:
            try:
                self._f.close()
            finally:
                super().close()
