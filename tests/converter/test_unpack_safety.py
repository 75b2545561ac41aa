"""``remora unpack`` cannot write outside its target, whatever the bootstrap or the target holds.

Each hostile image is digest-valid: a normal conversion whose bootstrap was rewritten with SQLite
and re-packed (tests/converter/crafted_bootstrap.py). The "host" is a temp directory outside the
target that the image points at; nothing may appear in it. Tests that call :func:`unpack` directly
swap the crafted bootstrap into an image opened normally, so they exercise unpack's own defences
even where a bootstrap validator in RemoraImage.open would have caught the image first; the CLI
tests go through the whole command.
"""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from remora.converter.convert import ConvertOptions, convert
from remora.converter.image import LocalBlobs, RemoraImage
from remora.converter.unpack import unpack
from remora.errors import InvalidInput, UsageError
from remora.format.bootstrap import Bootstrap
from remora.imagestore import open_store
from remora_testing.imagebuild import LayerSpec, write_image
from remora_testing.tarbuild import LayerBuilder
from tests.converter.crafted_bootstrap import Crafter, extract_bootstrap, repack

T = 1_700_000_000


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small converted image in an OCI layout, and its bootstrap database."""
    tmp = tmp_path_factory.mktemp("unpack-safety")
    layer = (LayerBuilder().add_dir("etc", mtime=T).add_file("etc/hello", b"hello\n", mtime=T)
             .add_dir("usr", mtime=T).add_dir("usr/bin", mtime=T)
             .add_file("usr/bin/tool", b"#!/bin/sh\necho payload\n", mode=0o755, mtime=T).build("none"))
    write_image(f"oci:{tmp}/src:1", None, [LayerSpec(layer)])
    layout = tmp / "out"
    convert(f"oci:{tmp}/src:1", f"oci:{layout}:1", ConvertOptions(progress=False))
    db = extract_bootstrap(layout, "1", tmp / "good.db")
    return {"layout": layout, "db": db, "tmp": tmp}


@pytest.fixture
def host(tmp_path):
    """A directory standing for the host's file system: must stay empty."""
    d = tmp_path / "host"
    d.mkdir()
    return d


def _unpack_with(base, db: Path, dest: Path, tmp: Path, force: bool = False):
    """Open the good image, swap in the crafted bootstrap ``db``, unpack it."""
    image = RemoraImage.open(open_store(f"oci:{base['layout']}:1"), tmp / "meta")
    try:
        image.bootstrap.close()
        image.bootstrap = Bootstrap(db)
        return unpack(image, dest, LocalBlobs(image, tmp / "blobs"), **({"force": True} if force else {}))
    finally:
        image.close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["remora", "unpack", *args], capture_output=True, text=True, timeout=120)


def _slash_name_db(base, host: Path, out: Path) -> Path:
    c = Crafter(base["db"], out)
    c.add_symlink(1, b"esc", os.fsencode(host))
    c.add_copy(1, b"esc/pwned", c.ino_of("usr/bin/tool"), mode=stat.S_IFREG | 0o4755)
    return c.close()


def test_name_with_slash_through_a_symlink_writes_nothing_outside(base, host, tmp_path):
    db = _slash_name_db(base, host, tmp_path / "slash.db")
    with pytest.raises(InvalidInput, match="unsafe entry name"):
        _unpack_with(base, db, tmp_path / "rootfs", tmp_path)
    assert list(host.iterdir()) == []


def test_name_with_slash_cli(base, host, tmp_path):
    db = _slash_name_db(base, host, tmp_path / "slash.db")
    repack(base["layout"], "1", db, "slash")
    proc = _cli(f"oci:{base['layout']}:slash", str(tmp_path / "rootfs"))
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(host.iterdir()) == []


class _DuplicatingBootstrap(Bootstrap):
    """A bootstrap whose directory listing repeats ``name``: after the real entry (a symlink) comes
    a regular file of the same name. The schema's (parent, name) key and the validator forbid this
    in a file, so a reader that hands it out is the only way to test unpack's own guard."""

    name = b"zz"
    extra = None

    def readdir(self, ino, after=b"", db=None, limit=-1):
        rows = super().readdir(ino, after, db, limit)
        out = []
        for name, rec in rows:
            out.append((name, rec))
            if name == self.name:
                out.append((name, self.extra))
        return out


def test_duplicate_name_symlink_then_file(base, host, tmp_path):
    victim = host / "victim"
    victim.write_bytes(b"host data\n")
    c = Crafter(base["db"], tmp_path / "dup.db")
    c.add_symlink(c.ino_of("etc"), b"zz", os.fsencode(victim))
    tool = c.add_copy(c.ino_of("usr"), b"tool2", c.ino_of("usr/bin/tool"), mode=stat.S_IFREG | 0o4755)
    db = c.close()
    image = RemoraImage.open(open_store(f"oci:{base['layout']}:1"), tmp_path / "meta")
    try:
        image.bootstrap.close()
        image.bootstrap = _DuplicatingBootstrap(db)
        image.bootstrap.extra = image.bootstrap.getattr(tool)
        with pytest.raises(InvalidInput, match="two entries named"):
            unpack(image, tmp_path / "rootfs", LocalBlobs(image, tmp_path / "blobs"))
    finally:
        image.close()
    assert victim.read_bytes() == b"host data\n"
    assert stat.S_IMODE(victim.stat().st_mode) & 0o4000 == 0
    assert [p.name for p in host.iterdir()] == ["victim"]


def test_duplicate_name_cli(base, host, tmp_path):
    victim = host / "victim"
    victim.write_bytes(b"host data\n")
    c = Crafter(base["db"], tmp_path / "dup.db", unique_names=False)
    etc = c.ino_of("etc")
    c.add_symlink(etc, b"zz", os.fsencode(victim))
    c.add_copy(etc, b"zz", c.ino_of("usr/bin/tool"), mode=stat.S_IFREG | 0o4755)
    repack(base["layout"], "1", c.close(), "dup")
    proc = _cli(f"oci:{base['layout']}:dup", str(tmp_path / "rootfs"))
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert victim.read_bytes() == b"host data\n"
    assert stat.S_IMODE(victim.stat().st_mode) & 0o4000 == 0


def test_dirent_back_to_an_ancestor_is_an_error_not_a_recursion(base, tmp_path):
    c = Crafter(base["db"], tmp_path / "loop.db")
    c.add_entry(c.ino_of("usr/bin"), b"up", 1)       # /usr/bin/up is the root again
    db = c.close()
    with pytest.raises(InvalidInput, match="appears twice"):
        _unpack_with(base, db, tmp_path / "rootfs", tmp_path)
    repack(base["layout"], "1", db, "loop")
    proc = _cli(f"oci:{base['layout']}:loop", str(tmp_path / "rootfs2"))
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr


def test_hard_link_to_a_symlink_is_refused(base, host, tmp_path):
    c = Crafter(base["db"], tmp_path / "hl.db")
    link = c.add_symlink(1, b"a-link", os.fsencode(host))
    c.add_entry(c.ino_of("etc"), b"b-link", link)
    db = c.close()
    with pytest.raises(InvalidInput, match="hard link"):
        _unpack_with(base, db, tmp_path / "rootfs", tmp_path)


def test_existing_symlink_in_target_is_replaced_not_followed(base, host, tmp_path):
    dest = tmp_path / "rootfs"
    dest.mkdir()
    (dest / "etc").symlink_to(host)
    (dest / "usr").mkdir()
    (dest / "usr" / "bin").symlink_to(host)
    with pytest.raises(UsageError, match="not empty"):
        _unpack_with(base, base["db"], dest, tmp_path)
    stats = _unpack_with(base, base["db"], dest, tmp_path / "again", force=True)
    assert stats.files == 2
    assert list(host.iterdir()) == []
    assert not (dest / "etc").is_symlink() and (dest / "etc" / "hello").read_bytes() == b"hello\n"
    assert not (dest / "usr" / "bin").is_symlink() and (dest / "usr" / "bin" / "tool").stat().st_mode & 0o777 == 0o755


def test_rerun_into_the_same_directory_is_a_clear_error(base, host, tmp_path):
    dest = tmp_path / "rootfs"
    ref = f"oci:{base['layout']}:1"
    first = _cli(ref, str(dest))
    assert first.returncode == 0, first.stderr
    assert (dest / "etc" / "hello").read_bytes() == b"hello\n"
    again = _cli(ref, str(dest))
    assert again.returncode == 2, again.stderr
    assert "not empty" in again.stderr and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    (dest / "etc" / "hello").unlink()
    (dest / "etc" / "hello").symlink_to(host / "written")
    forced = _cli(ref, str(dest), "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (dest / "etc" / "hello").is_symlink() and (dest / "etc" / "hello").read_bytes() == b"hello\n"
    assert list(host.iterdir()) == []
