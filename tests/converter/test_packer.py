"""Packer layout: where frames land in a data blob."""
from __future__ import annotations

import os

import pytest

from remora.converter.packer import Packer
from remora.format.blob import decompress_frame

BATCH = 64 * 1024


def _pack(tmp_path, sizes: list[int], ordered: bool):
    packer = Packer(tmp_path, batch_size=BATCH, workers=2)
    try:
        packer.open_blob(ordered=ordered)
        refs = [packer.add(os.urandom(n)) for n in sizes]
        bid, _, _, path = packer.close_blob()
    finally:
        packer.close()
    table = packer.table
    frames = [table.frames[table.chunks[table.by_digest[r.digest]].frame] for r in refs]
    return frames, path, bid


@pytest.mark.parametrize("ordered", [True, False])
def test_small_files_before_a_big_one(tmp_path, ordered):
    """Access order small, small, BIG, small: an ordered blob keeps the first two in front of the big
    chunk (a container reads them first); the default packs all small ones into one later frame."""
    frames, path, bid = _pack(tmp_path, [1000, 2000, 3 * BATCH, 500], ordered)
    small1, small2, big, small3 = frames
    assert small1 is small2, "neighbouring small chunks still share a frame"
    if ordered:
        assert small1.offset < big.offset < small3.offset
        assert small3 is not small1
    else:
        assert big.offset < small1.offset and small3 is small1
    blob = path.read_bytes()
    for fr in {id(f): f for f in frames}.values():  # every frame is where the table says, and whole
        assert fr.blob == bid
        assert len(decompress_frame(blob[fr.offset:fr.offset + fr.csize], fr.usize)) == fr.usize


def test_ordered_blob_offsets_follow_first_use(tmp_path):
    sizes = [300, 2 * BATCH, 700, 900, 5 * BATCH, 100, BATCH + 1, 50]
    frames, _, _ = _pack(tmp_path, sizes, ordered=True)
    offsets = [f.offset for f in frames]
    assert offsets == sorted(offsets)
