"""The history store (bounded, rotating, torn lines skipped) and `remora trainer` from its command line."""
from __future__ import annotations

import argparse
import json
import math
import random

import pytest
from remora.plugins.scheduler.history import (
    HISTORY_VERSION,
    HistoryRecorder,
    LocalHistoryStore,
    history_files,
    read_rows,
)
from remora.plugins.scheduler.learned import load_model
from remora.plugins.scheduler.selection import FEATURE_NAMES
from remora.plugins.trainer import cli as trainer_cli

from remora.errors import InvalidInput

N = len(FEATURE_NAMES)


def row(i: int, rng: random.Random) -> dict:
    """A synthetic record: the piece cost follows the pair goodput (feature 0), when it is known."""
    goodput = rng.choice([None, rng.uniform(1e6, 1e8)])
    cost = (1 << 20) / (goodput or 5e6) * rng.lognormvariate(0, 0.2)
    f = [goodput] + [rng.choice([None, rng.random()]) for _ in range(N - 1)]
    return {"v": HISTORY_VERSION, "t": float(i), "parent": "p", "child": "c", "scorer": "weighted",
            "size": 1 << 20, "cost_s": cost, "age_s": 0.0, "f": f}


def test_the_store_rotates_and_keeps_at_most_its_cap(tmp_path):
    store = LocalHistoryStore(tmp_path, rows_per_file=100, max_files=3, flush_rows=64)
    rng = random.Random(1)
    for i in range(1000):
        store.append(row(i, rng))
    store.close()
    files = history_files(tmp_path)
    assert [p.name for p in files] == ["history-000008.ndjson", "history-000009.ndjson", "history-000010.ndjson"]
    rows = list(read_rows(tmp_path))
    assert [r["t"] for r in rows] == [float(i) for i in range(700, 1000)]      # the newest 300, in order
    assert [r["t"] for r in read_rows(tmp_path, max_rows=50)] == [float(i) for i in range(950, 1000)]
    # A torn last line (crash mid-write), a foreign line and another version are skipped, not fatal.
    with open(files[-1], "a") as fh:
        fh.write(json.dumps(dict(row(5000, rng), v=99)) + "\n" + "x" * 10_000 + "\n" + '{"v": 1, "t": 3')
    assert len(list(read_rows(tmp_path))) == 300
    # A store reopened on the same directory continues the newest file.
    again = LocalHistoryStore(tmp_path, rows_per_file=100, max_files=3)
    assert again.index == 10 and again.rows_in_file == 103


def test_recorder_writes_a_row_per_piece_of_a_chosen_parent_only(tmp_path):
    class Sink:
        def __init__(self):
            self.rows = []

        def append(self, r):
            self.rows.append(r)

    from remora.plugins.scheduler.selection import Candidate, Features
    from remora.plugins.scheduler.state import TaskPeer

    sink = Sink()
    rec = HistoryRecorder(sink, "bandit", max_pending=2, clock=lambda: 10.0, wall=lambda: 1234.5)
    rec.state = type("S", (), {"peers": {}})()
    feats = Features(1.0, 1.0, None, None, 0.0, raw=(1e6, None, math.inf) + (0.0,) * (N - 3))
    rec.on_choice(None, "child", [Candidate(TaskPeer("p1", 0), feats), Candidate(TaskPeer("p2", 0), feats)])
    rec.on_piece(None, "child", "p1", 1 << 20, 0.25, True)
    rec.on_piece(None, "child", "p1", 1 << 20, 9.0, False)          # failures are no cost sample
    rec.on_piece(None, "child", "stranger", 1 << 20, 0.25, True)    # never chosen by the scheduler
    rec.on_choice(None, "other", [Candidate(TaskPeer("p3", 0), feats)])
    rec.on_piece(None, "child", "p1", 1 << 20, 0.5, True)           # evicted from the pending choices
    assert len(sink.rows) == 1
    r = sink.rows[0]
    assert r["f"][:3] == [1e6, None, None] and r["cost_s"] == 0.25 and r["scorer"] == "bandit" and r["t"] == 1234.5

    class FullDisk:
        def append(self, r):
            raise OSError(28, "No space left on device")

    rec.sink = FullDisk()                                            # history is lost, the report is not
    rec.on_piece(None, "other", "p3", 1 << 20, 0.5, True)
    assert rec.dropped == 1 and rec.rows == 1


def parse(argv):
    ap = argparse.ArgumentParser()
    trainer_cli.register(ap.add_subparsers(dest="command"))
    return ap.parse_args(argv)


def test_remora_trainer_publishes_a_validated_model(tmp_path, capsys):
    store = LocalHistoryStore(tmp_path / "h", rows_per_file=2000)
    rng = random.Random(2)
    for i in range(5000):
        store.append(row(i, rng))
    store.close()
    args = parse(["trainer", "--history-dir", str(tmp_path / "h"), "--model-dir", str(tmp_path / "m"),
                  "--holdout", "0.25", "--max-iter", "30", "--threads", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "published" in out and "model-000001.json" in out
    model = load_model(tmp_path / "m" / "model-000001.json")
    val = model.meta["validation"]
    assert model.meta["training_rows"] == 3750 and val["rows"] == 1250
    assert val["median_rel_error"] < 0.6 * val["naive"]["median_rel_error"]   # the features pay
    assert model.meta["features"] == list(FEATURE_NAMES) and len(model.meta["trainer"]) > 3
    # Too little history is an input error (exit 3), and nothing is published.
    args = parse(["trainer", "--history-dir", str(tmp_path / "h"), "--model-dir", str(tmp_path / "m"),
                  "--min-rows", "10000"])
    with pytest.raises(InvalidInput):
        args.func(args)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model-000001.json"]
