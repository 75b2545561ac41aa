"""Pack chunks into data blobs: dedup, small-chunk batching, parallel zstd, in-order writes.

Every chunk is hashed (sha256 of its uncompressed bytes). A digest already in the image's chunk table
is stored once (dedup across the layers of one image); a digest found in the chunk dictionary is
referenced where it already lives in the registry (dedup across images). New chunks go into frames:
a chunk of ``batch_size`` bytes or more gets a frame of its own; smaller ones (small files, file tails)
are appended to a shared batch frame until it reaches ``batch_size``, so one range request brings many
small files. Frames are compressed on a thread pool (zstandard releases the GIL) and written to the
current blob strictly in submission order, so output is reproducible whatever the thread timing.
Writes go through one writer thread: a frame's offset is known as soon as its compressed size is,
and the thread that parses the layers never waits for a busy disk.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from hashlib import sha256 as _sha256
from pathlib import Path

from remora.format.blob import TAR_HEADER_SIZE, BlobWriter, compress_frame
from remora.format.chunktable import Chunk, ChunkTable, Frame
from remora.format.tree import ChunkRef


@dataclass
class PackStats:
    chunks_seen: int = 0          # chunk occurrences in the input
    bytes_seen: int = 0
    chunks_stored: int = 0        # new chunks written to our blobs
    bytes_stored: int = 0         # their uncompressed bytes
    chunks_deduped: int = 0       # occurrences already in this image
    bytes_deduped: int = 0
    chunks_reused: int = 0        # taken from the chunk dictionary
    bytes_reused: int = 0
    compressed_bytes: int = 0     # frame bytes written


class _Lane:
    """One destination blob with its own open batch frame."""

    def __init__(self, packer: Packer, bid: int, path: Path):
        self.bid = bid
        self.writer = BlobWriter(path)
        self.batch = bytearray()
        self.batch_frame: int | None = None
        self.pending: deque[tuple[Frame, Future]] = deque()
        self.ordered = False                              # seal the batch before a big chunk's frame
        self.payload = 0                                  # compressed bytes handed to the writer
        self.writes: deque[tuple[Future, tuple[int, int]]] = deque()
        self.packer = packer

    def wait_writes(self, keep: int = 0) -> None:
        """Let at most ``keep`` writes be outstanding; a failed write raises here."""
        while self.writes and (len(self.writes) > keep or self.writes[0][0].done()):
            fut, expected = self.writes.popleft()
            if fut.result() != expected:
                raise RuntimeError(f"blob writer put a frame at {fut.result()}, expected {expected}")


class Packer:
    def __init__(self, workdir: Path, table: ChunkTable | None = None, *, level: int = 3,
                 batch_size: int = 256 * 1024, workers: int = 2, chunk_dict: ChunkTable | None = None,
                 max_pending: int = 16):
        self.workdir = Path(workdir)
        self.table = table or ChunkTable()
        self.level = level
        self.batch_size = batch_size
        self.dict = chunk_dict
        self.stats = PackStats()
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="zstd")
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-writer")  # one: in order
        self._lane: _Lane | None = None
        self._blob_files: dict[int, Path] = {}

    # -- blobs --------------------------------------------------------------------------------
    def open_blob(self, ordered: bool = False) -> int:
        """Start a new data blob; following :meth:`add` calls store new chunks there.

        ``ordered`` keeps the blob in first-use order: an open batch frame is sealed before a chunk
        that gets a frame of its own, so small files added before a big one are not placed after it.
        For the hot blob, read front to back while a container starts (slightly more frames)."""
        self.close_blob()
        n = len(self._blob_files)
        bid = self.table.blob_id(f"pending:{n}", 0)
        path = self.workdir / f"blob-{n}.tar"
        self._blob_files[bid] = path
        self._lane = _Lane(self, bid, path)
        self._lane.ordered = ordered
        return bid

    def close_blob(self) -> tuple[int, str, int, Path] | None:
        """Seal the current blob. Returns ``(blob id, digest, size, path)``, or None if it stayed empty."""
        lane, self._lane = self._lane, None
        if lane is None:
            return None
        try:
            self._flush_batch(lane)
            self._drain(lane, 0)
            lane.wait_writes()
        except BaseException:
            self._lane = lane       # a failed write (disk full): abort() closes and removes the file
            raise
        if lane.writer.frames == 0:
            lane.writer.abort()
            del self._blob_files[lane.bid]
            self.table.blobs[lane.bid] = (f"empty:{lane.bid}", 0)
            return None
        digest, size = lane.writer.close()
        self.table.set_blob(lane.bid, digest, size)
        return lane.bid, digest, size, lane.writer.path

    # -- chunks -------------------------------------------------------------------------------
    def add(self, data: bytes | memoryview, digest: bytes | None = None) -> ChunkRef:
        size = len(data)
        if digest is None:
            digest = _sha256(data).digest()
        st = self.stats
        st.chunks_seen += 1
        st.bytes_seen += size
        table = self.table
        by_digest = table.by_digest
        if digest in by_digest:
            st.chunks_deduped += 1
            st.bytes_deduped += size
            return ChunkRef(digest, size)
        if self.dict is not None and digest in self.dict.by_digest:
            table.import_chunk(self.dict, self.dict.by_digest[digest])
            st.chunks_reused += 1
            st.bytes_reused += size
            return ChunkRef(digest, size)
        lane = self._lane or self._lane_for_new()
        st.chunks_stored += 1
        st.bytes_stored += size
        frames, chunks = table.frames, table.chunks
        # ChunkTable.add_chunk without its second lookup: the digest is new (checked above)
        by_digest[digest] = len(chunks)
        if size >= self.batch_size:
            if lane.ordered:
                self._flush_batch(lane)
            frames.append(Frame(lane.bid, -1, 0, size))
            chunks.append(Chunk(digest, size, len(frames) - 1, 0))
            self._submit(lane, frames[-1], data)
        else:
            batch = lane.batch
            if lane.batch_frame is None:
                frames.append(Frame(lane.bid, -1, 0, 0))
                lane.batch_frame = len(frames) - 1
            chunks.append(Chunk(digest, size, lane.batch_frame, len(batch)))
            batch += data
            if len(batch) >= self.batch_size:
                self._flush_batch(lane)
        return ChunkRef(digest, size)

    def _lane_for_new(self) -> _Lane:
        self.open_blob()
        assert self._lane is not None
        return self._lane

    def _flush_batch(self, lane: _Lane) -> None:
        if lane.batch_frame is None:
            return
        frame = self.table.frames[lane.batch_frame]
        frame.usize = len(lane.batch)
        data, lane.batch = lane.batch, bytearray()     # hand the buffer over: no copy
        lane.batch_frame = None
        self._submit(lane, frame, data)

    def _submit(self, lane: _Lane, frame: Frame, data: bytes | bytearray | memoryview) -> None:
        lane.pending.append((frame, self._pool.submit(compress_frame, data, self.level)))
        self._drain(lane, self.max_pending)

    def _drain(self, lane: _Lane, keep: int) -> None:
        while len(lane.pending) > keep:
            frame, fut = lane.pending.popleft()
            compressed = fut.result()
            frame.offset, frame.csize = TAR_HEADER_SIZE + lane.payload, len(compressed)
            lane.payload += frame.csize
            lane.writes.append((self._io.submit(lane.writer.add_frame, compressed), (frame.offset, frame.csize)))
            lane.wait_writes(self.max_pending)
            self.stats.compressed_bytes += frame.csize

    def blob_path(self, bid: int) -> Path | None:
        """The local file of a blob this packer wrote; None for blobs reused from a dictionary."""
        return self._blob_files.get(bid)

    def close(self) -> None:
        self.close_blob()
        self._pool.shutdown(wait=True)
        self._io.shutdown(wait=True)

    def abort(self) -> None:
        lane, self._lane = self._lane, None
        if lane is not None:
            for _, fut in lane.pending:
                fut.cancel()
            self._io.shutdown(wait=True, cancel_futures=True)   # no write may land after the unlink
            try:
                lane.writer.abort()
            except OSError:     # closing flushes buffered bytes, which fails on a full disk
                lane.writer.path.unlink(missing_ok=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True, cancel_futures=True)
