"""Fuzz the bootstrap validator, the bootstrap reader and the bootstrap layer decoder.

Inputs start from a real bootstrap written by remora's writer (tests/format/bootstrap_craft) and are
mutated two ways: raw bytes of the database file (flips, overwrites, truncation), and SQL edits that
keep a valid SQLite file but break remora's invariants (any value of any type in any column, rows
deleted or added, schema objects added). Every input must give a clean InvalidInput or pass; what
passes must then be readable with the reader (walk, lookups, read plans, chunk table) without any
exception but a RemoraError, and a walk must end. The conftest caps the address space; the
validator's own deadline bounds the time.
"""
from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "format"))
from bootstrap_craft import edit, sample_bootstrap, zstd_bomb

from remora.errors import InvalidInput, RemoraError
from remora.format.bootstrap import Bootstrap
from remora.format.bootstrap_layer import decode_bootstrap_layer, encode_bootstrap_layer
from remora.format.validate import validate_bootstrap

_SEED_TMP = tempfile.TemporaryDirectory(prefix="remora-fuzz-bootstrap-")   # removed at interpreter exit
_SEED_DIR = Path(_SEED_TMP.name)
SEED = sample_bootstrap(_SEED_DIR / "seed.db").read_bytes()
SEED_LAYER = encode_bootstrap_layer(_SEED_DIR / "seed.db", _SEED_DIR)[0].read_bytes()
TIME_LIMIT = 20.0

COLUMNS = {
    "meta": ["key", "value"], "blobs": ["id", "digest", "size"],
    "frames": ["id", "blob", "offset", "csize", "usize"], "chunks": ["id", "digest", "size", "frame", "frame_offset"],
    "inodes": ["ino", "mode", "uid", "gid", "size", "mtime_ns", "rdev", "nlink", "target", "extents"],
    "dirents": ["parent", "name", "ino"], "xattrs": ["ino", "name", "value"], "prefetch": ["seq", "ino"],
}

values = st.one_of(
    st.none(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.sampled_from([0, 1, 2, 3, 4, 5, 8, 9, 512, 4096, 8192, 16384, 32768, 40960, 41471, 33188, 16877]),
    st.binary(max_size=40),
    st.text(max_size=20),
    st.floats(allow_nan=False),
    st.sampled_from([b"..", b".", b"a/b", b"\0", b"", b"hello", b"etc"]),
)

edits = st.one_of(
    st.tuples(st.just("update"), st.sampled_from(sorted(COLUMNS)), st.integers(0, 9), values, st.integers(0, 12)),
    st.tuples(st.just("delete"), st.sampled_from(sorted(COLUMNS)), st.integers(0, 12)),
    st.tuples(st.just("dirent"), st.integers(0, 12), values, st.integers(0, 12)),
    st.tuples(st.just("schema"), st.sampled_from([
        "CREATE INDEX fz ON inodes(mode)",
        "CREATE VIEW fz AS SELECT * FROM inodes",
        "CREATE TRIGGER fz AFTER DELETE ON inodes BEGIN SELECT 1; END",
        "CREATE TABLE fz (x)",
        "DROP TABLE prefetch",
    ])),
)


def _apply(db: sqlite3.Connection, e: tuple) -> None:
    kind = e[0]
    try:
        if kind == "update":
            _, table, col, value, nth = e
            cols = COLUMNS[table]
            db.execute(f"UPDATE {table} SET {cols[col % len(cols)]} = ? WHERE rowid IN "
                       f"(SELECT rowid FROM {table} LIMIT 1 OFFSET ?)" if table not in ("meta", "dirents", "xattrs")
                       else f"UPDATE {table} SET {cols[col % len(cols)]} = ? WHERE ({', '.join(cols[:2])}) IN "
                       f"(SELECT {', '.join(cols[:2])} FROM {table} LIMIT 1 OFFSET ?)", (value, nth))
        elif kind == "delete":
            _, table, nth = e
            db.execute(f"DELETE FROM {table} WHERE {COLUMNS[table][0]} IN "
                       f"(SELECT {COLUMNS[table][0]} FROM {table} LIMIT 1 OFFSET ?)", (nth,))
        elif kind == "dirent":
            _, parent, name, ino = e
            db.execute("INSERT INTO dirents VALUES (?, ?, ?)", (parent, name, ino))
        else:
            db.execute(e[1])
    except sqlite3.Error:
        pass  # a constraint refused the edit: the file stays as it was


def _exercise(path: Path) -> None:
    """Validate; if it passes, everything the reader offers must work or raise a RemoraError."""
    t0 = time.monotonic()
    try:
        validate_bootstrap(path, seconds=TIME_LIMIT)
    except InvalidInput:
        return
    finally:
        assert time.monotonic() - t0 < TIME_LIMIT + 5
    try:
        bs = Bootstrap(path)
    except RemoraError:
        return
    try:
        n_dirents = bs._db.execute("SELECT count(*) FROM dirents").fetchone()[0]
        paths = 0
        for p, node in bs.walk():
            paths += 1
            assert paths <= n_dirents + 1, "walk does not end"
            bs.lookup_path(p)
            bs.xattrs(node.ino)
            if node.mode & 0o170000 == 0o100000:
                for ext in bs.read_plan(node.ino, 0, node.size + 1):
                    assert ext.blob in bs.blobs
        bs.chunk_table()
        bs.paths_of(bs.prefetch_inodes())
        bs.stats()
    except RemoraError:
        pass
    finally:
        bs.close()


@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), min_size=1, max_size=12),
       st.one_of(st.none(), st.integers(0, len(SEED))))
def test_mutated_database_bytes(flips, truncate):
    data = bytearray(SEED)
    for pos, byte in flips:
        data[pos] = byte
    if truncate is not None:
        del data[truncate:]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "b.db"
        path.write_bytes(bytes(data))
        _exercise(path)


@given(st.lists(edits, min_size=1, max_size=6))
def test_random_sql_edits(edit_list):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "b.db"
        path.write_bytes(SEED)
        db = sqlite3.connect(path, isolation_level=None)
        try:
            for e in edit_list:
                _apply(db, e)
        finally:
            db.close()
        _exercise(path)


@given(st.lists(st.tuples(st.integers(0, len(SEED_LAYER) - 1), st.integers(0, 255)), max_size=8),
       st.one_of(st.none(), st.integers(0, len(SEED_LAYER))),
       st.one_of(st.none(), st.integers(1, 1 << 34)))
def test_mutated_bootstrap_layer(flips, truncate, bomb_size):
    data = bytearray(SEED_LAYER if bomb_size is None else zstd_bomb(min(bomb_size, 64 << 20), declare=bomb_size))
    for pos, byte in flips:
        if pos < len(data):
            data[pos] = byte
    if truncate is not None:
        del data[truncate:]
    with tempfile.TemporaryDirectory() as d:
        layer = Path(d) / "layer.zst"
        layer.write_bytes(bytes(data))
        try:
            out = decode_bootstrap_layer(layer, Path(d) / "out.db", max_usize=256 << 20)
        except InvalidInput:
            assert not (Path(d) / "out.db").exists()
            return
        _exercise(out)


def test_seed_passes():
    """The unmutated seed is valid: the fuzzers above start from something that passes."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "b.db"
        path.write_bytes(SEED)
        validate_bootstrap(path)
        edit(path, "UPDATE dirents SET name = CAST('x/y' AS BLOB) WHERE name = CAST('hello' AS BLOB)")
        try:
            validate_bootstrap(path)
        except InvalidInput:
            return
        raise AssertionError("a name with '/' passed")
