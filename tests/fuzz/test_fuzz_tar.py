"""Fuzz the layer tar reader (converter/tarstream.py under converter/merge.py): any bytes, or a valid
layer with bytes overwritten, cut or spliced, end in a merged tree or a clean InvalidInput, within
the address-space cap of tests/fuzz/conftest.py and in bounded time."""
from __future__ import annotations

import io
import tarfile
import time

from hypothesis import given
from hypothesis import strategies as st

from remora.converter.merge import LayerMerger, hashing_sink
from remora.converter.tarstream import FastTarInfo, ForwardReader
from remora.errors import RemoraError
from remora_testing.tarbuild import LayerBuilder


def _seed(fmt: int) -> bytes:
    b = LayerBuilder(format=fmt)
    b.add_dir("etc").add_file("etc/hello", b"hello\n", xattrs={"user.k": b"v"} if fmt == tarfile.PAX_FORMAT else None)
    b.add_file("d" * 120 + "/long", b"x" * 700).add_symlink("etc/link", "../etc/hello")
    b.add_hardlink("etc/hl", "etc/hello").add_fifo("fifo").whiteout("gone").add_char("null", 1, 3)
    if fmt == tarfile.PAX_FORMAT:
        b.add_sparse("sparse", 1 << 20, {0: b"head", 600_000: b"mid"})
    return b.build("none")


SEEDS = [_seed(tarfile.PAX_FORMAT), _seed(tarfile.GNU_FORMAT), _seed(tarfile.USTAR_FORMAT)]


def _merge(data: bytes) -> None:
    started = time.monotonic()
    try:
        m = LayerMerger()
        m.apply_layer(io.BytesIO(data), hashing_sink, label="fuzz")
        m.finish()
    except RemoraError:
        pass
    assert time.monotonic() - started < 10, "one input took more than 10 s"


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["set", "digits", "cut", "splice"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "digits":        # numbers in headers are ASCII octal / decimal (PAX): make them big
            data[pos:pos + 11] = draw(st.sampled_from([b"77777777777", b"99999999999",
                                                       b"\x80\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"]))
        elif op == "cut":
            del data[pos:]
            if not data:
                break
        else:
            data[pos:pos] = draw(st.binary(max_size=600))
    return bytes(data)


@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    _merge(data)


@given(mutated())
def test_mutated_layers(data):
    _merge(data)


@given(st.dictionaries(st.sampled_from(["path", "linkpath", "size", "mtime", "uid", "GNU.sparse.map",
                                        "GNU.sparse.size", "GNU.sparse.major", "GNU.sparse.minor",
                                        "GNU.sparse.realsize", "GNU.sparse.name", "SCHILY.xattr.user.a",
                                        "SCHILY.xattr.", "hdrcharset"]),
                       st.one_of(st.text(max_size=40), st.sampled_from(["99999999999999999999", "-1", "1e9",
                                                                        "0,1,2", "BINARY", "..", "/"]))),
       st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.GNUTYPE_SPARSE]))
def test_hostile_pax_headers(pax, kind):
    info = tarfile.TarInfo("f")
    info.type = kind
    info.size = 3 if kind in (tarfile.REGTYPE, tarfile.GNUTYPE_SPARSE) else 0
    info.pax_headers = pax
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            t.addfile(info, io.BytesIO(b"abc") if info.size else None)
    except (ValueError, UnicodeError, tarfile.TarError):
        return                      # tarfile itself cannot write it
    _merge(buf.getvalue())


@given(st.binary(max_size=2048), st.lists(st.integers(-1, 5000), max_size=20))
def test_forward_reader_reads_and_seeks(data, ops):
    r = ForwardReader(io.BytesIO(data), block=64)
    pos = 0
    for n in ops:
        if n % 3 == 0:
            target = pos + n // 3
            try:
                r.seek(target)
            except (OSError, ValueError, io.UnsupportedOperation):
                continue
            pos = min(target, len(data)) if target >= pos else pos
        else:
            got = r.read(n)
            want = data[pos:] if n < 0 else data[pos:pos + n]
            assert got == want
            pos += len(got)
        assert r.tell() >= 0


@given(st.binary(min_size=512, max_size=512))
def test_header_parser(buf):
    try:
        FastTarInfo.frombuf(buf, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        pass
