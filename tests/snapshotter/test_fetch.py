"""The chunk fetcher against a real registry: verified bytes, frame-sized fetches, merged and
single-flight requests, lying and dead sources, corrupted cache entries, prefetch."""
from __future__ import annotations

import threading
import time

import pytest
from lazy_support import CountingProxy, build_image, dead_port_url

from remora.cache import ChunkCache
from remora.format.bootstrap import Bootstrap
from remora.snapshotter.fetch import ChunkFetcher, FetchError, Prefetcher
from remora.snapshotter.sources import SourceSpec, open_source


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    return build_image(tmp_path_factory.mktemp("lazy-image"), registry.host)


def make_fetcher(image, cache_dir, *urls, **kw):
    specs = []
    for url in urls:
        host = url.split("://", 1)[1]
        specs.append(SourceSpec.registry(host, image.repo, read_timeout=kw.pop("read_timeout", 5.0), retries=0))
    return ChunkFetcher(Bootstrap(image.bootstrap), ChunkCache(cache_dir, 1 << 30), [open_source(s) for s in specs],
                        **kw)


def read_path(fetcher, path: bytes, size: int = 1 << 30) -> bytes:
    rec = fetcher.bootstrap.lookup_path(path)
    return fetcher.read(rec.ino, 0, size)


def file_extents(fetcher, path: bytes):
    rec = fetcher.bootstrap.lookup_path(path)
    return fetcher.bootstrap.read_plan(rec.ino, 0, rec.size)


def test_reads_every_file_byte_exact(image, proxy, tmp_path):
    f = make_fetcher(image, tmp_path, proxy.url)
    for path, data in image.contents.items():
        assert read_path(f, path) == data, path
        rec = f.bootstrap.lookup_path(path)
        if rec.size > 7:
            assert f.read(rec.ino, 3, 5) == data[3:8]
    assert f.stats.snapshot()["fetch_failures"] == 0


def test_small_file_costs_about_one_frame(image, proxy, tmp_path):
    f = make_fetcher(image, tmp_path, proxy.url)
    (e,) = file_extents(f, b"/etc/hot.conf")
    assert read_path(f, b"/etc/hot.conf") == image.contents[b"/etc/hot.conf"]
    assert len(proxy.blob_requests()) == 1
    assert proxy.bytes == e.frame.csize, "exactly the file's frame crosses the wire, not the blob"
    total = sum(size for _, size in image.table.blobs)
    assert proxy.bytes < total / 10


def test_neighbouring_frames_are_merged_into_one_request(image, proxy, tmp_path):
    f = make_fetcher(image, tmp_path, proxy.url)
    paths = [p for p in image.contents if p.startswith(b"/etc/small")]
    extents = [e for p in paths for e in file_extents(f, p)]
    frames = {e.chunk.frame for e in extents}
    assert len(frames) >= 3
    chunks = f.chunks(extents)
    assert all(chunks[e.chunk.digest] for e in extents)
    s = f.stats.snapshot()
    assert (len(proxy.blob_requests()), s["requests"], s["merged_requests"]) == (1, 1, 1)
    assert s["frames_fetched"] == len(frames)

    proxy.reset()
    g = make_fetcher(image, tmp_path / "nomerge", proxy.url, max_gap=0, max_range=1)
    g.chunks(extents)
    assert len(proxy.blob_requests()) == len(frames), "with merging disabled: one request per frame"


def test_concurrent_readers_of_one_frame_make_one_request(image, registry, tmp_path):
    with CountingProxy(registry.url, delay=0.4) as slow:
        f = make_fetcher(image, tmp_path, slow.url)
        results, errors = [], []

        def reader():
            try:
                results.append(read_path(f, b"/etc/small001.txt"))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not errors
        assert results == [image.contents[b"/etc/small001.txt"]] * 4
        assert len(slow.blob_requests()) == 1
        assert f.stats.snapshot()["singleflight_waits"] >= 1


def test_wrong_bytes_fail_and_nothing_is_cached(image, registry, tmp_path):
    with CountingProxy(registry.url, mode="flip") as liar:
        f = make_fetcher(image, tmp_path, liar.url)
        with pytest.raises(FetchError, match="digest mismatch|corrupt zstd"):
            read_path(f, b"/etc/hot.conf")
        assert f.cache.info()["chunks"] == 0
        assert not [p for p in (tmp_path / "sha256").rglob("*") if p.is_file()]
        assert f.stats.snapshot()["verify_failures"] == 1


def test_lying_mirror_falls_back_to_the_registry(image, registry, tmp_path):
    with CountingProxy(registry.url, mode="flip") as liar:
        f = make_fetcher(image, tmp_path, liar.url, registry.url)
        assert read_path(f, b"/bin/big") == image.contents[b"/bin/big"]
        s = f.stats.snapshot()
        assert s["verify_failures"] >= 1 and s["fetch_failures"] == 0


def test_unreachable_registry_fails_fast(image, tmp_path):
    f = make_fetcher(image, tmp_path, dead_port_url())
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="cannot fetch"):
        read_path(f, b"/etc/hot.conf")
    assert time.monotonic() - t0 < 5


def test_stalled_registry_times_out_instead_of_hanging(image, registry, tmp_path):
    with CountingProxy(registry.url, mode="stall") as stall:
        f = make_fetcher(image, tmp_path, stall.url, read_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(FetchError):
            read_path(f, b"/etc/hot.conf")
        assert time.monotonic() - t0 < 5


def test_corrupted_cache_entry_is_detected_and_refetched(image, proxy, tmp_path):
    f = make_fetcher(image, tmp_path, proxy.url)
    data = image.contents[b"/data/deep/er/file"]
    assert read_path(f, b"/data/deep/er/file") == data
    (e,) = file_extents(f, b"/data/deep/er/file")
    assert f.wait_stored([e.chunk.frame])
    path = f.cache.path(e.chunk.digest)
    path.write_bytes(b"rotten" + path.read_bytes()[6:])
    proxy.reset()
    fresh = make_fetcher(image, tmp_path, proxy.url)  # new process view: no in-memory copy
    assert read_path(fresh, b"/data/deep/er/file") == data
    assert fresh.cache.corrupt == 1
    assert len(proxy.blob_requests()) == 1
    assert fresh.wait_stored([e.chunk.frame])
    assert fresh.cache.get(e.chunk.digest) == data


def test_peer_source_sends_ns_and_is_verified(image, registry, proxy, tmp_path):
    spec = SourceSpec.peer(proxy.url, image.repo, registry_host="docker.io")
    f = ChunkFetcher(Bootstrap(image.bootstrap), ChunkCache(tmp_path, 1 << 30), [open_source(spec)])
    assert read_path(f, b"/etc/hot.conf") == image.contents[b"/etc/hot.conf"]
    assert proxy.blob_requests()[0].endswith("?ns=docker.io")


def test_prefetch_follows_the_list_then_everything(image, proxy, tmp_path):
    f = make_fetcher(image, tmp_path, proxy.url)
    p = Prefetcher(f).start()
    p.join(20)
    (hot,) = file_extents(f, b"/etc/hot.conf")
    assert f.cache.contains(hot.chunk.digest)
    assert f.cache.info()["chunks"] < len(image.table.chunks), "only the prefetch list"
    everything = Prefetcher(f, prefetch_all=True).start()
    everything.join(30)
    s = f.stats.snapshot()
    assert s["prefetch_done"] == 1
    assert f.cache.info()["chunks"] == len(image.table.chunks)
    assert s["merged_requests"] >= 1
    assert s["requests"] <= 4, "whole image in a few merged requests"


def test_authenticated_registry_needs_and_uses_credentials(auth_registry, tmp_path):
    AUTH_USER, AUTH_PASSWORD = next(iter(auth_registry.users.items()))
    img = build_image(tmp_path / "img", auth_registry.host, n_small=3, big_size=1 << 16,
                      credentials=(AUTH_USER, AUTH_PASSWORD))
    bs = Bootstrap(img.bootstrap)
    ino = bs.lookup_path(b"/etc/hot.conf").ino
    for kind, url in (("registry", auth_registry.url), ("peer", auth_registry.url)):
        spec = SourceSpec(url=url, repo=img.repo, kind=kind, username=AUTH_USER, password=AUTH_PASSWORD, retries=0)
        f = ChunkFetcher(bs, ChunkCache(tmp_path / kind, 1 << 30), [open_source(spec)])
        assert f.read(ino, 0, 1000) == img.contents[b"/etc/hot.conf"]
        anonymous = SourceSpec(url=url, repo=img.repo, kind=kind, retries=0)
        g = ChunkFetcher(bs, ChunkCache(tmp_path / (kind + "-anon"), 1 << 30), [open_source(anonymous)])
        with pytest.raises(FetchError, match="(?i)auth|credential|401"):
            g.read(ino, 0, 1000)


def test_a_stalled_mirror_costs_one_timeout_then_is_skipped(image, registry, tmp_path):
    with CountingProxy(registry.url, mode="stall") as stall:
        mirror = SourceSpec.peer(stall.url, image.repo, registry.host, read_timeout=0.5)
        origin = SourceSpec.registry(registry.host, image.repo, retries=0)
        f = ChunkFetcher(Bootstrap(image.bootstrap), ChunkCache(tmp_path, 1 << 30),
                         [open_source(mirror), open_source(origin)], cooldown=30)
        t0 = time.monotonic()
        assert read_path(f, b"/etc/hot.conf") == image.contents[b"/etc/hot.conf"]
        assert time.monotonic() - t0 >= 0.5, "the first read waited for the mirror's timeout"
        assert read_path(f, b"/bin/big") == image.contents[b"/bin/big"]
        assert len(stall.blob_requests()) == 1, "later reads go straight to the registry"


class _HeldSource:
    """A real registry source whose body is held after ``hold_after`` bytes until ``release`` is set,
    or broken there (``RegistryError``) when ``break_there``: a range caught mid-stream."""

    def __init__(self, inner, hold_after: int, break_there: bool = False):
        self.inner, self.name = inner, inner.name + " (held)"
        self.hold_after, self.break_there = hold_after, break_there
        self.release = threading.Event()
        self.held = threading.Event()
        self.ranges: list[tuple[int, int]] = []

    def read_range(self, blob, start, end, sink=None):
        from remora.errors import RegistryError

        self.ranges.append((start, end))
        seen = 0

        def gate(piece: bytes) -> None:
            nonlocal seen
            while piece:
                if seen >= self.hold_after and not self.release.is_set():
                    if self.break_there:
                        raise RegistryError("connection reset mid-range (test)")
                    self.held.set()
                    assert self.release.wait(30), "the test never released the range"
                take = piece if seen >= self.hold_after else piece[:self.hold_after - seen]
                sink(take)
                seen += len(take)
                piece = piece[len(take):]

        return self.inner.read_range(blob, start, end, sink=gate)


def test_frames_are_served_while_their_range_is_still_streaming(image, registry, tmp_path):
    """One merged range of many frames: the first frame is delivered (and readable) while the rest
    of the range is still on the wire, and nothing is fetched twice."""
    spec = SourceSpec.registry(registry.host, image.repo, retries=0)
    probe = ChunkFetcher(Bootstrap(image.bootstrap), ChunkCache(tmp_path / "probe", 1 << 30), [open_source(spec)])
    extents = file_extents(probe, b"/bin/big")
    frames = sorted({e.chunk.frame: e.frame for e in extents}.items(), key=lambda kv: kv[1].offset)
    assert len(frames) >= 3
    first = frames[0][1]
    held = _HeldSource(open_source(spec), hold_after=first.csize)
    f = ChunkFetcher(Bootstrap(image.bootstrap), ChunkCache(tmp_path / "c", 1 << 30), [held])
    bg = threading.Thread(target=f.ensure, args=(extents,))
    bg.start()
    try:
        assert held.held.wait(30)
        rec = f.bootstrap.lookup_path(b"/bin/big")
        t0 = time.monotonic()
        assert f.read(rec.ino, 0, 4096) == image.contents[b"/bin/big"][:4096]
        assert time.monotonic() - t0 < 5, "the first frame waited for the rest of its range"
        assert len(held.ranges) == 1, "served from the streaming range, not a request of its own"
    finally:
        held.release.set()
        bg.join(30)
    assert read_path(f, b"/bin/big") == image.contents[b"/bin/big"]
    assert len(held.ranges) == 1 and f.stats.snapshot()["frames_fetched"] == len(frames)


def test_range_broken_mid_stream_keeps_what_arrived_and_refetches_the_rest(image, registry, tmp_path):
    spec = SourceSpec.registry(registry.host, image.repo, retries=0)
    probe = ChunkFetcher(Bootstrap(image.bootstrap), ChunkCache(tmp_path / "probe", 1 << 30), [open_source(spec)])
    extents = file_extents(probe, b"/bin/big")
    frames = sorted({e.chunk.frame: e.frame for e in extents}.items(), key=lambda kv: kv[1].offset)
    two = frames[0][1].csize + frames[1][1].csize
    broken = _HeldSource(open_source(spec), hold_after=two, break_there=True)
    backup = _HeldSource(open_source(spec), hold_after=1 << 40)  # never held: records its ranges
    f = ChunkFetcher(Bootstrap(image.bootstrap), ChunkCache(tmp_path / "c", 1 << 30), [broken, backup])
    assert read_path(f, b"/bin/big") == image.contents[b"/bin/big"]
    (bstart, _), = backup.ranges
    assert bstart == frames[2][1].offset, "the two frames that arrived whole were kept, not fetched again"
    s = f.stats.snapshot()
    assert s["frames_fetched"] == len(frames) and s["source_errors"] == 1 and s["fetch_failures"] == 0


def test_prefetch_cuts_a_big_hot_file_into_growing_batches(registry, tmp_path):
    """A hot file bigger than a batch is fetched in batches of the growing size (first_batch, doubling up to
    batch_bytes), not in one range request: a reader of its far end waits for the frames the prefetch has
    in flight (single flight), so one request for the whole file made a 4 MiB read at 80 MiB of a 100 MiB
    hot file wait 7.7 s for the 80 MiB before it (bench_cold_start.py, bigblob, the other workload)."""
    img = build_image(tmp_path / "img", registry.host, n_small=3, big_size=16 << 20, prefetch_paths=(b"/bin/big",))
    big = img.tree.lookup(b"/bin/big")
    unique_frames = len({c.digest for c in big.chunks})
    assert unique_frames == 16, unique_frames   # 4 MiB of distinct 256 KiB chunks, repeated 4 times
    with CountingProxy(registry.url) as proxy:
        f = make_fetcher(img, tmp_path / "cache", proxy.url)
        p = Prefetcher(f, batch_bytes=1 << 20, first_batch=256 << 10, depth=1).start()
        p.join(30)
        assert p.done.is_set() and f.stats.snapshot()["prefetch_done"] == 1
        ranges = [r.split()[0] for r in proxy.blob_requests()]
    sizes = []
    for r in ranges:
        lo, hi = r.removeprefix("bytes=").split("-")
        sizes.append(int(hi) - int(lo) + 1)
    # 16 distinct frames in batches of 256 KiB, 512 KiB, then 1 MiB of chunk data: 1 + 2 + 4 + 4 + 4 + 1 frames,
    # no request for the repeats (cached); before, one request carried the whole file
    assert len(sizes) >= 5, ranges
    assert max(sizes) <= 4 * max(fr.csize for fr in img.table.frames) + 1, ranges
    assert read_path(f, b"/bin/big") == img.contents[b"/bin/big"]
