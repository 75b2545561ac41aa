"""Download history: what the scheduler knew about a parent when it chose it, and what the piece cost.

The learned scorer (:mod:`.learned`) is trained (``remora trainer``) on these records. A record joins two
moments: the *choice* (``ParentSelector.on_choice``: the parent's :data:`FEATURE_NAMES` at that time) and
each *piece* the child then reports from that parent (``SchedulerState.piece_listeners``: its size and
cost). Only successful pieces are recorded (a failure's "cost" is a timeout, not a speed).

Storage: a :class:`HistorySink`. The manager's database is the intended home once it exists (a sink
that inserts there is the seam); until then :class:`LocalHistoryStore` writes newline-delimited JSON to
a directory, bounded and rotating:

    DIR/history-000017.ndjson     at most ``rows_per_file`` rows each (~300 bytes a row), the newest is appended to
    at most ``max_files`` files   the oldest is deleted when a new one starts (default cap: 1 M rows, ~300 MB)

Schema (format ``HISTORY_VERSION`` = 1), one JSON object per line:

==========  ============================================================================================
``v``       1
``t``       unix time of the piece report (seconds, float)
``parent``  parent host id;  ``child``: child host id
``scorer``  the scorer that made the choice (``weighted``, ``bandit``, ``learned``, ``random``)
``size``    piece bytes;  ``cost_s``: the reported piece cost in seconds (peers divide by the parent's
            concurrent uploads, docs/p2p.md)
``norm``    true when ``cost_s`` is already divided by the parent's concurrent uploads (real peers;
            the scheduler's ``bandwidth.normalized``), false for raw times (the simulation). Absent
            in older rows: read as true
``age_s``   seconds from the choice to this report
``f``       the features at choice time, a list in :data:`FEATURE_NAMES` order, ``null`` = unknown
==========  ============================================================================================

Writes are buffered (flushed every ``flush_rows`` rows or ``flush_s`` seconds, and on close): a crash
loses at most that much history, never the file's earlier lines (a torn last line is skipped on read).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from .selection import FEATURE_NAMES

log = logging.getLogger(__name__)

HISTORY_VERSION = 1
FILE_RE = re.compile(r"^history-(\d{6,})\.ndjson$")
MAX_PENDING = 100_000          # (child, parent) choices awaiting pieces, LRU
MAX_LINE = 4096                # a longer line is not ours: skipped on read


class HistorySink(Protocol):
    def append(self, row: dict) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def history_files(directory: str | os.PathLike) -> list[Path]:
    """The store's files, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := FILE_RE.match(p.name))]
    return [p for _, p in sorted(found)]


class LocalHistoryStore:
    """Rotating newline-JSON files in one directory (see the module doc)."""

    def __init__(self, directory: str | os.PathLike, rows_per_file: int = 100_000, max_files: int = 10,
                 flush_rows: int = 256, flush_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if rows_per_file < 1 or max_files < 1:
            raise ValueError("history needs rows_per_file >= 1 and max_files >= 1")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_file = rows_per_file
        self.max_files = max_files
        self.flush_rows = flush_rows
        self.flush_s = flush_s
        self.clock = clock
        self.buffer: list[str] = []
        self.last_flush = clock()
        self.rows_written = 0
        files = history_files(self.dir)
        if files:
            self.index = int(FILE_RE.match(files[-1].name).group(1))
            with open(files[-1], "rb") as fh:
                self.rows_in_file = sum(1 for _ in fh)
        else:
            self.index, self.rows_in_file = 1, 0

    @property
    def current(self) -> Path:
        return self.dir / f"history-{self.index:06d}.ndjson"

    def append(self, row: dict) -> None:
        self.buffer.append(json.dumps(row, separators=(",", ":"), allow_nan=False))
        if len(self.buffer) >= self.flush_rows or self.clock() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self.last_flush = self.clock()
        lines, self.buffer = self.buffer, []
        while lines:
            room = self.rows_per_file - self.rows_in_file
            if room <= 0:
                self._rotate()
                continue
            part, lines = lines[:room], lines[room:]
            with open(self.current, "a", encoding="utf-8") as fh:
                fh.write("\n".join(part) + "\n")
            self.rows_in_file += len(part)
            self.rows_written += len(part)

    def _rotate(self) -> None:
        self.index += 1
        self.rows_in_file = 0
        files = history_files(self.dir)
        for old in files[:max(0, len(files) + 1 - self.max_files)]:
            old.unlink(missing_ok=True)

    def close(self) -> None:
        self.flush()


def _clean(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None     # 6 digits: rows stay ~250 bytes


class HistoryRecorder:
    """Joins choices and piece reports into history rows (hook it with :meth:`attach`)."""

    def __init__(self, sink: HistorySink, scorer_name: Callable[[], str] | str = "weighted",
                 max_pending: int = MAX_PENDING, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.sink = sink
        self.scorer_name = scorer_name if callable(scorer_name) else (lambda: scorer_name)
        self.max_pending = max_pending
        self.clock = clock
        self.wall = wall
        self.pending: OrderedDict[tuple[str, str], tuple[list, float, str]] = OrderedDict()
        self.rows = 0
        self.counter = None            # a prometheus Counter, if any
        self.dropped = 0               # rows the sink could not write

    def attach(self, state, selector) -> HistoryRecorder:
        selector.on_choice.append(self.on_choice)
        state.piece_listeners.append(self.on_piece)
        self.state = state
        self.normalized = bool(getattr(getattr(state, "bandwidth", None), "normalized", True))
        return self

    def on_choice(self, task, child_id: str, parents) -> None:
        now = self.clock()
        name = self.scorer_name()
        for cand in parents:
            raw = cand.features.raw
            if raw is None:
                continue
            key = (child_id, cand.peer_id)
            self.pending[key] = ([_clean(x) for x in raw], now, name)
            self.pending.move_to_end(key)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)

    def on_piece(self, task, child_id: str, parent_id: str, size: int, cost_s: float, success: bool) -> None:
        if not success or size <= 0 or not cost_s or cost_s <= 0 or not math.isfinite(cost_s):
            return
        chosen = self.pending.get((child_id, parent_id))
        if chosen is None:
            return
        features, at, scorer = chosen
        peers = self.state.peers
        parent, child = peers.get(parent_id), peers.get(child_id)
        row = {"v": HISTORY_VERSION, "t": round(self.wall(), 3),
               "parent": parent.host.host_id if parent else parent_id,
               "child": child.host.host_id if child else child_id, "scorer": scorer,
               "size": int(size), "cost_s": float(f"{cost_s:.6g}"), "age_s": round(self.clock() - at, 3),
               "norm": getattr(self, "normalized", True), "f": features}
        try:
            self.sink.append(row)
        except OSError as exc:   # a full or broken disk costs history, never a piece report
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning("download history: %d row(s) not written: %s", self.dropped, exc)
            return
        self.rows += 1
        if self.counter is not None:
            self.counter.inc()

    def forget(self, peer_id: str) -> None:
        for key in [k for k in self.pending if peer_id in k]:
            del self.pending[key]


def read_rows(directory: str | os.PathLike, max_rows: int = 5_000_000) -> Iterator[dict]:
    """Rows of a :class:`LocalHistoryStore`, oldest first, at most ``max_rows`` (the newest ones).
    Lines that are torn, too long, of another version or of another feature count are skipped."""
    files = history_files(directory)
    n = len(FEATURE_NAMES)
    # Newest files first until enough rows, then read those oldest first.
    chosen, count = [], 0
    for p in reversed(files):
        chosen.append(p)
        with open(p, "rb") as fh:
            count += sum(1 for _ in fh)
        if count >= max_rows:
            break
    skip = max(0, count - max_rows)
    for p in reversed(chosen):
        with open(p, "rb") as fh:
            for line in fh:
                if skip:
                    skip -= 1
                    continue
                if len(line) > MAX_LINE:
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if (isinstance(row, dict) and row.get("v") == HISTORY_VERSION and isinstance(row.get("f"), list)
                        and len(row["f"]) == n):
                    yield row


def attach_learning(service) -> None:
    """Wire the learned scorer's metrics and the download history into a ``SchedulerService`` (called at
    the end of its ``__init__``). numpy-free: only ``--scorer learned`` loads :mod:`.learned` (numpy)."""
    import atexit

    config, scorer = service.config, service.scorer
    if hasattr(scorer, "chosen"):          # the learned scorer
        scorer.metrics = service.metrics
        service.metrics.scorer_kind(scorer.kind)
        service.selector.on_choice.append(lambda task, child_id, parents: scorer.chosen(parents))
    service.history = None
    history_dir = getattr(config, "history_dir", None)
    if history_dir:
        store = LocalHistoryStore(history_dir)
        recorder = HistoryRecorder(store, lambda: getattr(scorer, "kind", None) or scorer.name,
                                   clock=service.state.clock)
        recorder.counter = service.metrics.history_rows
        recorder.attach(service.state, service.selector)
        atexit.register(store.close)
        service.history = recorder
