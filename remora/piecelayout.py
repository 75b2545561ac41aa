"""The piece layout of a blob: the mesh's one rule that peers and schedulers must agree on.

A blob is cut into pieces of one size, a power of two chosen from the blob's size alone, so every
peer (seed or child) and every scheduler derives the same layout before anyone has said anything about
it (docs/p2p.md, "Pieces and the store"). It lives in the core because both components use it: the peer
to cut and check pieces, the scheduler to check what peers report.
"""
from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB

#: Piece sizes are powers of two between these bounds (see :func:`piece_size_for`).
MIN_PIECE_SIZE = 256 * KiB
MAX_PIECE_SIZE = 16 * MiB
#: Aim for about this many pieces per blob: enough to spread a blob over several parents, few enough
#: that per-piece overhead (one request, one file, one digest) stays negligible. A piece is relayed only
#: once a child has all of it, so its size is the delay each hop of the swarm adds (1 MiB: 84 ms at
#: 100 Mbit/s): in benchmarks/bench_p2p_mesh.py (200 MB, 8 nodes) pieces reached the children a median 1.5 s
#: after the seed got them with 1 MiB pieces, 2.4 s with 2 MiB, 3.5 s with 4 MiB (64 per blob, before).
TARGET_PIECES = 256
#: The bounds in force (the manager's dynamic config may narrow them within the hard limits above; the
#: peers and the schedulers of a cluster apply the same config version, so they keep agreeing).
_bounds = [MIN_PIECE_SIZE, MAX_PIECE_SIZE]


def set_piece_bounds(low: int, high: int) -> tuple[int, int]:
    """Narrow the piece sizes to [low, high], clamped to the hard limits; returns what is in force."""
    low = min(max(low, MIN_PIECE_SIZE), MAX_PIECE_SIZE)
    high = min(max(high, low), MAX_PIECE_SIZE)
    _bounds[:] = [low, high]
    return low, high


def piece_bounds() -> tuple[int, int]:
    return _bounds[0], _bounds[1]


def piece_size_for(content_length: int) -> int:
    """The piece size of a blob: a power of two chosen from its size alone (within the bounds in force).

    Being a pure function of the size means every peer, seed or child, derives the same piece layout
    even before the scheduler has told it anything.
    """
    size, top = _bounds
    while size < top and size * TARGET_PIECES < content_length:
        size *= 2
    return size
