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
