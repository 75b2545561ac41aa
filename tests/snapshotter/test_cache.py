"""The content-addressed chunk cache: verified reads, atomic writes, LRU limit, pins, restarts."""
from __future__ import annotations

import hashlib
import os

import pytest

from remora.cache import ChunkCache
from remora.errors import InvalidInput


def chunk(i: int, size: int = 1000) -> tuple[bytes, bytes]:
    data = hashlib.sha256(b"%d" % i).digest() * (size // 32) + bytes(size % 32)
    return hashlib.sha256(data).digest(), data


def test_put_get_roundtrip_and_layout(tmp_path):
    cache = ChunkCache(tmp_path, 1 << 20)
    d, data = chunk(1)
    assert cache.get(d) is None
    cache.put(d, data)
    assert cache.get(d) == data
    assert cache.get("sha256:" + d.hex()) == data
    assert cache.path(d) == tmp_path / "sha256" / d.hex()[:2] / d.hex()
    assert (cache.hits, cache.misses) == (2, 1)
    assert not any((tmp_path / "tmp").iterdir()), "no half-written files left behind"
    assert cache.info()["bytes"] == len(data)


def test_refuses_bytes_that_do_not_match_their_digest(tmp_path):
    cache = ChunkCache(tmp_path, 1 << 20)
    d, data = chunk(1)
    with pytest.raises(InvalidInput):
        cache.put(d, data + b"x")
    assert not cache.contains(d)
    with pytest.raises(InvalidInput):
        cache.get("sha256:../../etc/passwd")


def test_corrupt_entry_is_detected_dropped_and_reported_as_miss(tmp_path):
    cache = ChunkCache(tmp_path, 1 << 20)
    d, data = chunk(2)
    cache.put(d, data)
    with open(cache.path(d), "r+b") as f:
        f.seek(10)
        f.write(b"\xff")
    assert cache.get(d) is None
    assert cache.corrupt == 1
    assert not cache.path(d).exists()
    assert cache.info()["bytes"] == 0
    cache.put(d, data)  # the refetched copy is stored again
    assert cache.get(d) == data


def test_lru_eviction_keeps_the_limit_and_recently_used(tmp_path):
    cache = ChunkCache(tmp_path, 10_000)
    chunks = [chunk(i) for i in range(9)]
    for d, data in chunks:
        cache.put(d, data)
    assert cache.get(chunks[0][0]) is not None  # chunk 0 is now the most recently used
    cache.flush()
    for d, data in (chunk(i) for i in range(100, 105)):
        cache.put(d, data)
    info = cache.info()
    assert info["bytes"] <= 10_000
    assert cache.contains(chunks[0][0]), "recently read chunk must survive"
    assert not cache.contains(chunks[1][0]), "least recently used chunk must go first"
    assert cache.evicted_chunks >= 4
    on_disk = sum(f.stat().st_size for f in (tmp_path / "sha256").rglob("*") if f.is_file())
    assert on_disk == info["bytes"]


def test_pinned_chunks_are_never_evicted(tmp_path):
    cache = ChunkCache(tmp_path, 5_000)
    pinned = [chunk(i) for i in range(4)]
    cache.pin("mount-a", [d for d, _ in pinned])
    for d, data in pinned:
        cache.put(d, data)
    for d, data in (chunk(i) for i in range(10, 20)):
        cache.put(d, data)
    assert all(cache.contains(d) for d, _ in pinned)
    assert cache.info()["bytes"] <= 5_000
    cache.unpin("mount-a")
    assert cache.owners() == []
    cache.evict(0)
    assert not any(cache.contains(d) for d, _ in pinned), "unpinned chunks become evictable"


def test_survives_restart_and_rebuilds_a_lost_index(tmp_path):
    cache = ChunkCache(tmp_path, 1 << 20)
    items = [chunk(i) for i in range(5)]
    cache.put_many(items)
    cache.pin("m", [items[0][0]])
    cache.close()
    again = ChunkCache(tmp_path, 1 << 20)
    assert [again.get(d) for d, _ in items] == [data for _, data in items]
    assert again.owners() == ["m"]
    again.close()
    os.unlink(tmp_path / "index.db")
    rebuilt = ChunkCache(tmp_path, 1 << 20)
    assert rebuilt.info()["chunks"] == 5
    assert rebuilt.info()["bytes"] == sum(len(data) for _, data in items)


def test_two_instances_share_accounting(tmp_path):
    a, b = ChunkCache(tmp_path, 1 << 20), ChunkCache(tmp_path, 1 << 20)
    a.put_many([chunk(1)])
    b.put_many([chunk(2), chunk(1)])  # chunk 1 is already there: not counted twice
    assert a.info()["bytes"] == b.info()["bytes"] == 2000


def test_half_written_chunks_of_dead_processes_are_removed(tmp_path):
    ChunkCache(tmp_path, 1 << 20).close()
    dead = tmp_path / "tmp" / f"{'ab' * 32}.999999999.1"
    live = tmp_path / "tmp" / f"{'cd' * 32}.{os.getppid()}.1"
    dead.write_bytes(b"partial")
    live.write_bytes(b"partial")
    ChunkCache(tmp_path, 1 << 20)
    assert not dead.exists() and live.exists(), "only writers that are gone lose their temp files"
