"""SQLite connections to untrusted bootstrap files, with a bounded amount of work.

A bootstrap arrives from whoever pushed the image. SQLite will happily run whatever its schema says
(a view over an endless recursive query, a trigger, a generated column calling a function), so every
connection remora opens to one:

* is read-only and immutable (no journal, no WAL, no locking, nothing written next to it);
* runs with ``trusted_schema=OFF`` (schema objects cannot call functions with side effects);
* carries a progress handler that aborts a statement after a budget of VM steps (and, for the
  validator, a wall-clock deadline): ``sqlite3.OperationalError: interrupted``, turned into
  :class:`~remora.errors.InvalidInput` by the callers;
* caps a single value's size (``SQLITE_LIMIT_LENGTH``) so one row cannot make Python allocate GBs.

:func:`check_schema` compares the file's ``sqlite_master`` with what remora's own schema creates; it
reads no user table, so it is cheap enough for every open, and it refuses views and triggers before
any query could run them.
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from remora.errors import InvalidInput

PROGRESS_EVERY = 1000            # VM instructions between two calls of the progress handler
MAX_VALUE_LENGTH = 64 << 20      # biggest string/blob one row may hold
CACHE_KIB = 8 * 1024             # page cache per connection


class GuardedConnection(sqlite3.Connection):
    """A connection whose :meth:`execute` starts a fresh work budget for each statement (when
    ``per_statement``), so long-lived readers are bounded per query, not per lifetime."""

    per_statement = False
    budget_steps = 0
    steps_left = 0
    deadline: float | None = None

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        if self.per_statement:
            self.steps_left = self.budget_steps
        return super().execute(*args, **kwargs)


def step_budget(path: Path | str) -> int:
    """VM instructions a bootstrap of this size may cost: linear in its size (a full scan of every
    table with a join per row stays far below it), so the work is bounded by the file we accepted."""
    return 100_000_000 + 2_000 * Path(path).stat().st_size


def connect(path: Path | str, *, steps: int, seconds: float | None = None,
            per_statement: bool = False, check_same_thread: bool = True) -> GuardedConnection:
    """Open ``path`` read-only with the guards above. ``steps``: VM instructions allowed (per
    statement if ``per_statement``, else for the connection's lifetime); ``seconds``: a wall-clock
    deadline from now (None: none)."""
    uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro&immutable=1"
    db = sqlite3.connect(uri, uri=True, factory=GuardedConnection, check_same_thread=check_same_thread)
    db.per_statement = per_statement
    db.budget_steps = db.steps_left = steps
    db.deadline = None if seconds is None else time.monotonic() + seconds

    def progress() -> int:
        db.steps_left -= PROGRESS_EVERY
        if db.steps_left < 0:
            return 1
        if db.deadline is not None and time.monotonic() > db.deadline:
            return 1
        return 0

    db.set_progress_handler(progress, PROGRESS_EVERY)
    db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_LENGTH)
    for pragma in ("trusted_schema=OFF", "query_only=ON", "cell_size_check=ON", "mmap_size=0",
                   f"cache_size=-{CACHE_KIB}"):
        db.execute(f"PRAGMA {pragma}")
    return db


_reference: dict[str, list[tuple[Any, ...]]] = {}


def reference_schema(schema: str) -> list[tuple[Any, ...]]:
    """``sqlite_master`` rows that ``schema`` creates in a fresh database (what a file must match)."""
    rows = _reference.get(schema)
    if rows is None:
        ref = sqlite3.connect(":memory:")
        try:
            ref.executescript(schema)
            rows = sorted(ref.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"),
                          key=lambda r: (r[0], r[1]))
        finally:
            ref.close()
        _reference[schema] = rows
    return rows


def check_schema(db: sqlite3.Connection, schema: str, where: str) -> None:
    """The file's schema objects must be exactly those ``schema`` creates: same tables, same column
    and key definitions (the stored CREATE text), no view, trigger, index or other object."""
    try:
        rows = sorted(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master LIMIT 1000"),
                      key=lambda r: (str(r[0]), str(r[1])))
    except DB_ERRORS as exc:
        raise database_error(exc, where) from None
    want = reference_schema(schema)
    if rows == want:
        return
    have = {(r[0], r[1]): r for r in rows}
    expected = {(r[0], r[1]): r for r in want}
    extra = sorted(f"{t} {n}" for (t, n) in have.keys() - expected.keys())
    missing = sorted(f"{t} {n}" for (t, n) in expected.keys() - have.keys())
    changed = sorted(f"{t} {n}" for k, (t, n, *_rest) in have.items() if k in expected and have[k] != expected[k])
    parts = ([f"unexpected {', '.join(extra[:5])}"] if extra else []) + \
            ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
            ([f"different definition of {', '.join(changed[:5])}"] if changed else [])
    raise InvalidInput(f"{where}: schema is not remora's: {'; '.join(parts)}")


#: What reading an untrusted database can raise besides RemoraError: SQLite's errors, and a text value
#: (or an error message quoting the file) that is not UTF-8.
DB_ERRORS = (sqlite3.Error, UnicodeDecodeError)


def database_error(exc: Exception, where: str) -> InvalidInput:
    """The InvalidInput for an SQLite error met while reading an untrusted file."""
    if isinstance(exc, UnicodeDecodeError):
        return InvalidInput(f"{where}: corrupt bootstrap: text that is not UTF-8")
    if isinstance(exc, sqlite3.OperationalError) and "interrupt" in str(exc):
        return InvalidInput(f"{where}: exceeds the work budget for a bootstrap of its size (hostile or corrupt)")
    return InvalidInput(f"{where}: corrupt bootstrap: {exc}")
