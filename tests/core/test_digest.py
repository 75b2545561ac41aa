"""Digest helpers: validation and the verifying stream every download goes through."""
import io

import pytest

from remora.digest import VerifyingReader, hash_file, sha256_digest, validate_digest, verify_bytes
from remora.errors import DigestMismatch, InvalidInput

DATA = b"hello remora\n" * 1000
GOOD = sha256_digest(DATA)


@pytest.mark.parametrize("bad", [
    "", "sha256:", "sha256:abc", "md5:" + "a" * 32, "sha256:" + "A" * 64, "sha256:" + "g" * 64,
    "sha256:" + "a" * 63, "sha512:" + "a" * 64, "sha256:" + "a" * 64 + "\n", "sha256:../../etc/passwd",
])
def test_validate_digest_rejects_malformed(bad):
    with pytest.raises(InvalidInput):
        validate_digest(bad)


def test_validate_digest_accepts_sha256_and_sha512():
    assert validate_digest("sha256:" + "0" * 64) == "sha256:" + "0" * 64
    assert validate_digest("sha512:" + "f" * 128)


def test_sha256_digest_known_value():
    assert sha256_digest(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_hash_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(DATA)
    assert hash_file(p) == (GOOD, len(DATA))


def test_verify_bytes():
    assert verify_bytes(DATA, GOOD) == DATA
    with pytest.raises(DigestMismatch):
        verify_bytes(DATA + b"x", GOOD)


def test_verifying_reader_passes_good_data_in_small_reads():
    r = VerifyingReader(io.BytesIO(DATA), GOOD, len(DATA))
    out = b""
    while chunk := r.read(7):
        out += chunk
    assert out == DATA and r.verified


def test_verifying_reader_mismatch_raised_at_eof():
    bad = bytearray(DATA)
    bad[100] ^= 1
    r = VerifyingReader(io.BytesIO(bytes(bad)), GOOD, len(DATA))
    first = r.read(50)
    assert len(first) == 50  # bytes flow until EOF...
    with pytest.raises(DigestMismatch) as e:
        r.read()  # ...where the check fails
    assert e.value.expected == GOOD
    assert not r.verified


def test_verifying_reader_truncated():
    r = VerifyingReader(io.BytesIO(DATA[:-1]), GOOD, len(DATA))
    with pytest.raises(InvalidInput, match="truncated"):
        r.read()


def test_verifying_reader_too_long_never_hands_out_extra_bytes():
    r = VerifyingReader(io.BytesIO(DATA + b"extra"), GOOD, len(DATA))
    assert r.read(len(DATA)) == DATA
    with pytest.raises(InvalidInput, match="more data"):
        r.read(10)


def test_verifying_reader_without_size_still_checks_digest():
    with pytest.raises(DigestMismatch):
        VerifyingReader(io.BytesIO(b"other"), GOOD).read()


def test_verifying_reader_works_with_buffered_reader():
    r = io.BufferedReader(VerifyingReader(io.BytesIO(DATA), GOOD, len(DATA)))
    assert r.read() == DATA
