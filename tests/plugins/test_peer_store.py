"""The peer's piece store: atomic pieces, restart, layout, GC by TTL and by watermarks."""
from __future__ import annotations

import os
import time

import pytest
from peer_util import sha

from remora.errors import InvalidInput, StorageError, UsageError
from remora.plugins.peer.config import MAX_PIECE_SIZE, MIN_PIECE_SIZE, MiB, Watermark, parse_size, piece_size_for
from remora.plugins.peer.pieces import PieceStore, sha256_digest


def _fill(store: PieceStore, data: bytes, piece_size: int = MIN_PIECE_SIZE):
    entry = store.open(sha(data))
    entry.set_layout(len(data), piece_size)
    for i in range(entry.n_pieces):
        s, e = entry.piece_span(i)
        chunk = data[s:e]
        entry.write_piece(i, chunk, sha256_digest(chunk))
        entry.commit_piece(i, sha256_digest(chunk))
    return entry


def test_piece_size_is_power_of_two_from_blob_size():
    assert piece_size_for(1) == MIN_PIECE_SIZE
    assert piece_size_for(100 * MiB) == 512 * 1024
    assert piece_size_for(200 * 10**6) == MiB  # the P2P benchmark's blob: 191 pieces
    assert piece_size_for(64 * 1024 * MiB) == MAX_PIECE_SIZE
    for n in (1, 10**6, 10**8, 10**9, 10**11):
        size = piece_size_for(n)
        assert size & (size - 1) == 0 and MIN_PIECE_SIZE <= size <= MAX_PIECE_SIZE


def test_pieces_survive_restart_and_a_crash_leaves_no_half_piece(tmp_path):
    data = os.urandom(3 * MIN_PIECE_SIZE + 17)
    store = PieceStore(tmp_path)
    entry = _fill(store, data)
    entry.mark_verified()
    # A crash mid-write leaves only a temporary file; a truncated piece file must not count either.
    (entry.piece_dir / ".2.123.tmp").write_bytes(b"half")
    with open(entry.piece_path(1), "r+b") as f:
        f.truncate(100)
    again = PieceStore(tmp_path).open(sha(data))
    assert again.content_length == len(data) and again.piece_size == MIN_PIECE_SIZE
    assert again.have == {0, 2, 3}
    assert not again.verified, "a blob missing a piece must not stay verified"
    assert not (entry.piece_dir / ".2.123.tmp").exists()
    assert again.read_piece(3) == data[3 * MIN_PIECE_SIZE:]


def test_pieces_of_an_unfinished_blob_are_hashed_when_the_store_opens_it_again(tmp_path):
    """Pieces land without a flush each (they are flushed in batches, all before "verified"): after a
    crash, the pieces of a blob that was still downloading may hold bytes that never reached the disk.
    Each is checked against its digest on the next open; a bad one is dropped, the good ones stay."""
    data = os.urandom(4 * MIN_PIECE_SIZE)
    store = PieceStore(tmp_path)
    entry = _fill(store, data)
    entry.save_meta()
    assert entry.unsynced == 4
    with open(entry.piece_path(2), "r+b") as f:   # right size, wrong bytes: what a lost write looks like
        f.write(b"\0" * 4096)
    again = PieceStore(tmp_path).open(sha(data))
    assert again.have == {0, 1, 3}
    assert not again.piece_path(2).exists()
    assert again.read_piece(3) == data[3 * MIN_PIECE_SIZE:]


def test_verified_means_every_piece_was_flushed(tmp_path, monkeypatch):
    """mark_verified flushes what is still unsynced (each piece, then the directory) before it writes
    "verified"; a flush that fails keeps the pieces unsynced and the blob unverified."""
    data = os.urandom(3 * MIN_PIECE_SIZE)
    store = PieceStore(tmp_path)
    entry = _fill(store, data)
    flushed = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (flushed.append(fd), real(fd)))
    assert entry.sync_pieces() == 3 and len(flushed) == 3 and entry.unsynced == 0
    assert entry.sync_pieces() == 0
    piece = data[MIN_PIECE_SIZE:2 * MIN_PIECE_SIZE]
    entry.write_piece(1, piece, sha256_digest(piece))

    def broken(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(StorageError, match="cannot flush"):
        entry.mark_verified()
    assert not entry.verified and entry.unsynced == 1
    monkeypatch.setattr(os, "fdatasync", real)
    entry.mark_verified()
    assert entry.verified and entry.unsynced == 0
    assert PieceStore(tmp_path).open(sha(data)).verified


def test_layout_is_checked_and_a_new_layout_drops_old_pieces(tmp_path):
    data = os.urandom(2 * MIN_PIECE_SIZE)
    store = PieceStore(tmp_path)
    entry = _fill(store, data)
    with pytest.raises(InvalidInput):
        entry.set_layout(len(data), 3000)  # not a power of two
    with pytest.raises(InvalidInput):
        entry.write_piece(0, b"short", "sha256:" + "0" * 64)
    entry.set_layout(len(data), 2 * MIN_PIECE_SIZE)
    assert entry.have == set() and entry.n_pieces == 1
    with pytest.raises(InvalidInput):
        store.open("sha256:../../etc")


def test_gc_evicts_by_ttl_and_keeps_blobs_in_use(tmp_path):
    store = PieceStore(tmp_path)
    old, busy, fresh = (_fill(store, os.urandom(MIN_PIECE_SIZE + i)) for i in range(3))
    past = time.time() - 7200
    os.utime(old.dir, (past, past))
    os.utime(busy.dir, (past, past))
    busy.users = 1
    evicted = store.gc(ttl=3600, high=Watermark(bytes=10**12), low=Watermark(bytes=10**12))
    assert evicted == [old]
    assert old.dir.exists(), "gc only decides; delete() removes"
    store.delete(evicted)
    assert not old.dir.exists() and busy.dir.exists() and fresh.dir.exists()


def test_gc_watermarks_evict_least_recently_used_down_to_low(tmp_path):
    store = PieceStore(tmp_path)
    entries = [_fill(store, os.urandom(MIN_PIECE_SIZE)) for _ in range(5)]
    now = time.time()
    for age, e in enumerate(reversed(entries)):  # entries[0] is the oldest
        os.utime(e.dir, (now - 100 * age, now - 100 * age))
    entries[0].touch()  # ... until it is used again: now the newest
    assert store.usage_bytes() == 5 * MIN_PIECE_SIZE
    # Under the high watermark nothing goes.
    assert store.gc(ttl=1e9, high=Watermark(bytes=5 * MIN_PIECE_SIZE), low=Watermark(bytes=0)) == []
    evicted = store.gc(ttl=1e9, high=Watermark(bytes=4 * MIN_PIECE_SIZE), low=Watermark(bytes=2 * MIN_PIECE_SIZE))
    assert evicted == [entries[1], entries[2], entries[3]]
    store.delete(evicted)
    assert store.usage_bytes() == 2 * MIN_PIECE_SIZE
    # Percent watermarks use the filesystem: above the high mark, free down to the low mark.
    assert store.gc(ttl=1e9, high=Watermark.parse("100%"), low=Watermark.parse("0.001%")) == []
    assert store.gc(ttl=1e9, high=Watermark.parse("0.001%"), low=Watermark.parse("100%")) == []
    last = store.gc(ttl=1e9, high=Watermark.parse("0.001%"), low=Watermark.parse("0.001%"))
    assert sorted(e.digest for e in last) == sorted([entries[4].digest, entries[0].digest])


def test_gc_never_takes_a_blob_whose_download_just_began(tmp_path):
    store = PieceStore(tmp_path)
    starting = store.open(sha(b"not yet on disk"))  # a task that is still asking the scheduler
    assert store.gc(ttl=0, high=Watermark(bytes=0), low=Watermark(bytes=0), now=time.time() + 10) == []
    assert store.open(starting.digest) is starting


def test_watermark_and_size_parsing():
    assert parse_size("10GiB") == 10 * 1024**3 and parse_size("512k") == 512 * 1024
    assert Watermark.parse("80%").percent == 80.0 and Watermark.parse("2MiB").bytes == 2 * MiB
    for bad in ("10 parsecs", "-1", "150%"):
        with pytest.raises(UsageError):
            Watermark.parse(bad)
