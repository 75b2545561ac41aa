"""The history store (bounded, rotating, torn lines skipped) and `remora trainer` from its command line."""
from __future__ import annotations

import argparse
import json
import math
import random

import pytest

from remora.errors import InvalidInput
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


def test_raw_costs_are_trained_as_unshared_costs_and_the_load_is_multiplied_back(tmp_path):
    """A parent serving n transfers moves each piece n times slower. Raw costs (``norm`` false, the
    simulation's) are divided by the parent's transfers at choice time + 1 before training, so the model
    learns the link, not the load, and the scorer multiplies the load back: a prediction for a load never
    seen in training still grows with it (trees alone would extrapolate flat)."""
    from remora.plugins.scheduler.learned import LOAD
    from remora.plugins.scheduler.state import SchedulerState
    from remora.plugins.trainer.train import TrainConfig, train

    rtt, load = FEATURE_NAMES.index("rtt_s"), FEATURE_NAMES.index("parent_load")
    assert LOAD == load

    def history(directory, norm):
        store = LocalHistoryStore(directory)
        rng = random.Random(3)
        for i in range(3000):
            near = rng.random() < 0.5
            n = rng.randrange(0, 8)
            f = [None] * N
            f[rtt], f[load] = (0.002 if near else 0.05), float(n)
            cost = (0.01 if near else 0.1) * (n + 1) * rng.lognormvariate(0, 0.1)
            store.append({"v": HISTORY_VERSION, "t": float(i), "parent": "p", "child": "c", "scorer": "weighted",
                          "size": 1 << 20, "cost_s": cost, "age_s": 0.0, "norm": norm, "f": f})
        store.close()

    X = [[math.nan] * N for _ in range(3)]
    X[0][rtt], X[0][load] = 0.002, 0.0
    X[1][rtt], X[1][load] = 0.002, 30.0          # a load far beyond the history's (0..7)
    X[2][rtt], X[2][load] = 0.05, 0.0
    import numpy as np

    X = np.array(X)
    history(tmp_path / "raw", norm=False)
    _, model = train(str(tmp_path / "raw"), TrainConfig(min_rows=100, max_iter=40, threads=1))
    assert model.meta["target"] == "log_unshared_seconds_per_mib" and model.unshared
    pred = model.predict_log(X)
    assert abs(pred[0] - pred[1]) < 0.2                       # the link, whatever the load
    assert abs(pred[2] - pred[0] - math.log(10)) < 0.3        # near is 10x cheaper
    cost = model.predict_cost(X)
    assert 25 < cost[1] / cost[0] < 37                        # x (30 + 1): the load multiplied back
    # The same costs as peers report them (already divided by their uploads: norm true, or absent in
    # older rows) are taken as they are: the model then sees the cost grow with the load.
    history(tmp_path / "norm", norm=True)
    _, as_reported = train(str(tmp_path / "norm"), TrainConfig(min_rows=100, max_iter=40, threads=1))
    assert as_reported.predict_log(X)[1] - as_reported.predict_log(X)[0] > 1.5
    # The older target (cost as observed) stays loadable and is not multiplied by the load.
    _, shared = train(str(tmp_path / "raw"), TrainConfig(min_rows=100, max_iter=40, threads=1, unshared=False))
    assert shared.meta["target"] == "log_seconds_per_mib" and not shared.unshared
    assert np.allclose(shared.predict_cost(X), np.exp(shared.predict_log(X)))
    # Held-out error in log terms, for the scheduler's gates, beside the naive predictor's.
    v = model.meta["validation"]
    assert v["median_abs_log_error"] < 0.5 * v["naive"]["median_abs_log_error"] and model.advantage > 0.5
    # The recorder marks what the scheduler's estimator assumes (real peers normalize: true).
    state = SchedulerState(clock=lambda: 0.0)
    rec = HistoryRecorder(LocalHistoryStore(tmp_path / "rec"))
    rec.attach(state, type("Sel", (), {"on_choice": []})())
    assert rec.normalized is True
    state.bandwidth.normalized = False
    assert HistoryRecorder(LocalHistoryStore(tmp_path / "rec2")).attach(
        state, type("Sel", (), {"on_choice": []})()).normalized is False


def test_the_ablation_drops_features_from_the_fit(tmp_path):
    from remora.plugins.trainer.train import TrainConfig, train

    store = LocalHistoryStore(tmp_path / "h")
    rng = random.Random(2)
    for i in range(3000):
        store.append(row(i, rng))
    store.close()
    _, model = train(str(tmp_path / "h"), TrainConfig(min_rows=100, max_iter=30, threads=1,
                                                       drop=("pair_goodput",)))
    assert model.meta["trainer"]["dropped"] == ["pair_goodput"]
    # The only informative feature is gone: no better than the naive predictor.
    assert model.advantage < 0.2
    with pytest.raises(InvalidInput, match="unknown features"):
        train(str(tmp_path / "h"), TrainConfig(min_rows=100, drop=("nope",)))
