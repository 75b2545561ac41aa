"""The merge's fast paths change no result: a layer stack merged with them (tar headers read without
``TarFile.next``, the last parent directory remembered, own paths not tracked over an empty tree) gives
the same tree, or the same error, as with each of them turned off. Inputs: generated layer stacks with
symlinked parents (``..`` in targets too), whiteouts, opaque dirs, hard links and replaced directories,
and valid layers with bytes overwritten or cut."""
from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import remora.converter.merge as merge
from remora.converter.merge import LayerMerger, hashing_sink
from remora.errors import RemoraError
from remora_testing.tarbuild import LayerBuilder

_NAMES = ["a", "b", "a/b", "a/c", "b/c", "a/b/c", "l", "l/x", "a/l", "a/l/y", "m", "m/z"]
_TARGETS = ["a", "/a", "a/b", "../a", "a/../b", "b/..", "l", "/", "nope", "a/b/../c"]


def _snapshot(layers: list[bytes]):
    """The merged tree as comparable data, or the error it raised."""
    m = LayerMerger()
    try:
        for i, data in enumerate(layers):
            m.apply_layer(io.BytesIO(data), hashing_sink, label=f"l{i}")
        tree = m.finish()
    except RemoraError as e:
        return ("error", type(e).__name__, str(e))
    return [(path, n.ino, n.mode, n.uid, n.gid, n.mtime_ns, n.size, n.rdev, n.target, n.nlink, sorted(n.xattrs.items()),
             [c.digest for c in n.chunks] if n.chunks is not None else None) for path, n in tree.walk()]


def _slow(monkeypatch):
    monkeypatch.setattr(merge, "_next_member", lambda tf, reader: tf.next())
    monkeypatch.setattr(LayerMerger, "_parent_dir", lambda self, parts, member: self._resolve_dir(parts, member, True))
    monkeypatch.setattr(LayerMerger, "_has_lower", lambda self: True)
    monkeypatch.setattr(LayerMerger, "_fast_regulars", lambda self, tf, reader, whole, stats: None)


def _compare(layers: list[bytes]) -> None:
    fast = _snapshot(layers)
    with pytest.MonkeyPatch.context() as mp:
        _slow(mp)
        slow = _snapshot(layers)
    assert fast == slow


@st.composite
def layer(draw, fmt: int) -> bytes:
    b = LayerBuilder(format=fmt)
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["dir", "file", "symlink", "hardlink", "whiteout", "opaque", "fifo"]))
        name = draw(st.sampled_from(_NAMES))
        if kind == "dir":
            b.add_dir(name, mode=draw(st.sampled_from([0o755, 0o700])), uid=draw(st.integers(0, 3)))
        elif kind == "file":
            b.add_file(name, draw(st.binary(max_size=40)), mtime=draw(st.sampled_from([0, 1700000000, "1700000000.5"])))
        elif kind == "symlink":
            b.add_symlink(name, draw(st.sampled_from(_TARGETS)))
        elif kind == "hardlink":
            b.add_hardlink(name, draw(st.sampled_from(_NAMES)))
        elif kind == "whiteout":
            b.whiteout(name)
        elif kind == "opaque":
            b.opaque(draw(st.sampled_from(["a", "b", "a/b", "l"])))
        else:
            b.add_fifo(name)
    return b.build("none")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]).flatmap(
    lambda fmt: st.lists(layer(fmt), min_size=1, max_size=3)))
def test_generated_layer_stacks(layers):
    _compare(layers)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]).flatmap(layer),
       st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4), st.integers(0, 1 << 16))
def test_damaged_layers(data, writes, cut):
    buf = bytearray(data)
    for pos, value in writes:
        if pos < len(buf):
            buf[pos] = value
    _compare([bytes(buf[:cut] if cut < len(buf) else buf)])


def test_hard_link_through_symlink_with_dotdot():
    """A hard link whose target's parent resolves through a symlink with ``..`` (the lookup used to
    index an empty list and crash); same result on both paths."""
    b = LayerBuilder().add_dir("d").add_dir("e").add_file("e/f", b"x").add_symlink("l", "d/../e")
    b.add_hardlink("h", "l/f")
    fast = _snapshot([b.build("none")])
    assert fast[0] != "error", fast
    assert [row for row in fast if row[0] == b"/h"][0][9] == 2       # nlink of the shared inode
    _compare([b.build("none")])


def _many_files_layer(fmt: int, seed: int, mtime: int | str = 1_700_000_000) -> bytes:
    """Directories of small files (the case the fused loop is for), with what must leave it: a
    symlinked parent, a whiteout, an opaque dir, a hard link, an empty file, a replaced file, a
    file too big for one read buffer, long names that need a ustar prefix."""
    rnd = __import__("random").Random(seed)
    b = LayerBuilder(format=fmt)
    for d in range(6):
        b.add_dir(f"d{d}")
        for i in range(rnd.randint(5, 40)):
            b.add_file(f"d{d}/f{i}", rnd.randbytes(rnd.choice([0, 1, 100, 511, 512, 513, 5000])), mtime=mtime)
        b.add_file(f"d{d}/f0", b"replaced", mtime=mtime)
    b.add_symlink("s", "d1")
    b.add_file("s/via-link", b"through a symlinked parent")
    b.add_file("d2/after-link", b"back in a plain dir")
    b.whiteout("d3/f1").opaque("d4")
    b.add_hardlink("d5/link", "d5/f0")
    b.add_file("d5/big", rnd.randbytes(1_200_000))
    b.add_file("d5/tail", b"after the big one")
    long = "/".join(["p" * 60] * 3)
    b.add_dir(long)
    b.add_file(long + "/x" * 1, b"prefixed name")
    b.add_file(long + "/y", b"prefixed name too")
    return b.build("none")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_regular_loop_gives_the_same_tree_and_takes_most_files(fmt, monkeypatch):
    """The fused loop for plain members (LayerMerger._fast_regulars) changes no result over one and
    several layers (own paths tracked), and really takes them: the general path (``_next_member``)
    sees only what the loop leaves (whiteouts, hard links, a file across the read buffer's end)."""
    layers = [_many_files_layer(fmt, 1), _many_files_layer(fmt, 2), _many_files_layer(fmt, 3, mtime="1700000000.25")]
    _compare(layers)
    _compare(layers[:1])
    calls = []
    real = merge._next_member
    monkeypatch.setattr(merge, "_next_member", lambda tf, reader: calls.append(1) or real(tf, reader))
    m = LayerMerger()
    stats = m.apply_layer(io.BytesIO(layers[0]), hashing_sink)
    assert stats.files > 100
    assert len(calls) < stats.entries - 100, (len(calls), stats.entries)


def _pax_layer(records: dict[str, str], n: int = 20) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("d")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(d)
        for i in range(n):
            ti = tarfile.TarInfo(f"d/f{i}")
            data = bytes([i]) * (i * 97)
            ti.size, ti.mtime, ti.pax_headers = len(data), 1_700_000_000 + i, dict(records)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("records", [
    {"mtime": "1700000000.123456789"}, {"mtime": "1700000000"}, {"atime": "1.5", "ctime": "2.25"},
    {"mtime": "1700000000.5", "atime": "1700000001.5", "ctime": "1700000002.5"},
    {"mtime": "17e8"}, {"mtime": "-1.5"}, {"mtime": "nan"}, {"mtime": ""},
    {"mtime": "1.5", "path": "d/renamed"}, {"mtime": "1.5", "SCHILY.xattr.user.a": "v"},
    {"mtime": "1.5", "uid": "7"}, {"mtime": "1.5", "size": "3"}, {"hdrcharset": "BINARY", "mtime": "1.5"},
    {"mtime": "1.5", "comment": "x" * 5000},
])
def test_pax_time_headers_give_the_same_tree_as_tarfile(records):
    """The fused loop takes a PAX header holding only well-formed time records and leaves every
    other one to tarfile: the merged tree (or the error) is the general path's."""
    _compare([_pax_layer(records)])


@pytest.mark.parametrize("pos,value", [(0, b"29 mtime=1700000000.12345678\n"), (0, b"28 mtime=1700000000.1234567\n"),
                                       (3, b"q"), (20, b"\x00"), (27, b"\x00"), (27, b"7")])
def test_damaged_pax_time_records_give_the_same_result(pos, value):
    """Record lengths that do not match, a record without its newline, a NUL inside the value:
    what tarfile makes of each, both paths make of it."""
    data = bytearray(_pax_layer({"mtime": "1700000000.1234567"}))
    # every member's PAX block starts one block after its 'x' header; damage the third one's
    starts = [i for i in range(0, len(data), 512) if data[i + 156:i + 157] == b"x"]
    at = starts[3] + 512
    data[at + pos:at + pos + len(value)] = value
    # the 'x' header's size field must still be right for tarfile to find the next header: keep it
    _compare([bytes(data)])


def test_pax_time_headers_are_taken_by_the_fused_loop(monkeypatch):
    """Members behind a PAX header of times only (every member of a tar Python's tarfile or
    ``tar --posix`` wrote with sub-second mtimes) do not go through the general path."""
    calls = []
    real = merge._next_member
    monkeypatch.setattr(merge, "_next_member", lambda tf, reader: calls.append(1) or real(tf, reader))
    m = LayerMerger()
    stats = m.apply_layer(io.BytesIO(_pax_layer({"mtime": "1700000000.5", "atime": "1700000000.25"}, n=30)),
                          hashing_sink)
    assert stats.files == 30
    assert len(calls) <= 3, len(calls)          # the directory, the first file, the end
    assert m.finish().lookup(b"/d/f7").mtime_ns == 1_700_000_000_500_000_000


@pytest.mark.parametrize("mtime", [1_700_000_000, "1700000000.75"])
def test_directories_and_symlinks_are_taken_by_the_fused_loop(mtime, monkeypatch):
    """Directories (new ones and one over an existing directory) and symlinks, plain or behind a
    PAX header of times, stay in the fused loop; the tree is the general path's."""
    b = LayerBuilder(format=tarfile.PAX_FORMAT).add_file("first", b"1", mtime=mtime)
    for i in range(20):
        b.add_dir(f"d{i}", mode=0o750, uid=i, mtime=mtime).add_symlink(f"d{i}/up", "..", mtime=mtime)
        b.add_file(f"d{i}/f", b"x" * i, mtime=mtime)
    b.add_dir("d3", mode=0o700, mtime=mtime)
    layer = b.build("none")
    _compare([layer])
    calls = []
    real = merge._next_member
    monkeypatch.setattr(merge, "_next_member", lambda tf, reader: calls.append(1) or real(tf, reader))
    m = LayerMerger()
    stats = m.apply_layer(io.BytesIO(layer), hashing_sink)
    assert stats.entries == 62
    assert len(calls) <= 2, len(calls)      # the first member and the end
    tree = m.finish()
    assert tree.lookup(b"/d3").mode & 0o7777 == 0o700 and tree.lookup(b"/d3/f") is not None
    assert tree.lookup(b"/d5/up").target == b".."
