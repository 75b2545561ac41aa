"""Early prefetch (staging.py): the snapshotter streams a hot blob into a file while the fs process's
fetcher already reads from it; every byte is still verified, and a staging that fails, lies or stalls
costs a fallback to the registry, never a wrong or missing byte."""
from __future__ import annotations

import os
import threading
import time

import pytest
from lazy_support import build_image, dead_port_url

from remora.cache import ChunkCache
from remora.errors import NotFound, RegistryError
from remora.format.bootstrap import Bootstrap
from remora.procutil import wait_until
from remora.snapshotter.fetch import ChunkFetcher
from remora.snapshotter.sources import SourceSpec, open_source
from remora.snapshotter.staging import StagedSource, StagingArea, _name


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    return build_image(tmp_path_factory.mktemp("staging-image"), registry.host)


def registry_source(image, url: str):
    return open_source(SourceSpec.registry(url.split("://", 1)[1], image.repo, retries=0, read_timeout=5.0))


def biggest_blob(image) -> tuple[str, bytes]:
    digest, path = max(image.blob_paths.items(), key=lambda kv: kv[1].stat().st_size)
    return digest, path.read_bytes()


class SlowWriter(threading.Thread):
    """Writes ``data`` into ``<dir>/<name>.part`` in pieces, like StagingArea does, then renames it."""

    def __init__(self, directory, blob: str, data: bytes, pieces: int = 8, pause: float = 0.02,
                 abandon_at: int | None = None):
        super().__init__(daemon=True)
        self.final = directory / _name(blob)
        self.part = self.final.with_name(self.final.name + ".part")
        self.data, self.pieces, self.pause, self.abandon_at = data, pieces, pause, abandon_at
        self.part.write_bytes(b"")

    def run(self):
        step = -(-len(self.data) // self.pieces)
        with open(self.part, "ab", buffering=0) as f:
            for i in range(0, len(self.data), step):
                if self.abandon_at is not None and i >= self.abandon_at:
                    self.part.unlink()
                    return
                f.write(self.data[i:i + step])
                time.sleep(self.pause)
        os.replace(self.part, self.final)


def test_reader_streams_bytes_while_they_are_written(tmp_path):
    blob, data = "sha256:" + "ab" * 32, os.urandom(300_000)
    w = SlowWriter(tmp_path, blob, data)
    src = StagedSource(tmp_path, {blob: len(data)})
    w.start()
    got: list[bytes] = []
    t0 = time.monotonic()
    assert src.read_range(blob, 1000, 250_000, sink=got.append) == 249_001
    assert b"".join(got) == data[1000:250_001]
    assert len(got) > 1, "the reader must hand bytes over as they arrive, not at the end"
    assert time.monotonic() - t0 < 5
    w.join()
    assert src.read_range(blob, 0, 99) == data[:100]  # after the rename, from the final file


def test_abandoned_staging_is_not_found_so_the_next_source_serves(tmp_path):
    blob, data = "sha256:" + "cd" * 32, os.urandom(200_000)
    w = SlowWriter(tmp_path, blob, data, abandon_at=100_000)
    src = StagedSource(tmp_path, {blob: len(data)})
    w.start()
    got: list[bytes] = []
    with pytest.raises(NotFound, match="abandoned"):
        src.read_range(blob, 0, len(data) - 1, sink=got.append)
    assert data.startswith(b"".join(got))  # what it did hand over is right


def test_ranges_beyond_what_is_staged(tmp_path):
    blob, data = "sha256:" + "ef" * 32, os.urandom(10_000)
    (tmp_path / _name(blob)).write_bytes(data[:4000])
    src = StagedSource(tmp_path, {blob: 4000})
    assert src.covers(blob, 3999) and not src.covers(blob, 4000) and not src.covers("sha256:" + "00" * 32, 0)
    with pytest.raises(NotFound):
        src.read_range(blob, 4000, 5000, sink=lambda b: None)
    got: list[bytes] = []
    with pytest.raises(NotFound, match="staged up to byte 4000"):  # the staged part first, then "not here"
        src.read_range(blob, 3000, 5000, sink=got.append)
    assert b"".join(got) == data[3000:4000]


def test_stalled_writer_times_out(tmp_path):
    blob = "sha256:" + "12" * 32
    (tmp_path / (_name(blob) + ".part")).write_bytes(b"x" * 100)
    src = StagedSource(tmp_path, {blob: 1000}, stall_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(RegistryError, match="stalled"):
        src.read_range(blob, 0, 999, sink=lambda b: None)
    assert time.monotonic() - t0 < 3


class BreaksAfter:
    """A source that delivers ``n`` bytes of a range and then fails, like a connection reset."""

    name = "breaks"

    def __init__(self, inner, n: int):
        self.inner, self.n = inner, n

    def read_range(self, blob, start, end, sink=None):
        return self.inner.read_range(blob, start, min(end, start + self.n - 1), sink=sink) and \
            (_ for _ in ()).throw(RegistryError("connection reset"))


def test_staging_area_resumes_on_the_next_source(image, proxy, tmp_path):
    blob, data = biggest_blob(image)
    area = StagingArea(tmp_path / "staging")
    src = registry_source(image, proxy.url)
    assert area.start(blob, len(data), [BreaksAfter(src, 100_000), src])
    assert not area.start(blob, len(data), [src])  # once per blob
    area.wait(blob, 30)
    assert (tmp_path / "staging" / _name(blob)).read_bytes() == data
    assert area.staged([blob, "sha256:" + "00" * 32]) == {blob: len(data)}
    assert (tmp_path / "staging").stat().st_mode & 0o777 == 0o700
    # the second source was asked only for what the first did not deliver
    assert proxy.bytes == len(data)


def test_staged_files_go_after_their_ttl(image, registry, tmp_path):
    blob, data = biggest_blob(image)
    area = StagingArea(tmp_path / "staging", ttl=0.5)
    assert area.start(blob, len(data), [registry_source(image, registry.url)])
    area.wait(blob, 30)
    assert area.staged([blob]) == {blob: len(data)}
    wait_until(lambda: not area.staged([blob]), 10, what="the staged file's ttl to pass")
    assert area.staged([blob]) == {} and not list((tmp_path / "staging").iterdir())
    assert area.start(blob, len(data), [registry_source(image, registry.url)]), "it can be staged again"
    area.wait(blob, 30)


def test_staging_area_limit_and_failure(image, registry, tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from remora.snapshotter.metrics import StagingCollector

    blob, data = biggest_blob(image)
    area = StagingArea(tmp_path / "staging", limit=1000)
    dead = registry_source(image, dead_port_url())
    assert area.start(blob, len(data), [dead])
    area.wait(blob, 30)
    assert area.staged([blob]) == {}, "a failed staging must not be offered to mounts"
    assert not list((tmp_path / "staging").iterdir())
    assert area.start(blob, len(data), [registry_source(image, registry.url)])  # capped at the limit
    area.wait(blob, 30)
    assert (tmp_path / "staging" / _name(blob)).read_bytes() == data[:1000]
    reg = CollectorRegistry()
    reg.register(StagingCollector(area.counters))
    text = generate_latest(reg).decode()
    assert "remora_early_prefetch_blobs_total 2.0" in text
    assert "remora_early_prefetch_bytes_total 1000.0" in text
    assert "remora_early_prefetch_failures_total 1.0" in text
    area2 = StagingArea(tmp_path / "staging", limit=0)
    assert not area2.start(blob, len(data), [dead])


def test_fetcher_uses_staged_bytes_verifies_them_and_falls_back(image, proxy, tmp_path):
    blob, data = biggest_blob(image)
    staging = tmp_path / "staging"
    staging.mkdir()
    bad = bytearray(data)
    bad[len(bad) // 2: len(bad) // 2 + 64] = b"\0" * 64  # a lying staged copy in the middle
    w = SlowWriter(staging, blob, bytes(bad), pieces=16, pause=0.01)
    sources = [StagedSource(staging, {blob: len(data)}), registry_source(image, proxy.url)]
    f = ChunkFetcher(Bootstrap(image.bootstrap), ChunkCache(tmp_path / "cache", 1 << 30), sources)
    w.start()
    try:
        for path, want in image.contents.items():
            rec = f.bootstrap.lookup_path(path)
            assert f.read(rec.ino, 0, rec.size) == want, path
    finally:
        f.close()
        w.join()
    stats = f.stats.snapshot()
    assert stats["verify_failures"] >= 1, "the corrupted staged frame must have been caught"
    assert stats["fetch_failures"] == 0
    # From the registry: the other blob, and of the staged one only the corrupted frame (one range).
    other = sum(p.stat().st_size for d, p in image.blob_paths.items() if d != blob)
    frames = [fr.csize for fr in image.table.frames if image.table.blobs[fr.blob][0] == blob]
    assert len([r for r in proxy.blob_requests() if blob in r]) == 1, proxy.blob_requests()
    assert proxy.bytes <= other + max(frames), proxy.blob_requests()


def test_a_reader_far_ahead_of_the_staging_asks_the_next_source(tmp_path):
    """``covers(..., patient=False)`` (a container's read, not the prefetch): staged bytes are waited for
    only up to READER_LEAD ahead of what is written; further ahead the next source is asked at once. The
    prefetch (patient) keeps waiting for the staging: the bytes are on their way."""
    from remora.snapshotter.staging import READER_LEAD

    blob = "sha256:" + "5a" * 32
    part = tmp_path / (_name(blob) + ".part")
    part.write_bytes(b"x" * 1000)
    src = StagedSource(tmp_path, {blob: 64 << 20})
    assert src.covers(blob, 10 << 20)
    assert src.covers(blob, 1000 + READER_LEAD - 1, patient=False)
    assert not src.covers(blob, 1000 + READER_LEAD, patient=False)
    part.write_bytes(b"x" * (8 << 20))          # the writer moved on
    assert src.covers(blob, 10 << 20, patient=False)
    part.rename(tmp_path / _name(blob))         # done (the staged length caps it)
    assert src.covers(blob, (8 << 20) + READER_LEAD - 1, patient=False)
    assert not src.covers(blob, 64 << 20) and not src.covers("sha256:" + "00" * 32, 0, patient=False)


def test_a_read_of_a_hot_files_far_end_does_not_wait_for_the_staging(registry, proxy, tmp_path):
    """The fetcher: a reader of a frame far beyond what early prefetch has staged (here a writer that
    stopped after two frames, as if still streaming everything before) gets it from the registry at once, not
    after the staging; it waited for the staging before (a 4 MiB read at the 80th MiB of a 100 MiB hot
    file: 7.7 s at 100 Mbit/s, bench_cold_start.py bigblob, the other workload)."""
    img = build_image(tmp_path / "img", registry.host, n_small=3, big_size=32 << 20, prefetch_paths=(b"/bin/big",))
    big_blob = max(img.blob_paths, key=lambda d: img.blob_paths[d].stat().st_size)
    data = img.blob_paths[big_blob].read_bytes()
    assert len(data) > (6 << 20)
    staging = tmp_path / "staging"
    staging.mkdir()
    bid = next(i for i, (d, _) in enumerate(img.table.blobs) if d == big_blob)
    frames = sorted((fr for fr in img.table.frames if fr.blob == bid), key=lambda fr: fr.offset)
    head = frames[1].offset + frames[1].csize
    (staging / (_name(big_blob) + ".part")).write_bytes(data[:head])   # a writer far behind, two frames in
    sources = [StagedSource(staging, {big_blob: len(data)}, stall_timeout=600),
               registry_source(img, proxy.url)]
    f = ChunkFetcher(Bootstrap(img.bootstrap), ChunkCache(tmp_path / "cache", 1 << 30), sources)
    rec = f.bootstrap.lookup_path(b"/bin/big")
    unique = (32 << 20) // 4
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(f.read(rec.ino, unique - (256 << 10), 256 << 10)),
                              daemon=True)
    try:
        reader.start()
        reader.join(60)   # a failure detector, not a timing claim: before, it waited for 600 s of stall
        assert got == [img.contents[b"/bin/big"][unique - (256 << 10):unique]]
        assert [r for r in proxy.blob_requests() if big_blob in r], "the far frame came from the registry"
        # what is within reach of the writer is still taken from the staged file
        proxy.reset()
        assert f.read(rec.ino, 0, 50_000) == img.contents[b"/bin/big"][:50_000]
        assert not [r for r in proxy.blob_requests() if big_blob in r], proxy.blob_requests()
    finally:
        f.close()
