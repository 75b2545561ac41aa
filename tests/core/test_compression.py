"""Layer (de)compression: magic detection, reproducible output, no silent short reads."""
import gzip
import io
import os
import subprocess

import pytest
import zstandard

from remora.compression import compress_stream, detect_compression, open_layer_stream
from remora.digest import sha256_digest
from remora.errors import InvalidInput, UsageError
from remora.oci import MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_OCI_LAYER_ZSTD
from remora_testing.imagebuild import tar_of_files

# compressible but not trivially so, a few MiB: exercises multi-chunk paths
DATA = b"".join(os.urandom(64) * 64 for _ in range(800))


def _roundtrip(comp):
    out = io.BytesIO()
    res = compress_stream(io.BytesIO(DATA), out, comp)
    blob = out.getvalue()
    assert res.size == len(blob) and res.digest == sha256_digest(blob)
    assert res.diff_id == sha256_digest(DATA) and res.uncompressed_size == len(DATA)
    assert detect_compression(blob[:4]) == comp
    return blob


@pytest.mark.parametrize("comp", ["gzip", "zstd", "none"])
def test_round_trip(comp):
    blob = _roundtrip(comp)
    assert open_layer_stream(io.BytesIO(blob)).read() == DATA


@pytest.mark.parametrize("comp", ["gzip", "zstd"])
def test_compression_is_reproducible(comp):
    assert _roundtrip(comp) == _roundtrip(comp)


def test_reads_standard_tools_output(tmp_path):
    """Interoperability: the CLI tools' output (multi-member gzip, multi-frame zstd) decodes."""
    p = tmp_path / "d"
    p.write_bytes(DATA)
    gz = subprocess.run(["gzip", "-c", str(p)], check=True, capture_output=True).stdout
    assert open_layer_stream(io.BytesIO(gz + gz)).read() == DATA + DATA
    zs = subprocess.run(["zstd", "-q", "-c", str(p)], check=True, capture_output=True).stdout
    assert open_layer_stream(io.BytesIO(zs + zs)).read() == DATA + DATA


def test_media_type_is_only_a_hint():
    blob = _roundtrip("zstd")
    assert open_layer_stream(io.BytesIO(blob), MEDIA_TYPE_OCI_LAYER_GZIP).read() == DATA
    tar = tar_of_files({"a": b"x"})
    assert open_layer_stream(io.BytesIO(tar), MEDIA_TYPE_OCI_LAYER_GZIP).read() == tar


def test_claimed_compressed_but_garbage():
    with pytest.raises(InvalidInput, match="neither"):
        open_layer_stream(io.BytesIO(b"garbage" * 100), MEDIA_TYPE_OCI_LAYER_ZSTD)


@pytest.mark.parametrize("cut", [1, 100, 5000])
def test_truncated_gzip(cut):
    blob = _roundtrip("gzip")
    with pytest.raises(InvalidInput, match="truncated gzip"):
        open_layer_stream(io.BytesIO(blob[:-cut])).read()


@pytest.mark.parametrize("cut", [1, 100, 5000])
def test_truncated_zstd(cut):
    blob = _roundtrip("zstd")
    with pytest.raises(InvalidInput, match="zstd"):
        open_layer_stream(io.BytesIO(blob[:-cut])).read()


def test_truncated_zstd_without_checksum_detected():
    # frames from other tools often lack a checksum: truncation must still be noticed
    blob = zstandard.ZstdCompressor(write_checksum=False).compress(DATA)
    assert open_layer_stream(io.BytesIO(blob)).read() == DATA
    with pytest.raises(InvalidInput, match="truncated"):
        open_layer_stream(io.BytesIO(blob[: len(blob) // 2])).read()


def test_corrupt_gzip():
    blob = bytearray(_roundtrip("gzip"))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(InvalidInput, match="gzip"):
        open_layer_stream(io.BytesIO(bytes(blob))).read()


def test_corrupt_zstd():
    blob = bytearray(_roundtrip("zstd"))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(InvalidInput, match="corrupt zstd"):
        open_layer_stream(io.BytesIO(bytes(blob))).read()


def test_gzip_trailing_garbage():
    blob = gzip.compress(b"abc") + b"JUNKJUNK"
    with pytest.raises(InvalidInput):
        open_layer_stream(io.BytesIO(blob)).read()


def test_empty_stream_is_empty_layer():
    assert open_layer_stream(io.BytesIO(b"")).read() == b""


def test_bad_level_and_algorithm():
    with pytest.raises(UsageError):
        compress_stream(io.BytesIO(b""), io.BytesIO(), "lz4")
    with pytest.raises(UsageError):
        compress_stream(io.BytesIO(b""), io.BytesIO(), "gzip", level=9)


def test_zstd_skippable_frames_anywhere():
    """zstd:chunked puts metadata in skippable frames; they must be skipped, even leading ones."""
    import struct
    skip = struct.pack("<II", 0x184D2A5E, 4) + b"meta"
    frame = zstandard.ZstdCompressor().compress(DATA)
    for blob in (skip + frame, frame + skip + frame, frame + skip):
        assert open_layer_stream(io.BytesIO(blob)).read() == DATA * blob.count(frame)


def test_streaming_tar_over_decompressed_layer():
    tar = tar_of_files({f"d/f{i}": bytes([i]) * (i * 100) for i in range(50)})
    out = io.BytesIO()
    compress_stream(io.BytesIO(tar), out, "zstd")
    import tarfile
    with tarfile.open(fileobj=open_layer_stream(io.BytesIO(out.getvalue())), mode="r|") as t:
        sizes = {m.name: m.size for m in t if m.isreg()}
    assert sizes == {f"d/f{i}": i * 100 for i in range(50)}
