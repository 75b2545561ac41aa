"""The tar fast paths must behave exactly like tarfile: same fields, same exceptions."""
from __future__ import annotations

import io
import random
import tarfile

import pytest

from remora.converter.tarstream import FastTarInfo, ForwardReader

ENC, ERR = "utf-8", "surrogateescape"
FIELDS = ("name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname", "uname", "gname",
          "devmajor", "devminor")


def _header(name="usr/bin/tool", fmt=tarfile.USTAR_FORMAT, **attrs) -> bytes:
    ti = tarfile.TarInfo(name)
    for k, v in attrs.items():
        setattr(ti, k, v)
    # the last 512 bytes of the encoding are the member's own header (PAX/GNU records come first)
    return ti.tobuf(fmt, ENC, ERR)[-512:]


def _same(buf: bytes) -> None:
    try:
        want = tarfile.TarInfo.frombuf(buf, ENC, ERR)
    except tarfile.HeaderError as e:
        with pytest.raises(type(e), match=str(e)):
            FastTarInfo.frombuf(buf, ENC, ERR)
        return
    got = FastTarInfo.frombuf(buf, ENC, ERR)
    assert isinstance(got, FastTarInfo)
    for f in FIELDS:
        assert getattr(got, f) == getattr(want, f), f


def _with_chksum(buf: bytes, signed: bool = False) -> bytes:
    b = bytearray(buf)
    b[148:156] = b" " * 8
    total = sum(x - 256 if signed and x > 127 else x for x in b)
    b[148:156] = b"%06o\0 " % (total & 0o777777)
    return bytes(b)


@pytest.mark.parametrize("buf", [
    _header(),
    _header(size=12345, mode=0o4755, uid=1000, gid=1000, mtime=1_700_000_000, uname="u", gname="g"),
    _header("dir/", type=tarfile.DIRTYPE),
    _header("a/" * 60 + "file"),                                     # ustar prefix field
    _header("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
    _header("lnk", type=tarfile.SYMTYPE, linkname="../target"),
    _header("big", tarfile.GNU_FORMAT, uid=8 ** 8, size=8 ** 12),    # base-256 numbers
    _header("neg", tarfile.GNU_FORMAT, mtime=-1),
    _header("ünïcödé"),
    _header("x" * 150, tarfile.GNU_FORMAT),                          # after a GNU long name header
    b"\0" * 512,                                                     # end of archive
    b"\0" * 100,                                                     # truncated
    b"",
    b"garbage!" * 64,
], ids=lambda b: repr(b[:12]))
def test_frombuf_matches_tarfile(buf):
    _same(buf)


def test_frombuf_odd_headers_match_tarfile():
    base = bytearray(_header(size=10))
    old_dir = bytearray(_header("olddir/", type=tarfile.AREGTYPE))
    cases = [
        _with_chksum(bytes(base[:100]) + b"  0644 \0" + bytes(base[108:])),   # spaces around the octal
        _with_chksum(bytes(base[:124]) + b"00000000012\0" + bytes(base[136:])),
        _with_chksum(bytes(base[:100]) + b"0644\0zz\0" + bytes(base[108:])),  # text after the NUL
        _with_chksum(bytes(base[:100]) + b"06x4\0\0\0\0" + bytes(base[108:])),  # not octal
        _with_chksum(bytes(old_dir)),                                         # V7 directory
        bytes(base[:148]) + b"0000000\0" + bytes(base[156:]),                 # bad checksum
    ]
    high = bytearray(_header("h\xe9", size=1))
    cases.append(_with_chksum(bytes(high), signed=True))                      # signed checksum
    rng = random.Random(7)
    for _ in range(300):                                                      # random corruption
        b = bytearray(_header(size=rng.randrange(1 << 30), mode=0o644, mtime=rng.randrange(1 << 33)))
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(512)] = rng.randrange(256)
        cases.append(bytes(b))
        cases.append(_with_chksum(bytes(b)))
    for buf in cases:
        _same(buf)


def test_forward_reader_reads_like_the_stream():
    data = random.Random(1).randbytes(3_000_000)

    class Chunky(io.RawIOBase):     # returns short, irregular reads like a decompressor
        def __init__(self):
            self.f = io.BytesIO(data)
            self.rng = random.Random(2)

        def read(self, n=-1):
            return self.f.read(min(n, self.rng.randrange(1, 300_000)))

    r = ForwardReader(Chunky(), block=65536)
    rng = random.Random(3)
    pos, out = 0, []
    while True:
        if rng.random() < 0.2:
            pos += rng.randrange(0, 5000)
            assert r.seek(pos) == min(pos, len(data))
            pos = r.tell()
        piece = r.read(rng.choice([1, 512, 4096, 1 << 20, 3 << 20]))
        if not piece:
            break
        assert piece == data[pos:pos + len(piece)]
        pos += len(piece)
        out.append(piece)
        assert r.tell() == pos
    assert pos == len(data)
    with pytest.raises(io.UnsupportedOperation):
        r.seek(pos - 1)


def test_tarfile_over_forward_reader_lists_members():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(50):
            data = bytes([i]) * (i * 100)
            ti = tarfile.TarInfo(f"d/f{i}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    buf.seek(0)
    tf = tarfile.open(fileobj=ForwardReader(io.BufferedReader(buf, 777)), mode="r:", tarinfo=FastTarInfo)
    seen = []
    for ti in tf:
        if ti.name.endswith(("3", "7")):
            seen.append(tf.extractfile(ti).read())   # read some, skip others: only forward seeks
    assert seen == [bytes([i]) * (i * 100) for i in range(50) if i % 10 in (3, 7)]


def test_fast_path_taken_for_common_headers():
    # the point of FastTarInfo: ordinary ustar/PAX headers must not fall back to tarfile.frombuf
    for buf in (_header(), _header("dir/", type=tarfile.DIRTYPE), _header("a/" * 60 + "f"),
                _header("p", tarfile.PAX_FORMAT, size=5, mtime=1_700_000_000)):
        assert FastTarInfo._frombuf_fast(buf, ENC, ERR) is not None
