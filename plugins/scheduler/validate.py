"""Field-by-field validation of scheduler requests, before anything reaches the state.

Every peer on the network can call the scheduler, so nothing a request says is taken on trust: one
AnnouncePieces with ``content_length`` 2^40 and ``piece_size`` 1 once made the scheduler allocate until
MemoryError (and broke the task for everybody afterwards). The rules here bound every length, count and
number a request carries, and tie the piece layout to the one rule every peer uses
(:func:`remora.plugins.peer.config.piece_size_for`): a blob's piece size is a pure function of its size, so
a layout that disagrees with it is a lie, not a different opinion. A request that breaks a rule is answered
INVALID_ARGUMENT with a message naming the field (:class:`BadRequest`); nothing of it is kept.

Pure functions of the request (and of the task's already known layout), no I/O: fuzzed directly in
tests/fuzz/test_fuzz_mesh.py.
"""
from __future__ import annotations

import ipaddress
import re

from remora.piecelayout import MAX_PIECE_SIZE, MIN_PIECE_SIZE, piece_size_for

#: The largest blob the mesh handles (1 TiB): with the piece-size rule that is at most MAX_PIECES pieces.
MAX_CONTENT_LENGTH = 1 << 40
MAX_PIECES = -(-MAX_CONTENT_LENGTH // MAX_PIECE_SIZE)          # 65,536
MAX_ID = 255                 # peer and host ids (a generated one is ~90 characters)
MAX_LABELS = 32
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 255
MAX_EXCLUDE = 1024           # peer ids a child blocklisted in one task
MAX_TRANSFERS = 256          # piece requests a child reports running to parents (it runs ~8, plus endgame)
MAX_RESULTS = 4096           # piece results in one report (a peer flushes every 16)
MAX_PROBES = 1024
MAX_LIMIT = 64               # parents asked for
MAX_SEEDING = 1024           # blobs a peer says it fetches from the registry at once (its tasks are capped so)
MAX_ERROR = 1024             # free-text error strings (kept only in logs)

TASK_ID_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
PIECE_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
ID_RE = re.compile(rf"^[\x21-\x7e]{{1,{MAX_ID}}}$")            # printable ASCII, no space


class BadRequest(ValueError):
    """A request field breaks a rule: INVALID_ARGUMENT, with this message."""


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def task_id(value: str) -> str:
    if not value:
        raise BadRequest("task_id is required")
    if not TASK_ID_RE.match(value):
        raise BadRequest(f"task_id must be a blob digest 'sha256:<64 lowercase hex>', got {_show(value)}")
    return value


def ident(value: str, what: str, required: bool = True) -> str:
    if not value:
        if required:
            raise BadRequest(f"{what} is required")
        return value
    if not ID_RE.match(value):
        raise BadRequest(f"{what} must be 1-{MAX_ID} printable ASCII characters without spaces, got {_show(value)}")
    return value


def host(h) -> None:
    """A ``PeerHost``: ids, address, port and labels."""
    ident(h.peer_id, "host.peer_id")
    ident(h.host_id, "host.host_id", required=False)
    if h.ip:
        try:
            ipaddress.ip_address(h.ip)
        except ValueError:
            raise BadRequest(f"host.ip must be an IP address, got {_show(h.ip)}") from None
    if h.upload_port > 65535:
        raise BadRequest(f"host.upload_port {h.upload_port} is not a TCP port")
    if len(h.labels) > MAX_LABELS:
        raise BadRequest(f"host.labels: {len(h.labels)} labels, at most {MAX_LABELS}")
    for k, v in h.labels.items():
        if not k or len(k) > MAX_LABEL_KEY or len(v) > MAX_LABEL_VALUE:
            raise BadRequest(f"host.labels: label {_show(k)} too long or empty (key <= {MAX_LABEL_KEY}, "
                             f"value <= {MAX_LABEL_VALUE} characters)")


def layout(content_length: int, piece_size: int) -> tuple[int, int]:
    """``(content_length, piece_size)`` checked against the piece-size rule; 0 = not given. A length
    without a piece size gets the rule's piece size."""
    if content_length > MAX_CONTENT_LENGTH:
        raise BadRequest(f"content_length {content_length} exceeds the mesh's limit of {MAX_CONTENT_LENGTH} bytes")
    if piece_size and (piece_size & (piece_size - 1) or not MIN_PIECE_SIZE <= piece_size <= MAX_PIECE_SIZE):
        raise BadRequest(f"piece_size {piece_size} must be a power of two between {MIN_PIECE_SIZE} and "
                         f"{MAX_PIECE_SIZE}")
    if content_length:
        expected = piece_size_for(content_length)
        if piece_size and piece_size != expected:
            raise BadRequest(f"piece_size {piece_size} does not match the blob size {content_length} "
                             f"(its piece size is {expected})")
        piece_size = expected
    return content_length, piece_size


def n_pieces(content_length: int, piece_size: int) -> int:
    return -(-content_length // piece_size) if content_length and piece_size else 0


def pieces(values, what: str, total: int) -> list[int]:
    """Piece indexes: fewer than the layout's pieces (or MAX_PIECES while it is unknown), no more of them
    than that."""
    bound = total or MAX_PIECES
    if len(values) > bound:
        raise BadRequest(f"{what}: {len(values)} piece indexes for a blob of at most {bound} pieces")
    out = list(values)
    for v in out:
        if v >= bound:
            raise BadRequest(f"{what}: piece index {v} out of range (the blob has {bound} pieces)")
    return out


def piece_digests(values, total: int) -> list[str]:
    """One entry per piece ("" = not hashed yet), each ``sha256:<64 hex>``; only with a known layout."""
    if not values:
        return []
    if not total:
        raise BadRequest("piece_digests need the blob's layout (content_length) first")
    if len(values) != total:
        raise BadRequest(f"piece_digests: {len(values)} entries for a blob of {total} pieces")
    out = list(values)
    for i, d in enumerate(out):
        if d and not PIECE_DIGEST_RE.match(d):
            raise BadRequest(f"piece_digests[{i}] must be 'sha256:<64 lowercase hex>' or empty, got {_show(d)}")
    return out


def transfers(values, total: int) -> list[tuple[str, int]]:
    """(parent id, piece) of the piece requests a child has running: bounded, ids and pieces checked."""
    if len(values) > MAX_TRANSFERS:
        raise BadRequest(f"transfers: {len(values)} entries, at most {MAX_TRANSFERS}")
    bound = total or MAX_PIECES
    out = []
    for t in values:
        ident(t.parent_id, "transfers[].parent_id")
        if t.piece >= bound:
            raise BadRequest(f"transfers[]: piece index {t.piece} out of range (the blob has {bound} pieces)")
        out.append((t.parent_id, t.piece))
    return out


def exclude(values) -> list[str]:
    if len(values) > MAX_EXCLUDE:
        raise BadRequest(f"exclude: {len(values)} peer ids, at most {MAX_EXCLUDE}")
    return [ident(v, "exclude[]") for v in values if v]


def limit(value: int) -> int:
    if value > MAX_LIMIT:
        raise BadRequest(f"limit {value} exceeds {MAX_LIMIT}")
    return value


def seeding(value: int) -> int:
    if value > MAX_SEEDING:
        raise BadRequest(f"seeding {value} exceeds {MAX_SEEDING}")
    return value


def piece_results(results, total: int) -> None:
    if len(results) > MAX_RESULTS:
        raise BadRequest(f"results: {len(results)} entries, at most {MAX_RESULTS} per report")
    bound = total or MAX_PIECES
    for r in results:
        ident(r.parent_id, "results[].parent_id", required=False)
        if r.piece >= bound:
            raise BadRequest(f"results[]: piece index {r.piece} out of range (the blob has {bound} pieces)")
        if r.size > MAX_PIECE_SIZE:
            raise BadRequest(f"results[]: size {r.size} exceeds the largest piece ({MAX_PIECE_SIZE})")
        if len(r.error) > MAX_ERROR:
            raise BadRequest(f"results[].error longer than {MAX_ERROR} characters")


def probe_results(results) -> None:
    if len(results) > MAX_PROBES:
        raise BadRequest(f"results: {len(results)} probe results, at most {MAX_PROBES}")
    for r in results:
        ident(r.peer_id, "results[].peer_id")


def error_text(value: str) -> str:
    if len(value) > MAX_ERROR:
        raise BadRequest(f"error longer than {MAX_ERROR} characters")
    return value
