"""Split file content into chunks: fixed size or content-defined (FastCDC 2020).

Chunking is per file (a chunk never spans two files), so a file that reappears unchanged in another
layer or image yields the same chunks whatever surrounds it. Fixed chunking is the default (see the
measurements in docs/format.md); FastCDC keeps chunk boundaries stable when bytes are inserted inside a
large file. Both stream: a multi-GB file is never held in memory, only one chunk at a time.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from remora.errors import InvalidInput, UsageError

MIN_CHUNK = 64 * 1024
MAX_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class ChunkingSpec:
    """How to chunk: ``algorithm`` is "fixed" or "cdc"; ``size`` the (average) chunk size."""

    algorithm: str = "fixed"
    size: int = 1024 * 1024

    def __post_init__(self) -> None:
        if self.algorithm not in ("fixed", "cdc"):
            raise UsageError(f"unknown chunking algorithm {self.algorithm!r} (use 'fixed' or 'cdc')")
        if not (MIN_CHUNK <= self.size <= MAX_CHUNK) or self.size & (self.size - 1):
            raise UsageError(f"chunk size must be a power of two between {MIN_CHUNK} and {MAX_CHUNK}, got {self.size}")

    @property
    def max_size(self) -> int:
        """The largest chunk this spec can produce (CDC chunks may exceed the average)."""
        return self.size if self.algorithm == "fixed" else self.size * 4

    @property
    def whole_file_max(self) -> int:
        """Files of at most this many bytes are one chunk (the converter reads them in one call)."""
        return self.size if self.algorithm == "fixed" else self.size // 4

    @classmethod
    def parse(cls, text: str) -> ChunkingSpec:
        """``"fixed"``, ``"cdc"``, ``"fixed:1M"``, ``"cdc:512K"``."""
        algo, _, size = text.partition(":")
        return cls(algo or "fixed", parse_size(size) if size else cls.size)

    def __str__(self) -> str:
        return f"{self.algorithm}:{format_size(self.size)}"

    def chunks(self, stream: BinaryIO, size: int) -> Iterator[bytes]:
        """Yield the chunks of exactly ``size`` bytes read from ``stream``.

        Raises :class:`InvalidInput` if the stream ends early (a tar that lies about a member size).
        """
        if self.algorithm == "fixed":
            yield from _fixed(stream, size, self.size)
        else:
            yield from _cdc(stream, size, self.size)


def read_exact(stream: BinaryIO, n: int) -> bytes:
    """Exactly ``n`` bytes of ``stream``; InvalidInput if it ends first."""
    data = stream.read(n)
    if len(data) != n:
        # some readers return short reads before EOF; keep reading
        parts = [data]
        got = len(data)
        while got < n:
            more = stream.read(n - got)
            if not more:
                raise InvalidInput(f"stream ended after {got} of {n} bytes (truncated input)")
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


def _fixed(stream: BinaryIO, size: int, chunk: int) -> Iterator[bytes]:
    left = size
    while left > 0:
        n = min(chunk, left)
        yield read_exact(stream, n)
        left -= n


class _Limited:
    """Exactly ``size`` bytes of ``stream``, erroring on early end (for FastCDC's stream reader)."""

    def __init__(self, stream: BinaryIO, size: int):
        self.stream, self.left = stream, size

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n < 0 else min(n, self.left)
        data = read_exact(self.stream, n)
        self.left -= len(data)
        return data


def _cdc(stream: BinaryIO, size: int, avg: int) -> Iterator[bytes]:
    if size <= avg // 4:  # below FastCDC's minimum a file is one chunk anyway
        if size:
            yield read_exact(stream, size)
        return
    from pyfastcdc.cy import FastCDC

    cdc = FastCDC(avg_size=avg, min_size=avg // 4, max_size=avg * 4)
    for chunk in cdc.cut_stream(_Limited(stream, size)):
        yield bytes(chunk.data)


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise UsageError(f"bad size {text!r} (examples: 512K, 1M, 4MiB)") from None


def format_size(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n % _UNITS[unit] == 0 and n >= _UNITS[unit]:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)
