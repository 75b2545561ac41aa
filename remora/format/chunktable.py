"""The chunk table: which chunks exist, in which frame of which blob they live.

Three levels, each a list indexed by position (ids are list indexes, so they are deterministic):

* blobs  — ``(digest, size)`` of every data blob the image needs (its own and reused ones);
* frames — ``(blob id, offset, csize, usize)``: a zstd frame inside a blob;
* chunks — ``(digest, size, frame id, offset in the uncompressed frame)``.

The converter fills a table while packing; the bootstrap stores it; a chunk dictionary is one too.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Frame:
    blob: int
    offset: int
    csize: int
    usize: int


@dataclass(slots=True)
class Chunk:
    digest: bytes
    size: int
    frame: int
    frame_offset: int


@dataclass
class ChunkTable:
    blobs: list[tuple[str, int]] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    by_digest: dict[bytes, int] = field(default_factory=dict)
    _blob_index: dict[str, int] = field(default_factory=dict)
    _frame_index: dict[tuple[int, int], int] = field(default_factory=dict)

    def blob_id(self, digest: str, size: int) -> int:
        bid = self._blob_index.get(digest)
        if bid is None:
            bid = self._blob_index[digest] = len(self.blobs)
            self.blobs.append((digest, size))
        return bid

    def set_blob(self, bid: int, digest: str, size: int) -> None:
        """Name a blob whose digest was unknown while it was being written."""
        old = self.blobs[bid][0]
        self._blob_index.pop(old, None)
        self.blobs[bid] = (digest, size)
        self._blob_index[digest] = bid

    def add_frame(self, blob: int, offset: int, csize: int, usize: int) -> int:
        key = (blob, offset)
        fid = self._frame_index.get(key)
        if fid is None:
            fid = self._frame_index[key] = len(self.frames)
            self.frames.append(Frame(blob, offset, csize, usize))
        return fid

    def add_chunk(self, digest: bytes, size: int, frame: int, frame_offset: int) -> int:
        cid = self.by_digest.get(digest)
        if cid is None:
            cid = self.by_digest[digest] = len(self.chunks)
            self.chunks.append(Chunk(digest, size, frame, frame_offset))
        return cid

    def import_chunk(self, other: ChunkTable, cid: int) -> int:
        """Copy chunk ``cid`` of ``other`` (a chunk dictionary) with its frame and blob into this table."""
        c = other.chunks[cid]
        f = other.frames[c.frame]
        digest, size = other.blobs[f.blob]
        fid = self.add_frame(self.blob_id(digest, size), f.offset, f.csize, f.usize)
        return self.add_chunk(c.digest, c.size, fid, c.frame_offset)

    def drop_unused_blobs(self) -> dict[int, int]:
        """Remove blobs no frame lives in (e.g. a layer with no new content); returns old id -> new id."""
        used = sorted({f.blob for f in self.frames})
        remap = {old: new for new, old in enumerate(used)}
        self.blobs = [self.blobs[old] for old in used]
        for f in self.frames:
            f.blob = remap[f.blob]
        self._blob_index = {d: i for i, (d, _) in enumerate(self.blobs)}
        self._frame_index = {(f.blob, f.offset): i for i, f in enumerate(self.frames)}
        return remap
