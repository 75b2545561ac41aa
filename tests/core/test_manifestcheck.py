"""remora.registry.manifestcheck: the size bound and the digest rule every manifest read shares."""
from __future__ import annotations

import hashlib

import pytest

from remora.errors import DigestMismatch, InvalidInput
from remora.registry.manifestcheck import MAX_MANIFEST_SIZE, check_declared_length, check_manifest

BODY = b'{"schemaVersion": 2}'
SHA256 = "sha256:" + hashlib.sha256(BODY).hexdigest()
SHA512 = "sha512:" + hashlib.sha512(BODY).hexdigest()


def test_by_digest_the_bytes_must_hash_to_it():
    assert check_manifest(BODY, SHA256, "", "m") == SHA256
    assert check_manifest(BODY, SHA512, "", "m") == SHA512          # in the reference's own algorithm
    other = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatch, match="expected sha256:0000") as err:
        check_manifest(BODY, other, SHA256, "m")                    # a matching header does not help
    assert err.value.actual == SHA256


def test_by_tag_the_servers_claim_is_checked_when_it_makes_one():
    assert check_manifest(BODY, "v1", "", "m") == SHA256            # no claim: the digest of the bytes
    assert check_manifest(BODY, "v1", SHA256, "m") == SHA256
    assert check_manifest(BODY, "v1", SHA512, "m") == SHA256        # a sha512 claim, checked as sha512
    with pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
        check_manifest(BODY, "v1", "sha256:" + "1" * 64, "m")
    with pytest.raises(DigestMismatch):
        check_manifest(BODY, "v1", "sha512:" + "2" * 128, "m")


def test_the_size_bound_holds_for_the_header_and_for_the_bytes():
    check_declared_length(str(MAX_MANIFEST_SIZE), "m")
    check_declared_length(None, "m")
    check_declared_length("not a number", "m")                      # the bytes read are still bounded
    with pytest.raises(InvalidInput, match="over the 4194304 byte limit"):
        check_declared_length(str(MAX_MANIFEST_SIZE + 1), "m")
    with pytest.raises(InvalidInput, match="over the 4194304 byte limit"):
        check_declared_length(MAX_MANIFEST_SIZE + 1, "m")
    big = b" " * (MAX_MANIFEST_SIZE + 1)
    with pytest.raises(InvalidInput, match="byte limit"):
        check_manifest(big, "sha256:" + hashlib.sha256(big).hexdigest(), "", "m")   # before any hashing
