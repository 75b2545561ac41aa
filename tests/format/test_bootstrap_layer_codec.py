"""remora.format.bootstrap_layer: the round trip, and every way a hostile layer is refused (bounded).

No root, no registry. Bombs are hand-built zstd frames of RLE blocks (bootstrap_craft.zstd_bomb): a
few bytes of input per 128 KiB of output, so a 4 GiB bomb is ~130 KB and costs nothing to make.
"""
from __future__ import annotations

import io
import resource
import tarfile
import time

import pytest
import zstandard
from bootstrap_craft import bomb_layer, sample_bootstrap, zstd_bomb

from remora.errors import InvalidInput
from remora.format import annotations as ann
from remora.format.bootstrap_layer import (
    MAX_BOOTSTRAP_USIZE,
    decode_bootstrap_layer,
    encode_bootstrap_layer,
    fetch_bootstrap_layer,
)


def _decode(tmp_path, layer: bytes, **kw):
    src = tmp_path / "layer.zst"
    src.write_bytes(layer)
    out = tmp_path / "out.db"
    return decode_bootstrap_layer(src, out, **kw)


def _tar(*members: tuple[tarfile.TarInfo, bytes], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name=ann.BOOTSTRAP_MEMBER, data=b"x" * 1000, kind=tarfile.REGTYPE, **kw):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for k, v in kw.items():
        setattr(info, k, v)
    return info, data if kind == tarfile.REGTYPE else None


def _zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True).compress(data)


def test_round_trip_is_byte_exact_and_deterministic(tmp_path):
    db = sample_bootstrap(tmp_path / "b.db")
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    p1, d1, s1, diff1 = encode_bootstrap_layer(db, tmp_path / "w1")
    p2, d2, _, diff2 = encode_bootstrap_layer(db, tmp_path / "w2")
    assert (d1, diff1) == (d2, diff2) and s1 == p1.stat().st_size
    out = decode_bootstrap_layer(p1, tmp_path / "out.db")
    assert out.read_bytes() == db.read_bytes()


def test_pax_header_naming_the_member_is_accepted(tmp_path):
    info, data = _member(name="other-name", data=b"payload")
    info.pax_headers = {"path": ann.BOOTSTRAP_MEMBER, "comment": "é" * 10}
    out = _decode(tmp_path, _zst(_tar((info, data))))
    assert out.read_bytes() == b"payload"


@pytest.mark.parametrize("usize", [4 << 30, MAX_BOOTSTRAP_USIZE + 1])
def test_declared_size_over_the_cap_is_refused_before_decompressing(tmp_path, usize):
    layer = bomb_layer(usize)
    assert len(layer) < 200_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with pytest.raises(InvalidInput, match="over the"):
        _decode(tmp_path, layer)
    assert time.monotonic() - t0 < 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB
    assert not (tmp_path / "out.db").exists()


def test_frame_without_a_declared_size_is_refused(tmp_path):
    with pytest.raises(InvalidInput, match="does not declare"):
        _decode(tmp_path, bomb_layer(64 << 20, declare=-1))


def test_frame_that_lies_about_its_size_stops_at_the_declared_size(tmp_path):
    """Declares 1 MiB, holds 256 MiB: decompression stops just past 1 MiB, nothing is kept."""
    t0 = time.monotonic()
    with pytest.raises(InvalidInput):
        _decode(tmp_path, bomb_layer(256 << 20, declare=1 << 20))
    assert time.monotonic() - t0 < 2
    assert not (tmp_path / "out.db").exists()


def test_second_frame_after_the_first_is_refused(tmp_path):
    good = _zst(_tar(_member()))
    with pytest.raises(InvalidInput, match="more than its declared size"):
        _decode(tmp_path, good + zstd_bomb(1 << 20))


def test_a_smaller_cap_bounds_what_is_written(tmp_path):
    with pytest.raises(InvalidInput, match="over the 1048576-byte limit"):
        _decode(tmp_path, bomb_layer(8 << 20), max_usize=1 << 20)


def test_huge_window_is_refused_before_allocation(tmp_path):
    frame = bytearray(zstd_bomb(1 << 20))
    frame[5] = (17 << 3)        # window descriptor: 2^(10+17) = 128 MiB
    with pytest.raises(InvalidInput, match="window"):
        _decode(tmp_path, bytes(frame))


@pytest.mark.parametrize("tar_bytes, match", [
    (_tar(_member(), _member(name="remora/extra")), "more than the bootstrap"),
    (_tar(_member(name="remora/other.db")), "expected"),
    (_tar(_member(kind=tarfile.SYMTYPE, linkname="/etc/shadow")), "one regular file"),
    (_tar(_member(kind=tarfile.LNKTYPE, linkname="x")), "one regular file"),
    (_tar(_member(name="remora", kind=tarfile.DIRTYPE), _member()), "one regular file"),
    (_tar(_member())[:700], "truncated"),
    (b"\0" * 10240, "empty"),
    (b"garbage!" * 128, "checksum"),
])
def test_only_the_one_bootstrap_member_is_accepted(tmp_path, tar_bytes, match):
    with pytest.raises(InvalidInput, match=match):
        _decode(tmp_path, _zst(tar_bytes))
    assert not (tmp_path / "out.db").exists()


def test_pax_header_too_big(tmp_path):
    info, data = _member()
    info.pax_headers = {"comment": "c" * 100_000}
    with pytest.raises(InvalidInput, match="PAX header"):
        _decode(tmp_path, _zst(_tar((info, data))))


def test_not_zstd_and_corrupt_zstd(tmp_path):
    with pytest.raises(InvalidInput, match="not a zstd frame"):
        _decode(tmp_path, b"\x1f\x8b" + b"\0" * 100)
    good = _zst(_tar(_member(data=bytes(range(256)) * 40)))
    with pytest.raises(InvalidInput, match="corrupt zstd|truncated"):
        _decode(tmp_path, good[:len(good) // 2])


def test_fetch_spools_and_bounds_the_compressed_size(tmp_path):
    layer = _zst(_tar(_member(data=b"db bytes")))
    seen = []
    out = fetch_bootstrap_layer(lambda: io.BytesIO(layer), len(layer), tmp_path, "x.db", lambda: seen.append(1))
    assert out.read_bytes() == b"db bytes" and seen == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]   # the spooled layer is gone
    with pytest.raises(InvalidInput, match="over the"):
        fetch_bootstrap_layer(lambda: io.BytesIO(layer), 2 << 30, tmp_path, "y.db")
