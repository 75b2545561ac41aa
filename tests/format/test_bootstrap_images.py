"""Hostile bootstraps inside digest-valid images: check, unpack and dict build refuse them with exit 3.

Each image is a real conversion (``remora convert`` into an OCI layout) whose bootstrap layer is then
swapped for a crafted one with every digest, annotation and diff_id rewritten to match
(bootstrap_craft.replace_bootstrap): nothing but the bootstrap validator stands in the way. The bombs
run the real CLI as a child process, under an address-space limit (so a regression fails the test
instead of taking the machine), and its peak RSS is read with ``wait4``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bootstrap_craft import bomb_layer, copy_layout, edit, extract_db, ino_of, layer_from_db, replace_bootstrap

from remora.converter.convert import ConvertOptions, convert
from remora.converter.image import RemoraImage
from remora.errors import InvalidInput
from remora.imagestore import open_store
from remora_testing.imagebuild import LayerSpec, write_image
from remora_testing.tarbuild import LayerBuilder

RSS_LIMIT = 256 << 20
AS_LIMIT = 2 << 30          # a regression hits MemoryError here, not the machine's RAM
NO_PK = ["CREATE TABLE dirents2 (parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL)",
         "INSERT INTO dirents2 SELECT * FROM dirents", "DROP TABLE dirents", "ALTER TABLE dirents2 RENAME TO dirents"]
ENDLESS_META = ["DROP TABLE meta", "CREATE VIEW meta(key, value) AS WITH RECURSIVE r(n) AS "
                "(SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT 'k' || n, n FROM r"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bootimg")
    b = LayerBuilder()
    b.add_dir("etc").add_dir("usr").add_dir("usr/bin").add_dir("data")
    b.add_file("etc/hello", b"hello\n").add_file("usr/bin/tool", b"\x7fELF" * 3000, mode=0o4755)
    b.add_symlink("etc/host", "/tmp").add_file("data/a", b"A" * 5000).add_hardlink("data/hl", "data/a")
    write_image(f"oci:{tmp / 'src'}:1", None, [LayerSpec(b.build("none"))])
    convert(f"oci:{tmp / 'src'}:1", f"oci:{tmp / 'img'}:v1", ConvertOptions(progress=False))
    db = extract_db(tmp / "img", "v1", tmp / "good.db")
    return {"layout": tmp / "img", "db": db, "tmp": tmp}


def _craft(converted, tmp_path: Path, *statements: str, schema: bool = False) -> str:
    db = tmp_path / "crafted.db"
    db.write_bytes(converted["db"].read_bytes())
    edit(db, *statements, schema=schema)
    layout = copy_layout(converted["layout"], tmp_path / "layout")
    return replace_bootstrap(layout, "v1", layer_from_db(db, tmp_path / "enc"))


def _dirent(converted, name: bytes) -> int:
    return ino_of(converted["db"], name)


EVIL = f"remora-test-evil-{os.getpid()}"


def _cases(c) -> dict[str, list[str]]:
    etc, data, usr, hello = (_dirent(c, n) for n in (b"etc", b"data", b"usr", b"hello"))
    return {
        # etc/host is a symlink to /tmp: an unpack that joins names writes /tmp/EVIL
        "slash-in-name": [f"UPDATE dirents SET name = CAST('host/{EVIL}' AS BLOB) WHERE ino = {hello}"],
        "dotdot-name": [f"UPDATE dirents SET name = CAST('..' AS BLOB) WHERE ino = {hello}"],
        # the case: a symlink to a host directory under the same name as a file
        "duplicate-without-pk": NO_PK + [
            "INSERT INTO inodes VALUES (900, 41471, 0, 0, 4, 0, 0, 1, CAST('/tmp' AS BLOB), NULL)",
            f"INSERT INTO dirents VALUES ({etc}, CAST('hello' AS BLOB), 900)"],
        "loop-to-ancestor": [f"INSERT INTO dirents VALUES ({data}, CAST('up' AS BLOB), {usr})"],
        "hardlink-to-dir": [f"INSERT INTO dirents VALUES ({etc}, CAST('d2' AS BLOB), {data})"],
        "trigger": ["CREATE TRIGGER t AFTER INSERT ON inodes BEGIN SELECT 1; END"],
        "chunk-out-of-range": [f"UPDATE inodes SET extents = x'0000000000000000ffffff00' WHERE ino = {hello}"],
        "frame-past-blob": ["UPDATE frames SET csize = 1 << 40"],
        "endless-meta-view": ENDLESS_META,
    }


@pytest.mark.parametrize("case", ["slash-in-name", "dotdot-name", "duplicate-without-pk", "loop-to-ancestor",
                                  "hardlink-to-dir", "trigger", "chunk-out-of-range", "frame-past-blob"])
def test_open_refuses_a_hostile_bootstrap(converted, tmp_path, case):
    ref = _craft(converted, tmp_path, *_cases(converted)[case])
    with pytest.raises(InvalidInput, match="bootstrap"):
        RemoraImage.open(open_store(ref), tmp_path / "work").close()
    assert not list((tmp_path / "work").glob("*.db"))   # a refused bootstrap is not left behind


def test_untouched_image_still_opens(converted, tmp_path):
    ref = replace_bootstrap(copy_layout(converted["layout"], tmp_path / "l"), "v1",
                            layer_from_db(converted["db"], tmp_path / "enc"))
    image = RemoraImage.open(open_store(ref), tmp_path / "work")
    try:
        assert image.bootstrap.lookup_path("/data/hl") is not None
    finally:
        image.close()
    proc = subprocess.run(["remora", "check", ref], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["remora", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_check_refuses_duplicate_names_it_used_to_call_ok(converted, tmp_path):
    ref = _craft(converted, tmp_path, *_cases(converted)["duplicate-without-pk"])
    proc = _cli("check", ref)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "schema is not remora's" in proc.stderr


def test_check_does_not_hang_on_an_endless_view(converted, tmp_path):
    ref = _craft(converted, tmp_path, *ENDLESS_META)
    t0 = time.monotonic()
    proc = _cli("check", ref, timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 3, proc.stderr
    assert "unexpected view meta" in proc.stderr
    assert took < 15
    print(f"endless-view check rejected in {took:.2f}s")


def test_unpack_writes_nothing_for_a_name_with_a_slash(converted, tmp_path):
    ref = _craft(converted, tmp_path, *_cases(converted)["slash-in-name"])
    target = tmp_path / "rootfs"
    target.mkdir()
    escaped = Path("/tmp") / EVIL
    try:
        proc = _cli("unpack", ref, str(target))
        assert not escaped.exists(), "unpack wrote through the image's symlink onto the host"
    finally:
        escaped.unlink(missing_ok=True)
    assert proc.returncode == 3, proc.stderr
    assert "single path component" in proc.stderr
    assert not any(target.iterdir())


def test_dict_build_refuses_a_loop(converted, tmp_path):
    ref = _craft(converted, tmp_path, *_cases(converted)["loop-to-ancestor"])
    proc = _cli("dict", "build", str(tmp_path / "out.dict"), ref)
    assert proc.returncode == 3, proc.stderr
    assert not (tmp_path / "out.dict").exists()


def test_dict_build_refuses_a_hostile_dictionary_file(converted, tmp_path):
    db = tmp_path / "evil.dict"
    db.write_bytes(converted["db"].read_bytes())
    edit(db, *ENDLESS_META)
    proc = _cli("dict", "build", str(tmp_path / "out.dict"), str(db))
    assert proc.returncode == 3, proc.stderr


# -- bootstrap bombs --------------------------------------------------------------------------------

# The command runs under a small Python spawner, never forked straight from pytest: a child's ru_maxrss
# keeps the high-water mark of the image it was forked from (Linux carries it across exec), and pytest
# late in a full run is ~400 MB resident, so a direct child would "peak" at that before it even starts.
_SPAWNER = """
import json, resource, subprocess, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
p = subprocess.run(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
sys.stderr.buffer.write(p.stderr)
print(json.dumps([p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))
"""


def _measured(args: list[str], timeout: float = 120) -> tuple[int, int, float, str]:
    """Run ``args`` under an address-space limit; ``(exit code, peak RSS bytes, seconds, stderr)``."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _SPAWNER, str(AS_LIMIT), *args], capture_output=True,
                          text=True, timeout=timeout)
    took = time.monotonic() - t0
    code, maxrss_kib = json.loads(proc.stdout.strip().splitlines()[-1])
    return code, maxrss_kib * 1024, took, proc.stderr


@pytest.fixture(scope="module")
def bombs(converted, tmp_path_factory) -> dict[str, str]:
    """Two digest-valid images: a 4 GiB bomb (declared: refused at once) and a 300 MiB one under the
    cap (decompressed to disk, streamed, then refused as not a database)."""
    tmp = tmp_path_factory.mktemp("bombs")
    out = {}
    for name, usize in (("declared-4g", 4 << 30), ("under-cap-300m", 300 << 20)):
        layout = copy_layout(converted["layout"], tmp / name)
        layer = bomb_layer(usize)
        out[name] = replace_bootstrap(layout, "v1", layer)
        out[name + "-bytes"] = str(len(layer))
    return out


@pytest.mark.parametrize("bomb", ["declared-4g", "under-cap-300m"])
@pytest.mark.parametrize("command", ["check", "dict", "unpack"])
def test_bootstrap_bomb_is_refused_with_bounded_memory(bombs, tmp_path, bomb, command):
    ref = bombs[bomb]
    args = {"check": ["remora", "check", ref],
            "dict": ["remora", "dict", "build", str(tmp_path / "d.dict"), ref],
            "unpack": ["remora", "unpack", ref, str(tmp_path / "rootfs")]}[command]
    code, rss, took, stderr = _measured(args)
    print(f"{command} {bomb} ({bombs[bomb + '-bytes']} B layer): exit {code}, peak RSS {rss >> 20} MiB, {took:.2f}s")
    assert code == 3, stderr
    assert "bootstrap" in stderr
    assert rss < RSS_LIMIT
    assert took < 60
