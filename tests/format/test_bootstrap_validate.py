"""remora.format.validate: every hostile bootstrap class is InvalidInput, quickly; a real one passes.

Unit tests: no root, no registry. Each crafted file starts from a bootstrap written by remora's own
writer (bootstrap_craft.sample_bootstrap) and changes one thing with plain SQL.
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from bootstrap_craft import edit, ino_of, sample_bootstrap

from remora.errors import InvalidInput
from remora.format.bootstrap import Bootstrap, write_chunk_table
from remora.format.chunktable import ChunkTable
from remora.format.validate import validate_bootstrap

# dirents without its PRIMARY KEY: a schema under which duplicates can be inserted
NO_PK = ("CREATE TABLE dirents2 (parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL)",
         "INSERT INTO dirents2 SELECT * FROM dirents", "DROP TABLE dirents", "ALTER TABLE dirents2 RENAME TO dirents")


@pytest.fixture
def db(tmp_path) -> Path:
    return sample_bootstrap(tmp_path / "b.db")


def test_remoras_own_bootstrap_passes(db):
    validate_bootstrap(db)
    bs = Bootstrap(db)
    try:
        assert [p for p, _ in bs.walk()] == [b"/", b"/data", b"/data/a", b"/data/hl", b"/dev", b"/dev/null",
                                             b"/etc", b"/etc/empty", b"/etc/hello", b"/etc/link"]
    finally:
        bs.close()


def test_chunk_dictionary_passes_only_without_tree_requirement(tmp_path):
    table = ChunkTable()
    f = table.add_frame(table.blob_id("sha256:" + "1" * 64, 9000), 512, 100, 4096)
    table.add_chunk(b"\x01" * 32, 4096, f, 0)
    path = tmp_path / "dict.db"
    write_chunk_table(path, table)
    validate_bootstrap(path, require_tree=False)
    with pytest.raises(InvalidInput, match="inode numbers start at 1"):
        validate_bootstrap(path)


def _reject(path: Path, match: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(InvalidInput, match=match):
        validate_bootstrap(path)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("statements, match", [
    (["UPDATE dirents SET name = CAST('a/../../x' AS BLOB) WHERE name = CAST('hello' AS BLOB)"],
     "single path component"),
    (["UPDATE dirents SET name = CAST('..' AS BLOB) WHERE name = CAST('hello' AS BLOB)"], "single path component"),
    (["UPDATE dirents SET name = CAST('.' AS BLOB) WHERE name = CAST('hello' AS BLOB)"], "single path component"),
    (["UPDATE dirents SET name = x'' WHERE name = CAST('hello' AS BLOB)"], "single path component"),
    (["UPDATE dirents SET name = x'610062' WHERE name = CAST('hello' AS BLOB)"], "single path component"),
    (["UPDATE dirents SET name = 'hello-as-text' WHERE name = CAST('hello' AS BLOB)"], "wrong type"),
    (["UPDATE meta SET value = '2' WHERE key = 'format_version'"], "format version"),
    (["DELETE FROM meta WHERE key = 'format_version'"], "format_version"),
    (["UPDATE inodes SET extents = x'00000000000000000000' WHERE size = 4096"], "torn"),
    (["UPDATE inodes SET extents = x'000000000000000009000000' WHERE size = 4096"], "chunk id 9 out of range"),
    (["UPDATE inodes SET size = 4097 WHERE size = 4096"], "cover 4096 bytes, size is 4097"),
    (["UPDATE chunks SET frame = 7"], "frame out of range"),
    (["UPDATE chunks SET frame_offset = 8000 WHERE id = 1"], "past the end of its frame"),
    (["UPDATE frames SET offset = 99000"], "past the end of its blob"),
    (["UPDATE frames SET usize = 1 << 40"], "out of range"),
    (["UPDATE blobs SET digest = 'sha256:zz'"], "bad digest"),
    (["UPDATE blobs SET id = 5"], "ids run"),
    (["INSERT INTO blobs VALUES (1, (SELECT digest FROM blobs), 10)"], "listed twice"),
    (["UPDATE inodes SET mode = 61440 | 493 WHERE ino = 1"], "out of range"),
    (["UPDATE inodes SET target = NULL WHERE target IS NOT NULL"], "symlink"),
    (["UPDATE inodes SET uid = 'root' WHERE ino = 1"], "wrong type"),
    (["INSERT INTO dirents VALUES (1, CAST('ghost' AS BLOB), 999)"], "missing inode"),
    (["INSERT INTO prefetch VALUES (5, 999)"], "prefetch"),
    (["INSERT INTO xattrs VALUES (999, 'user.a', x'00')"], "xattrs of missing inode"),
    (["INSERT INTO inodes VALUES (50, 33188, 0, 0, 0, 0, 0, 1, NULL, NULL)"], "not in the tree"),
])
def test_field_and_tree_violations(db, statements, match):
    _reject(edit(db, *statements), match)


def test_duplicate_parent_name_under_a_schema_without_the_key(db):
    hello = ino_of(db, b"hello")
    edit(db, *NO_PK, f"INSERT INTO dirents VALUES ((SELECT parent FROM dirents WHERE ino = {hello}), "
         f"CAST('hello' AS BLOB), {hello})")
    _reject(db, "schema is not remora's")


def test_entry_pointing_back_at_an_ancestor(db):
    data = ino_of(db, b"data")
    etc = ino_of(db, b"etc")
    _reject(edit(db, f"INSERT INTO dirents VALUES ({etc}, CAST('up' AS BLOB), {data})"), "2 entries")
    # and at the root itself
    root = sample_bootstrap(db.parent / "root.db")
    _reject(edit(root, f"INSERT INTO dirents VALUES ({ino_of(root, b'etc')}, CAST('up' AS BLOB), 1)"),
            "back at the root")


def test_a_loop_detached_from_the_root(db):
    etc, data = ino_of(db, b"etc"), ino_of(db, b"data")
    # /etc and /data each other's only parent: a cycle with no path from the root
    edit(db, f"DELETE FROM dirents WHERE parent = 1 AND ino IN ({etc}, {data})",
         f"INSERT INTO dirents VALUES ({etc}, CAST('d' AS BLOB), {data})",
         f"INSERT INTO dirents VALUES ({data}, CAST('e' AS BLOB), {etc})")
    _reject(db, "not reachable from the root")


def test_hard_link_to_a_directory(db):
    _reject(edit(db, f"INSERT INTO dirents VALUES (1, CAST('etc2' AS BLOB), {ino_of(db, b'etc')})"), "2 entries")


def test_entry_in_a_non_directory(db):
    _reject(edit(db, f"INSERT INTO dirents VALUES ({ino_of(db, b'hello')}, CAST('x' AS BLOB), "
                     f"{ino_of(db, b'null')})"), "not a directory")


def test_view_over_an_endless_recursive_query_replaces_meta(db):
    edit(db, "DROP TABLE meta",
         "CREATE VIEW meta(key, value) AS WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
         "SELECT 'format_version', n FROM r")
    _reject(db, "schema is not remora's: unexpected view meta")
    t0 = time.monotonic()
    with pytest.raises(InvalidInput):   # the reader on its own refuses it too, without running it
        Bootstrap(db)
    assert time.monotonic() - t0 < 5


def test_trigger_index_and_extra_table(tmp_path):
    for i, sql in enumerate(["CREATE TRIGGER t AFTER INSERT ON meta BEGIN SELECT 1; END",
                             "CREATE INDEX extra ON dirents(ino)",
                             "CREATE TABLE extra (x)"]):
        path = edit(sample_bootstrap(tmp_path / f"{i}.db"), sql)
        _reject(path, "schema is not remora's: unexpected")


def test_changed_column_definition(db):
    edit(db, "UPDATE sqlite_master SET sql = replace(sql, 'mode INTEGER NOT NULL', 'mode ANY') "
             "WHERE name = 'inodes'", schema=True)
    _reject(db, "different definition of table inodes")


def test_not_a_database_and_wal_mode(tmp_path, db):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite" * 100)
    _reject(junk, "not an SQLite database")
    data = bytearray(db.read_bytes())
    data[18] = data[19] = 2
    wal = tmp_path / "wal.db"
    wal.write_bytes(bytes(data))
    _reject(wal, "rollback-journal")
    torn = tmp_path / "torn.db"
    torn.write_bytes(db.read_bytes()[:4096 + 100])
    with pytest.raises(InvalidInput):
        validate_bootstrap(torn)


def test_work_budget_stops_an_expensive_file(db):
    """The budget itself: with a tiny step allowance a valid file is refused as too expensive (a
    hostile one that slips past every structural check still cannot run for long)."""
    edit(db, f"INSERT INTO xattrs WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r LIMIT 5000) "
             f"SELECT {ino_of(db, b'hello')}, 'user.n' || n, x'00' FROM r")
    validate_bootstrap(db)
    with pytest.raises(InvalidInput, match="work budget"):
        validate_bootstrap(db, steps=20_000)


def test_reader_connections_are_guarded(db):
    bs = Bootstrap(db)
    try:
        conn = bs.connection()
        assert conn.execute("PRAGMA trusted_schema").fetchone()[0] == 0
        assert conn.execute("PRAGMA query_only").fetchone()[0] == 1
        with pytest.raises(sqlite3.OperationalError, match="interrupt"):  # per statement budget
            conn.execute("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
                         "SELECT count(*) FROM r").fetchone()
        assert conn.execute("SELECT count(*) FROM inodes").fetchone()[0] > 0   # the next one runs again
        conn.close()
    finally:
        bs.close()
