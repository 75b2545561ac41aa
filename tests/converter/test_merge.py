"""Layer merge (remora.converter.merge) against OCI layer.md + containerd apply semantics.

Every layer is crafted with remora_testing.tarbuild (or written by GNU tar / Python's tarfile for the
real-content tests) and merged with the real merger; content is checked through a HashingSink that
keeps chunk bytes, so a wrong byte anywhere fails.
"""
from __future__ import annotations

import hashlib
import io
import os
import resource
import stat
import subprocess
import sys
import tarfile

import pytest

from remora.converter.merge import HashingSink, LayerMerger, LayerStats, hashing_sink
from remora.errors import InvalidInput
from remora.format.tree import Tree
from remora_testing.tarbuild import LayerBuilder

CAP = b"\x01\x00\x00\x02\x00\x04\x00\x00" + bytes(8) + b"\xff\xfe\x00\x80"  # NULs and non-UTF-8


def merge(*layers: LayerBuilder | bytes, sink=None, tree=None) -> tuple[Tree, list[LayerStats], HashingSink]:
    sink = sink or HashingSink(chunk_size=4096, keep=True)
    m = LayerMerger(tree)
    stats = [m.apply_layer(io.BytesIO(layer if isinstance(layer, bytes) else layer.build()), sink) for layer in layers]
    return m.finish(), stats, sink


def names(tree: Tree) -> set[bytes]:
    return {p for p, _ in tree.walk()}


def content(sink: HashingSink, tree: Tree, path) -> bytes:
    node = tree.lookup(path)
    assert node is not None and node.is_reg, path
    return sink.content(node)


# -- tarbuild ---------------------------------------------------------------------------------------
def _sample() -> LayerBuilder:
    return (
        LayerBuilder(mtime="1700000000.5")
        .add_dir("etc")
        .add_file("etc/big", size=300_000, pattern=b"0123456789")
        .add_file("etc/cap", b"x", xattrs={"security.capability": CAP})
        .add_symlink("lib", "usr/lib")
        .add_char("dev/null", 1, 3)
        .whiteout("etc/old")
        .opaque("var")
    )


def test_tarbuild_is_deterministic_and_compressions_agree(tmp_path):
    import gzip

    import zstandard

    plain = _sample().build()
    assert plain == _sample().build()
    assert _sample().build("gzip") == _sample().build("gzip")
    assert gzip.decompress(_sample().build("gzip")) == plain
    assert zstandard.ZstdDecompressor().decompressobj().decompress(_sample().build("zstd")) == plain
    size = _sample().write(tmp_path / "l.tar")
    assert (tmp_path / "l.tar").read_bytes() == plain and size == len(plain)
    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        assert tf.getnames() == ["etc", "etc/big", "etc/cap", "lib", "dev/null", "etc/.wh.old", "var/.wh..wh..opq"]


def test_tarbuild_refuses_content_that_does_not_match_its_size():
    b = LayerBuilder().add_file("f", size=10, chunks=lambda: iter([b"short"]))
    with pytest.raises(ValueError, match="5 bytes, header says 10"):
        b.build()


# -- file types and metadata ------------------------------------------------------------------------
def test_types_metadata_and_xattrs_round_trip():
    layer = (
        LayerBuilder()
        .add_dir("bin", mode=0o755, uid=0, gid=0)
        .add_file("bin/ping", b"\x7fELF" * 100, mode=0o4755, uid=0, gid=0, mtime="1700000000.123456789",
                  xattrs={"security.capability": CAP, "user.note": "héllo".encode()})
        .add_file("bin/sg", b"g", mode=0o2711, uid=1000, gid=50)
        .add_dir("tmp", mode=0o1777)
        .add_file("empty", b"", uid=65534, gid=65534)
        .add_symlink("abs", "/etc/passwd")
        .add_symlink("escape", "../../../../etc/shadow")          # legal: targets are never followed
        .add_symlink("dangling", "nowhere/at/all")
        .add_char("dev/null", 1, 3, mode=0o666)
        .add_block("dev/sda", 8, 0, mode=0o660, gid=6)
        .add_fifo("run/fifo", mode=0o600)
    )
    tree, (st,), sink = merge(layer)
    ping = tree.lookup("bin/ping")
    assert ping.mode == stat.S_IFREG | 0o4755 and ping.size == 400
    assert ping.xattrs == {"security.capability": CAP, "user.note": "héllo".encode()}
    assert ping.mtime_ns == 1_700_000_000_123_456_789
    assert sink.content(ping) == b"\x7fELF" * 100
    sg = tree.lookup("bin/sg")
    assert (sg.mode, sg.uid, sg.gid) == (stat.S_IFREG | 0o2711, 1000, 50)
    assert tree.lookup("tmp").mode == stat.S_IFDIR | 0o1777
    empty = tree.lookup("empty")
    assert empty.is_reg and empty.size == 0 and empty.chunks == [] and (empty.uid, empty.gid) == (65534, 65534)
    assert tree.lookup("abs").target == b"/etc/passwd"
    esc = tree.lookup("escape")
    assert esc.is_symlink and esc.target == b"../../../../etc/shadow" and esc.size == len(esc.target)
    assert tree.lookup("dangling").target == b"nowhere/at/all"
    null = tree.lookup("dev/null")
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3) and stat.S_IMODE(null.mode) == 0o666
    sda = tree.lookup("dev/sda")
    assert stat.S_ISBLK(sda.mode) and sda.rdev == os.makedev(8, 0) and sda.gid == 6
    assert stat.S_ISFIFO(tree.lookup("run/fifo").mode)
    # implicit parents of dev/ and run/
    for d in ("dev", "run"):
        node = tree.lookup(d)
        assert node.mode == stat.S_IFDIR | 0o755 and (node.uid, node.gid) == (0, 0)
    assert st == LayerStats(entries=11, files=3, bytes=401, whiteouts=0)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_non_ascii_and_non_utf8_names(fmt):
    long_dir = "d" * 120
    longest = "/".join(["x" * 100] * 3) + "/" + "f" * 200        # > 255 bytes, needs PAX or GNU longname
    latin1 = b"caf\xe9-\xff\xfe.txt"                              # not UTF-8
    layer = (
        LayerBuilder(format=fmt)
        .add_file(f"{long_dir}/file", b"a")
        .add_file(longest, b"b")
        .add_file("ünïcødé/日本語.txt", "ü".encode())
        .add_file(latin1, b"c")
        .add_symlink("link-" + "l" * 150, b"target-\xe9" + b"t" * 150)
    )
    if fmt == tarfile.GNU_FORMAT:
        layer.add_hardlink(b"hard-\xe9", latin1)
    tree, _, sink = merge(layer)
    assert content(sink, tree, f"{long_dir}/file") == b"a"
    assert content(sink, tree, longest) == b"b"
    assert content(sink, tree, "ünïcødé/日本語.txt".encode()) == "ü".encode()
    assert content(sink, tree, latin1) == b"c"
    assert tree.root.children[latin1].size == 1
    assert tree.lookup(b"link-" + b"l" * 150).target == b"target-\xe9" + b"t" * 150
    if fmt == tarfile.GNU_FORMAT:
        assert tree.lookup(b"hard-\xe9") is tree.lookup(latin1)


def test_absolute_and_dot_names_are_made_relative_and_root_entries_ignored():
    layer = (
        LayerBuilder()
        .add_dir("./", mode=0o700, uid=5)                        # resolves to the root: ignored
        .add_file("/etc/hostname", b"h")
        .add_file("./etc/./hosts", b"x")
        .add_file("//usr///bin/env", b"e")
    )
    tree, (st,), sink = merge(layer)
    assert names(tree) == {b"/", b"/etc", b"/etc/hostname", b"/etc/hosts", b"/usr", b"/usr/bin", b"/usr/bin/env"}
    assert content(sink, tree, "etc/hostname") == b"h"
    assert tree.root.mode == stat.S_IFDIR | 0o755 and tree.root.uid == 0
    assert st.entries == 4


def test_duplicate_member_in_one_layer_last_wins():
    tree, _, sink = merge(LayerBuilder().add_file("f", b"one").add_file("f", b"two", mode=0o600))
    assert content(sink, tree, "f") == b"two" and stat.S_IMODE(tree.lookup("f").mode) == 0o600


# -- replacement and implicit parents ---------------------------------------------------------------
def test_replacements_between_layers():
    l1 = (
        LayerBuilder()
        .add_dir("a", mode=0o700, uid=1)
        .add_file("a/child", b"1")
        .add_file("b", b"file")
        .add_symlink("c", "elsewhere")
        .add_dir("d", mode=0o755)
        .add_file("d/keep", b"k")
    )
    l2 = (
        LayerBuilder()
        .add_file("a", b"now a file")                            # dir -> file: children gone
        .add_dir("b", mode=0o750)                                # file -> dir
        .add_file("b/inside", b"i")
        .add_dir("c")                                            # symlink -> dir (not followed)
        .add_dir("d", mode=0o711, uid=7, xattrs={"user.x": b"1"})  # dir over dir: merge, new metadata
        .add_file("d/new", b"n")
    )
    tree, _, sink = merge(l1, l2)
    assert content(sink, tree, "a") == b"now a file" and tree.lookup("a/child") is None
    assert tree.lookup("b").mode == stat.S_IFDIR | 0o750 and content(sink, tree, "b/inside") == b"i"
    assert tree.lookup("c").is_dir and tree.lookup("elsewhere") is None
    d = tree.lookup("d")
    assert (d.mode, d.uid, d.xattrs) == (stat.S_IFDIR | 0o711, 7, {"user.x": b"1"})
    assert set(d.children) == {b"keep", b"new"}


def test_implicit_parents_and_a_file_in_the_way():
    tree, _, _ = merge(LayerBuilder(mtime=123).add_file("a/b/c/file", b"z", uid=9))
    for p in ("a", "a/b", "a/b/c"):
        node = tree.lookup(p)
        assert node.mode == stat.S_IFDIR | 0o755 and (node.uid, node.gid, node.mtime_ns) == (0, 0, 0)
    with pytest.raises(InvalidInput, match=r"layer 2: member 'f/x'.*'f' is not a directory"):
        merge(LayerBuilder().add_file("f", b"1"), LayerBuilder().add_file("f/x", b"2"))


def test_merging_onto_an_existing_tree():
    tree, _, sink = merge(LayerBuilder().add_file("base", b"b"))
    tree2, _, _ = merge(LayerBuilder().whiteout("base").add_file("top", b"t"), tree=tree, sink=sink)
    assert tree2 is tree and names(tree) == {b"/", b"/top"}


# -- whiteouts --------------------------------------------------------------------------------------
def test_whiteout_deletes_lower_file_and_subtree_and_never_appears():
    l1 = LayerBuilder().add_file("etc/a", b"a").add_file("etc/b", b"b").add_file("opt/app/x/y", b"y")
    l2 = LayerBuilder().whiteout("etc/a").whiteout("opt/app").whiteout("etc/never-existed")
    tree, (_, st), _ = merge(l1, l2)
    assert names(tree) == {b"/", b"/etc", b"/etc/b", b"/opt"}
    assert st.whiteouts == 3
    assert not any(b".wh." in p for p in names(tree))


def test_whiteout_spares_same_layer_files_whatever_the_order():
    l1 = LayerBuilder().add_file("f", b"lower").add_file("g", b"lower").add_file("d/old", b"o")
    l2 = (
        LayerBuilder()
        .add_file("f", b"upper").whiteout("f")       # whiteout after the same-layer file: file stays
        .whiteout("g").add_file("g", b"upper")       # whiteout first: lower deleted, new one stays
        .add_file("d/new", b"n").whiteout("d")       # lower dir hidden, same-layer child survives
    )
    tree, _, sink = merge(l1, l2)
    assert content(sink, tree, "f") == b"upper"
    assert content(sink, tree, "g") == b"upper"
    assert set(tree.lookup("d").children) == {b"new"}
    l3 = LayerBuilder().whiteout("f")                # ...and the next layer can delete it
    tree, _, _ = merge(l1, l2, l3)
    assert tree.lookup("f") is None


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_hides_lower_children_keeps_same_layer_ones(marker_first):
    l1 = (
        LayerBuilder()
        .add_dir("d", mode=0o755)
        .add_file("d/a", b"a")
        .add_file("d/sub/deep", b"deep")
        .add_file("d/keep-me-not", b"x")
        .add_file("other", b"o")
    )
    l2 = LayerBuilder().add_dir("d", mode=0o700)
    if marker_first:
        l2.opaque("d")
    l2.add_file("d/new", b"n").add_file("d/sub/newdeep", b"nd")
    if not marker_first:
        l2.opaque("d")
    tree, (_, st), sink = merge(l1, l2)
    d = tree.lookup("d")
    assert set(d.children) == {b"new", b"sub"} and stat.S_IMODE(d.mode) == 0o700
    assert set(tree.lookup("d/sub").children) == {b"newdeep"}
    assert content(sink, tree, "d/new") == b"n" and content(sink, tree, "other") == b"o"
    assert st.whiteouts == 1


def test_opaque_at_root_and_in_implicit_dir():
    l1 = LayerBuilder().add_file("x", b"1").add_file("y/z", b"2")
    tree, _, _ = merge(l1, LayerBuilder().add_file("kept", b"k").opaque("/"))
    assert names(tree) == {b"/", b"/kept"}
    tree, _, _ = merge(l1, LayerBuilder().opaque("y/new"))
    assert names(tree) == {b"/", b"/x", b"/y", b"/y/z", b"/y/new"}


def test_invalid_whiteout_names_are_rejected():
    for bad in (".wh..", ".wh.", "d/.wh.."):
        with pytest.raises(InvalidInput, match="invalid whiteout name"):
            merge(LayerBuilder().add_file(bad, b""))


def test_aufs_metadata_is_skipped_and_plnk_files_serve_as_link_targets():
    layer = (
        LayerBuilder()
        .add_dir(".wh..wh.aufs")
        .add_file(".wh..wh.aufs/junk", b"j")
        .add_dir(".wh..wh.plnk")
        .add_file(".wh..wh.plnk/262.1337", b"linked content")
        .add_hardlink("usr/bin/tool", ".wh..wh.plnk/262.1337")
    )
    tree, _, sink = merge(layer)
    assert names(tree) == {b"/", b"/usr", b"/usr/bin", b"/usr/bin/tool"}
    assert content(sink, tree, "usr/bin/tool") == b"linked content"


# -- hard links -------------------------------------------------------------------------------------
def test_hardlinks_within_and_across_layers():
    l1 = (LayerBuilder().add_file("usr/bin/python3.11", b"py" * 1000, mode=0o755)
          .add_hardlink("usr/bin/py", "usr/bin/python3.11"))
    tree, _, _ = merge(l1)
    assert tree.lookup("usr/bin/py").mode == stat.S_IFREG | 0o755
    l2 = LayerBuilder().add_hardlink("usr/local/bin/python", "/usr/bin/python3.11").add_file("x", b"x")
    tree, (s1, s2), sink = merge(l1, l2)
    a, b, c = (tree.lookup(p) for p in ("usr/bin/python3.11", "usr/bin/py", "usr/local/bin/python"))
    assert a is b is c and a.nlink == 3 and sink.content(c) == b"py" * 1000
    # the builder's link header repeated the target's 0755; the cross-layer one wrote 0644
    assert a.mode == stat.S_IFREG | 0o644
    assert (s1.files, s1.entries, s2.files) == (1, 2, 1)
    # replacing one name in a later layer leaves the other names on the old inode
    tree, _, sink = merge(l1, l2, LayerBuilder().add_file("usr/bin/py", b"new"))
    assert content(sink, tree, "usr/bin/py") == b"new"
    assert tree.lookup("usr/bin/python3.11") is tree.lookup("usr/local/bin/python")
    assert tree.lookup("usr/bin/python3.11").nlink == 2
    # a whiteout of the original name keeps the inode alive through the link
    tree, _, sink = merge(l1, LayerBuilder().whiteout("usr/bin/python3.11"))
    assert content(sink, tree, "usr/bin/py") == b"py" * 1000 and tree.lookup("usr/bin/py").nlink == 1


def test_hardlink_header_metadata_applies_to_the_shared_inode_like_containerd():
    ti = tarfile.TarInfo("h")
    ti.type, ti.linkname, ti.uid, ti.gid, ti.mtime, ti.mode = tarfile.LNKTYPE, "f", 5, 6, 77, 0o600
    ti.pax_headers = {"SCHILY.xattr.user.b": "2"}
    layer = LayerBuilder().add_file("f", b"x", mode=0o755, uid=1, gid=1, xattrs={"user.a": b"1"}).raw_member(ti)
    tree, _, _ = merge(layer)
    f = tree.lookup("f")
    assert tree.lookup("h") is f
    assert (f.uid, f.gid, f.mtime_ns, f.mode) == (5, 6, 77 * 10**9, stat.S_IFREG | 0o600)
    assert f.xattrs == {"user.a": b"1", "user.b": b"2"}
    ti.linkname = "s"                                             # a symlink keeps its 0777
    tree, _, _ = merge(LayerBuilder().add_symlink("s", "t").raw_member(ti))
    assert tree.lookup("s").mode == stat.S_IFLNK | 0o777 and tree.lookup("s").uid == 5


def test_hardlink_to_symlink_links_the_symlink_itself():
    tree, _, _ = merge(LayerBuilder().add_symlink("s", "target").add_hardlink("h", "s"))
    assert tree.lookup("h") is tree.lookup("s") and tree.lookup("h").is_symlink


@pytest.mark.parametrize(
    "layer, message",
    [
        (LayerBuilder().add_hardlink("h", "missing"),
         r"layer 1: member 'h': hard link target 'missing' does not exist"),
        (LayerBuilder().add_dir("d").add_hardlink("h", "d"), r"hard link target 'd' is a directory"),
        (LayerBuilder().add_file("f", b"").add_hardlink("h", "../f"), r"hard link target '../f' has a '..'"),
        (LayerBuilder().add_file("f", b"").add_hardlink("h", "a/../f"), r"'..'"),
        (LayerBuilder().whiteout("f").add_hardlink("h", "f"), r"does not exist"),
    ],
)
def test_bad_hardlinks_are_invalid_input(layer, message):
    with pytest.raises(InvalidInput, match=message):
        merge(layer)


def test_hardlink_to_lower_file_deleted_by_whiteout_in_same_layer_fails():
    with pytest.raises(InvalidInput, match="layer 2: member 'h'.*does not exist"):
        merge(LayerBuilder().add_file("f", b"1"), LayerBuilder().whiteout("f").add_hardlink("h", "f"))


# -- hostile names ----------------------------------------------------------------------------------
def _raw(name: str, type_=tarfile.REGTYPE, linkname: str = "") -> LayerBuilder:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.linkname = linkname
    return LayerBuilder().raw_member(ti)


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "a/../b", "./../../../../etc/passwd", "/../evil", "x/.."])
def test_dotdot_names_are_rejected(name):
    with pytest.raises(InvalidInput, match=r"layer 1: member .*'\.\.' in the name"):
        merge(_raw(name))


@pytest.mark.parametrize("type_", [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE])
def test_dotdot_rejected_for_every_member_type(type_):
    with pytest.raises(InvalidInput, match=r"'\.\.'"):
        merge(_raw("../x", type_, linkname="t"))


def test_writing_through_a_symlink_that_leaves_the_root_is_rejected():
    l1 = LayerBuilder().add_dir("a").add_symlink("a/up", "../../..").add_symlink("abs", "/")
    with pytest.raises(InvalidInput, match=r"layer 2: member 'a/up/etc/cron.d/x': .*outside the root"):
        merge(l1, LayerBuilder().add_file("a/up/etc/cron.d/x", b"pwn"))
    # the same layer creating the symlink and then writing through it
    same = LayerBuilder().add_symlink("l", "../escape").add_file("l/x", b"pwn")
    with pytest.raises(InvalidInput, match=r"layer 1: member 'l/x'.*outside the root"):
        merge(same)
    # a whiteout and a hard link through it are rejected too
    with pytest.raises(InvalidInput, match="outside the root"):
        merge(l1, LayerBuilder().whiteout("a/up/etc/passwd"))
    with pytest.raises(InvalidInput, match="outside the root"):
        merge(l1, LayerBuilder().add_hardlink("h", "a/up/etc/passwd"))


def test_symlinked_parents_inside_the_root_are_followed_like_containerd():
    l1 = (
        LayerBuilder()
        .add_dir("usr/lib")
        .add_symlink("lib", "usr/lib")
        .add_symlink("abs", "/usr")
        .add_dir("usr/share")
        .add_symlink("usr/share/up", "../lib")
    )
    l2 = (
        LayerBuilder()
        .add_file("lib/libc.so", b"c")                       # lib -> usr/lib
        .add_file("abs/bin/sh", b"s")                        # abs -> /usr: absolute from the root
        .add_file("usr/share/up/via-dotdot", b"d")           # up -> ../lib: '..' inside the root
    )
    tree, _, sink = merge(l1, l2)
    assert content(sink, tree, "usr/lib/libc.so") == b"c"
    assert content(sink, tree, "usr/bin/sh") == b"s"
    assert content(sink, tree, "usr/lib/via-dotdot") == b"d"
    assert tree.lookup("lib").is_symlink and tree.lookup("abs").is_symlink
    # a whiteout through the symlinked parent deletes the real file
    tree, _, _ = merge(l1, l2, LayerBuilder().whiteout("lib/libc.so"))
    assert tree.lookup("usr/lib/libc.so") is None


def test_sink_sees_the_resolved_path_of_each_file():
    m = LayerMerger()
    seen = []

    def sink(f, size):
        seen.append(m.current_path)
        return hashing_sink(f, size)

    m.apply_layer(io.BytesIO(LayerBuilder().add_dir("usr/lib").add_symlink("lib", "/usr/lib").build()), sink)
    m.apply_layer(io.BytesIO(LayerBuilder().add_file("lib/a.so", b"a").add_file("/etc/b", b"").build()), sink)
    assert seen == [b"/usr/lib/a.so"]          # empty files never reach the sink


def test_symlink_loops_in_parents_are_rejected():
    with pytest.raises(InvalidInput, match="too many levels of symbolic links"):
        merge(LayerBuilder().add_symlink("a", "b").add_symlink("b", "a").add_file("a/x", b""))


def _link_with_nul() -> tarfile.TarInfo:
    ti = tarfile.TarInfo("h")
    ti.type = tarfile.LNKTYPE
    ti.pax_headers = {"linkpath": "x\0y"}
    return ti


def test_names_no_linux_file_system_can_hold_are_rejected():
    nul = tarfile.TarInfo("a")
    nul.pax_headers = {"path": "a\0b"}                            # only PAX can carry a NUL
    with pytest.raises(InvalidInput, match="NUL byte in the name"):
        merge(LayerBuilder().raw_member(nul))
    with pytest.raises(InvalidInput, match="300 bytes long"):
        merge(LayerBuilder().add_file("d/" + "n" * 300, b""))
    with pytest.raises(InvalidInput, match="NUL byte in the hard link target"):
        merge(LayerBuilder().add_file("x", b"").raw_member(_link_with_nul()))
    with pytest.raises(InvalidInput, match="symlink target of 5000 bytes"):
        merge(LayerBuilder().add_symlink("s", "t" * 5000))
    ti = tarfile.TarInfo("f")
    ti.pax_headers = {"SCHILY.xattr.": "v"}
    with pytest.raises(InvalidInput, match="layer 1: member 'f': empty xattr name"):
        merge(LayerBuilder().raw_member(ti))


def test_unsupported_member_type_is_rejected():
    with pytest.raises(InvalidInput, match=r"layer 1: member 'weird': unsupported tar member type b'Z'"):
        merge(_raw("weird", b"Z"))


# -- lying and broken tars --------------------------------------------------------------------------
def _two_files() -> bytes:
    return LayerBuilder().add_file("first", b"1" * 100).add_file("second", b"2" * 5000).add_file("third", b"3").build()


def test_truncated_member_data_is_invalid_input():
    data = _two_files()
    cut = 512 + 512 + 512 + 3000                                  # inside the data of 'second'
    with pytest.raises(InvalidInput, match=r"layer 1: truncated tar at member 'second'"):
        merge(data[:cut])


def test_header_size_larger_than_the_stream_is_invalid_input():
    ti = tarfile.TarInfo("liar")
    ti.size = 1_000_000
    layer = LayerBuilder().add_file("ok", b"fine").raw_member(ti, b"only a few bytes")
    with pytest.raises(InvalidInput, match=r"truncated tar at member 'liar'"):
        merge(layer)
    # header-only types (symlink, dir, device) carry no data whatever their size says (as in Go)
    link = tarfile.TarInfo("link")
    link.type, link.linkname, link.size = tarfile.SYMTYPE, "t", 100_000
    tree, _, _ = merge(LayerBuilder().raw_member(link).add_file("after", b"a"))
    assert tree.lookup("link").target == b"t" and tree.lookup("after").size == 1


def test_truncated_padding_and_truncated_header_are_invalid_input():
    data = _two_files()
    with pytest.raises(InvalidInput, match=r"truncated tar at member 'first'"):
        merge(data[: 512 + 100 + 10])                             # inside the padding of 'first'
    with pytest.raises(InvalidInput, match=r"truncated tar at member 'first'"):
        merge(data[: 1024 + 200])                                 # inside the header of 'second'


def test_corrupt_header_in_the_middle_is_not_a_silent_end():
    data = bytearray(_two_files())
    data[1024 + 20] ^= 0xFF                                       # name byte of 'second': checksum fails
    with pytest.raises(InvalidInput, match=r"layer 1: corrupt tar header after member 'first'"):
        merge(bytes(data))
    garbage = LayerBuilder().add_file("a", b"a").raw_bytes(b"\x01" * 512).build()
    with pytest.raises(InvalidInput, match="corrupt tar header after member 'a'"):
        merge(garbage)


def test_random_corruption_gives_invalid_input_or_a_tree_never_a_crash():
    import random

    base = (
        LayerBuilder(mtime="1700000000.25")
        .add_dir("etc")
        .add_file("etc/a", b"a" * 700, xattrs={"security.capability": CAP})
        .add_symlink("l", "etc")
        .add_hardlink("h", "etc/a")
        .add_file("x" * 150, b"long")
        .whiteout("etc/b")
        .add_char("c", 1, 2)
        .add_sparse("sp", 100_000, {5000: b"data"})
        .add_file(b"\xff\xfe", b"z")
        .build()
    )
    rng = random.Random(20261123)
    invalid = 0
    for _ in range(400):
        data = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data) - 1024)] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        try:
            LayerMerger().apply_layer(io.BytesIO(bytes(data)), HashingSink())
        except InvalidInput:
            invalid += 1
    assert invalid > 200                                          # most corruptions are detected


def test_not_a_tar_and_empty_streams():
    with pytest.raises(InvalidInput, match="layer 1: not a tar archive"):
        merge(b"this is not a tar archive at all" * 40)
    with pytest.raises(InvalidInput, match="looks gzip-compressed"):
        merge(LayerBuilder().add_file("a", b"a").build("gzip"))
    with pytest.raises(InvalidInput, match="looks zstd-compressed"):
        merge(LayerBuilder().add_file("a", b"a").build("zstd"))
    tree, (st,), _ = merge(b"")
    assert st == LayerStats() and names(tree) == {b"/"}
    tree, (st,), _ = merge(LayerBuilder())                       # just the two zero blocks
    assert st.entries == 0


def test_missing_end_of_archive_at_a_member_boundary_is_accepted_as_go_does():
    data = LayerBuilder().add_file("a", b"a").build()
    tree, (st,), sink = merge(data[:1024])                        # header + one data block, no trailer
    assert st.files == 1 and content(sink, tree, "a") == b"a"


def test_the_whole_stream_is_consumed_for_digest_checks():
    data = LayerBuilder().add_file("a", b"a").build() + bytes(8192)   # GNU tar pads to 10 KiB records
    stream = io.BytesIO(data)
    LayerMerger().apply_layer(stream, hashing_sink)
    assert stream.tell() == len(data)


def test_error_names_the_label():
    m = LayerMerger()
    with pytest.raises(InvalidInput, match=r"layer 1 \(sha256:abc\): member '\.\./x'"):
        m.apply_layer(io.BytesIO(_raw("../x").build()), hashing_sink, label="sha256:abc")


# -- sparse and big files ---------------------------------------------------------------------------
def test_small_gnu_sparse_file_content_includes_holes():
    regions = {0: b"start", 70_000: b"middle" * 100, 199_990: b"end"}
    tree, (st,), sink = merge(LayerBuilder().add_sparse("sparse", 200_000, regions, mode=0o600))
    expected = bytearray(200_000)
    for off, data in regions.items():
        expected[off:off + len(data)] = data
    node = tree.lookup("sparse")
    assert node.size == 200_000 and stat.S_IMODE(node.mode) == 0o600
    assert sink.content(node) == bytes(expected)
    assert st.bytes == 200_000


def test_3gb_sparse_file_in_bounded_memory(tmp_path):
    size, chunk = 3 << 30, 4 << 20
    regions = {0: b"HEAD", (1 << 30) + 5: b"middle" * 1000, size - 4: b"TAIL"}
    layer = tmp_path / "sparse.tar"
    assert LayerBuilder().add_sparse("big/disk.img", size, regions).write(layer) < 1 << 20
    m = LayerMerger()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(layer, "rb") as f:
        st = m.apply_layer(f, HashingSink(chunk_size=chunk))
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert st.bytes == size and st.files == 1
    assert grew_mb < 200, f"peak RSS grew {grew_mb:.0f} MB for a 3 GB file"
    # the chunk digests are those of the logical content: zeros plus the three regions
    node = m.finish().lookup("big/disk.img")
    assert node.size == size
    zero = hashlib.sha256(bytes(chunk)).digest()
    expected = [zero] * (size // chunk)
    for off, data in regions.items():
        i = off // chunk
        buf = bytearray(chunk)
        buf[off - i * chunk: off - i * chunk + len(data)] = data
        expected[i] = hashlib.sha256(buf).digest()
    assert [c.digest for c in node.chunks] == expected


def test_gnu_tar_pax_sparse_1_0_member(tmp_path):
    # Python's tarfile cannot write sparse members; GNU tar's PAX sparse 1.0 keeps the map in the
    # data area, which the streaming reader must parse too
    path = tmp_path / "s.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
        f.seek(300_000)
        f.write(b"data" * 1000)
    data = subprocess.run(
        ["tar", "--format=posix", "--sparse", "--sparse-version=1.0", "-C", tmp_path, "-cf", "-", "s.img"],
        check=True, stdout=subprocess.PIPE,
    ).stdout
    assert len(data) < 100_000
    tree, _, sink = merge(data)
    assert names(tree) == {b"/", b"/s.img"}
    assert content(sink, tree, "s.img") == path.read_bytes()


def test_big_streamed_file_written_to_disk(tmp_path):
    size = 24 << 20
    path = tmp_path / "big.tar.gz"
    LayerBuilder().add_file("blob", size=size, pattern=b"0123456789abcdef-").write(path, compression="gzip")
    import gzip

    seen = hashlib.sha256()

    def sink(f, n):
        from remora.format.tree import ChunkRef

        left = n
        while left:
            piece = f.read(min(left, 1 << 20))
            seen.update(piece)
            left -= len(piece)
        return [ChunkRef(seen.digest(), n)]

    with gzip.open(path, "rb") as f:
        st = LayerMerger().apply_layer(f, sink)
    expected = hashlib.sha256((b"0123456789abcdef-" * (size // 17 + 1))[:size]).digest()
    assert st.bytes == size and seen.digest() == expected


# -- real content -----------------------------------------------------------------------------------
PYLIB = "/usr/lib/python3.11"
SUBSET = ["json", "email", "collections", "sitecustomize.py", "_sysconfigdata__linux_x86_64-linux-gnu.py", "os.py"]


def _real_entries():
    for top in SUBSET:
        full = os.path.join(PYLIB, top)
        yield top, full
        if os.path.isdir(full) and not os.path.islink(full):
            for dirpath, dirnames, filenames in os.walk(full):
                for n in sorted(dirnames + filenames):
                    p = os.path.join(dirpath, n)
                    yield os.path.relpath(p, PYLIB), p


def _check_against_source(tree: Tree, sink: HashingSink, exact_mtime: bool) -> int:
    checked = 0
    for rel, full in _real_entries():
        st = os.lstat(full)
        node = tree.lookup(rel)
        assert node is not None, rel
        assert node.mode == st.st_mode, rel
        assert (node.uid, node.gid) == (st.st_uid, st.st_gid), rel
        if stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                want = hashlib.sha256(f.read()).hexdigest()
            assert node.size == st.st_size, rel
            assert hashlib.sha256(sink.content(node)).hexdigest() == want, rel
        elif stat.S_ISLNK(st.st_mode):
            assert node.target == os.fsencode(os.readlink(full)), rel
        if exact_mtime and not stat.S_ISDIR(st.st_mode):
            assert node.mtime_ns == st.st_mtime_ns, rel
        checked += 1
    return checked


def test_real_tree_written_by_gnu_tar_merges_byte_for_byte():
    data = subprocess.run(
        ["tar", "--format=posix", "--numeric-owner", "-C", PYLIB, "-cf", "-", *SUBSET],
        check=True, stdout=subprocess.PIPE,
    ).stdout
    tree, (st,), sink = merge(data)
    assert _check_against_source(tree, sink, exact_mtime=True) > 50
    assert st.files == sum(1 for _, p in _real_entries() if os.path.isfile(p) and not os.path.islink(p))


def test_real_tree_written_by_python_tarfile_and_tarbuild():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for top in SUBSET:
            tf.add(os.path.join(PYLIB, top), arcname=top)
    tree, _, sink = merge(buf.getvalue())
    assert _check_against_source(tree, sink, exact_mtime=False) > 50
    builder = LayerBuilder()
    for top in SUBSET:
        full = os.path.join(PYLIB, top)
        st = os.lstat(full)
        mtime = "{:d}.{:09d}".format(*divmod(st.st_mtime_ns, 10**9))
        if stat.S_ISDIR(st.st_mode):
            builder.add_dir(top, mode=stat.S_IMODE(st.st_mode), mtime=mtime).add_tree(full, prefix=top)
        elif stat.S_ISLNK(st.st_mode):
            builder.add_symlink(top, os.readlink(full), mtime=mtime)
        else:
            builder.add_file(top, source=full, mode=stat.S_IMODE(st.st_mode), mtime=mtime)
    tree, _, sink = merge(builder)
    assert _check_against_source(tree, sink, exact_mtime=True) > 50


def test_tarbuild_add_tree_keeps_hardlinks_symlinks_and_fifos(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a").write_bytes(b"A")
    os.link(src / "sub" / "a", src / "b")
    os.symlink("sub", src / "dirlink")
    os.mkfifo(src / "sub" / "fifo")
    tree, _, sink = merge(LayerBuilder().add_tree(src, prefix="root"))
    assert tree.lookup("root/b") is tree.lookup("root/sub/a") and content(sink, tree, "root/b") == b"A"
    assert tree.lookup("root/dirlink").target == b"sub"
    assert stat.S_ISFIFO(tree.lookup("root/sub/fifo").mode)


def test_gnu_tar_xattrs_security_capability_bytes_identical(tmp_path):
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "ping").write_bytes(b"elf")
    os.setxattr(src / "bin" / "ping", "security.capability", CAP)
    os.setxattr(src / "bin" / "ping", "user.bin", b"\x00\xff")
    data = subprocess.run(
        ["tar", "--format=posix", "--xattrs", "--xattrs-include=*", "-C", src, "-cf", "-", "bin"],
        check=True, stdout=subprocess.PIPE,
    ).stdout
    tree, _, _ = merge(data)
    assert tree.lookup("bin/ping").xattrs == {"security.capability": CAP, "user.bin": b"\x00\xff"}


def test_gnu_tar_hardlinks_and_whiteouts_from_a_real_directory(tmp_path):
    src = tmp_path / "up"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_bytes(b"shared")
    os.link(src / "d" / "a", src / "d" / "b")
    (src / "d" / ".wh.gone").write_bytes(b"")
    (src / "d" / ".wh..wh..opq").write_bytes(b"")
    data = subprocess.run(["tar", "--format=posix", "-C", src, "-cf", "-", "d"], check=True,
                          stdout=subprocess.PIPE).stdout
    lower = LayerBuilder().add_file("d/gone", b"g").add_file("d/lower", b"l")
    tree, _, sink = merge(lower, data)
    assert set(tree.lookup("d").children) == {b"a", b"b"}
    assert tree.lookup("d/a") is tree.lookup("d/b") and content(sink, tree, "d/b") == b"shared"


# -- differential: the same layers applied by real containerd on overlayfs -------------------------
def _oci_archive(path, layers: list[bytes], name: str) -> None:
    """An OCI image archive (`ctr images import` input) with these uncompressed layers."""
    import json

    blobs: dict[str, bytes] = {}

    def add(data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}

    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": add(config, "application/vnd.oci.image.config.v1+json"),
        "layers": [add(layer, "application/vnd.oci.image.layer.v1.tar") for layer in layers],
    }).encode()
    desc = add(manifest, "application/vnd.oci.image.manifest.v1+json")
    desc["annotations"] = {"io.containerd.image.name": name}
    desc["platform"] = {"architecture": "amd64", "os": "linux"}
    index = json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode()
    with tarfile.open(path, "w") as tf:
        for member, data in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)] + [
            (f"blobs/sha256/{d}", b) for d, b in blobs.items()
        ]:
            ti = tarfile.TarInfo(member)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _describe_disk(root: str) -> tuple[dict, list[set]]:
    """path -> comparable facts, and the hard-link groups, of a mounted root file system."""
    facts, by_ino = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.fsencode(os.path.relpath(full, root))
            st = os.lstat(full)
            xattrs = {k: os.getxattr(full, k, follow_symlinks=False) for k in os.listxattr(full, follow_symlinks=False)}
            facts[rel] = _facts(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_rdev, xattrs,
                                _disk_payload(full, st.st_mode))
            if stat.S_ISREG(st.st_mode):
                by_ino.setdefault(st.st_ino, set()).add(rel)
    return facts, sorted((g for g in by_ino.values() if len(g) > 1), key=sorted)


def _disk_payload(full: str, mode: int):
    if stat.S_ISREG(mode):
        with open(full, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    if stat.S_ISLNK(mode):
        return os.fsencode(os.readlink(full))
    return None


def _facts(mode, uid, gid, size, mtime_ns, rdev, xattrs, payload):
    # directory sizes and mtimes are the file system's business (and change when entries are added)
    is_dir = stat.S_ISDIR(mode)
    return (mode, uid, gid, None if is_dir else size, None if is_dir else mtime_ns,
            rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0, xattrs, payload)


def _describe_tree(tree: Tree, sink: HashingSink) -> tuple[dict, list[set]]:
    facts, by_node = {}, {}
    for path, node in tree.walk():
        if path == b"/":
            continue
        rel = path[1:]
        payload = hashlib.sha256(sink.content(node)).hexdigest() if node.is_reg else node.target
        facts[rel] = _facts(node.mode, node.uid, node.gid, node.size, node.mtime_ns, node.rdev, node.xattrs, payload)
        if node.is_reg:
            by_node.setdefault(id(node), set()).add(rel)
    return facts, sorted((g for g in by_node.values() if len(g) > 1), key=sorted)


def _differential_layers() -> list[bytes]:
    # Canonical layers only. containerd 1.6's overlayfs applier writes each layer into its own
    # upper dir, so it cannot hard-link to a lower layer's file ("link ...: no such file or
    # directory") nor follow a lower layer's symlink for a parent directory; the merge does both
    # (unit tests above), as an apply onto the mounted view (Docker, containerd's native) would.
    t = "1700000000.123456789"
    l1 = (
        LayerBuilder(mtime=t)
        .add_dir("etc").add_dir("usr").add_dir("usr/lib").add_dir("usr/share").add_dir("usr/share/doc")
        .add_dir("opt").add_dir("opt/app").add_dir("opt/app/bin").add_dir("dev").add_dir("tmp", mode=0o1777)
        .add_file("etc/a", b"a")
        .add_file("etc/b", b"b" * 5000, uid=1000, gid=1000, xattrs={"user.origin": b"\x00\xffl1"})
        .add_file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .add_file("usr/lib/x", b"x" * 9000, mode=0o755)
        .add_hardlink("usr/lib/xlink", "usr/lib/x")
        .add_file("usr/lib/y", b"")
        .add_file("usr/share/doc/d1", b"1").add_file("usr/share/doc/d2", b"2")
        .add_file("opt/app/bin/tool", b"tool", mode=0o4755, xattrs={"security.capability": CAP})
        .add_file("opt/app/bin/sg", b"sg", mode=0o2755, gid=50)
        .add_symlink("lib", "usr/lib")
        .add_file("lib/same-layer.so", b"written through a symlinked parent")
        .add_symlink("abs", "/etc/passwd")
        .add_symlink("up", "../../..")
        .add_char("dev/null", 1, 3, mode=0o666)
        .add_block("dev/loop9", 7, 9)
        .add_fifo("tmp/fifo")
        .add_file(b"etc/caf\xe9", b"latin-1 name")
        .add_file("etc/" + "L" * 200, b"long name")
    )
    l2 = (
        LayerBuilder(mtime="1700000001.5")
        .whiteout("etc/a")
        .opaque("usr/share/doc")
        .add_file("usr/share/doc/new", b"new doc")
        .add_file("opt/app", b"the app dir is a file now")       # dir -> file
        .add_dir("usr/lib", mode=0o750, uid=3)                    # dir over dir: metadata only
        .add_file("abs", b"symlink -> file")
        .add_dir("etc/newdir")
        .add_file("etc/newdir/f", b"f", uid=7, gid=8)
        .add_hardlink("etc/newdir/g", "etc/newdir/f")
    )
    l3 = (
        LayerBuilder(mtime="1700000002")
        .add_file("usr/lib/x", b"replaced", mode=0o700)           # xlink keeps the old inode
        .whiteout("usr/share")
        .whiteout("dev/loop9")
        .add_dir("tmp", mode=0o1777)
        .add_file("tmp/new", b"n")
    )
    return [l1.build(), l2.build(), l3.build()]


def _run(argv, daemon) -> None:
    res = subprocess.run(argv, capture_output=True, text=True)
    assert res.returncode == 0, f"{argv[4:]} failed: {res.stderr}\ncontainerd log:\n{daemon.log_tail(15)}"


def test_merge_matches_containerd_applying_the_layers_on_overlayfs(tmp_path):
    import shutil
    import tempfile

    from remora.procutil import Daemon, wait_until

    layers = _differential_layers()
    tree, _, sink = merge(*layers)
    want = _describe_tree(tree, sink)

    base = tempfile.mkdtemp(prefix="rm-merge-", dir="/tmp")     # unix sockets need a short path
    sock, ns, ref = f"{base}/c.sock", f"remora-merge-{os.getpid()}", "docker.io/remora/merge-diff:1"
    (cfg := tmp_path / "containerd.toml").write_text(
        f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{base}/t.sock"\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{base}/opt"\n'
    )
    _oci_archive(tmp_path / "image.tar", layers, ref)
    daemon = Daemon(["containerd", "--config", str(cfg)], tmp_path / "containerd.log").start()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = False
    ctr = ["ctr", "--address", sock, "--namespace", ns]
    try:
        wait_until(lambda: subprocess.run(ctr + ["version"], capture_output=True).returncode == 0, 10,
                   what="containerd ready")
        _run(ctr + ["images", "import", tmp_path / "image.tar"], daemon)
        _run(ctr + ["images", "mount", ref, mnt], daemon)
        mounted = True
        got = _describe_disk(str(mnt))
    finally:
        if mounted:
            subprocess.run(ctr + ["images", "unmount", mnt], capture_output=True)
            subprocess.run(["umount", mnt], capture_output=True)   # in case ctr could not
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert not os.path.ismount(mnt)
    got_facts, got_links = got
    want_facts, want_links = want
    assert sorted(got_facts) == sorted(want_facts)
    for path in want_facts:
        assert got_facts[path] == want_facts[path], path
    assert got_links == want_links == [{b"etc/newdir/f", b"etc/newdir/g"}]


_DEEP_SCRIPT = r"""
import io, resource, sys, tarfile, time
from remora.converter.merge import LayerMerger, hashing_sink
n = int(sys.argv[1])
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
    ti = tarfile.TarInfo("/".join(["a"] * n) + "/f")
    ti.size = 1
    t.addfile(ti, io.BytesIO(b"x"))
    t.addfile(tarfile.TarInfo("/".join(["a"] * n) + "/.wh.f"))    # a whiteout at the same depth
m = LayerMerger()
m.apply_layer(io.BytesIO(buf.getvalue()), hashing_sink)
node = m.finish().root
depth = 0
while b"a" in (node.children or {}):
    node = node.children[b"a"]
    depth += 1
assert depth == n and b"f" in node.children, depth
"""


@pytest.mark.parametrize("n", [10_000, 20_000])
def test_merge_memory_is_linear_in_path_depth(n):
    """One member with N path components: the merge used to keep every prefix of the path
    (N=10,000 -> 824 MB, N=20,000 -> 3.2 GB peak); now it is linear in N (about 40 MB at 20,000)."""
    # measured by a parent of its own: this process's RUSAGE_CHILDREN holds its earlier children too
    wrapper = ("import resource, subprocess, sys; "
               "p = subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", wrapper, _DEEP_SCRIPT, str(n)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mb = int(proc.stdout.split()[-1]) / 1024
    assert peak_mb > 5, "the measurement measured nothing"
    assert peak_mb < 300, f"peak RSS {peak_mb:.0f} MB for a path of {n} components"
