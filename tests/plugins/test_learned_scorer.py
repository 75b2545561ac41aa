"""The learned scorer end to end: history -> trainer -> published model -> hot-loaded -> other choices;
stale, bad and inaccurate models fall back to the weighted scorer, visibly."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from remora.errors import InvalidInput
from remora.plugins.scheduler.learned import (
    CostModel,
    LearnedScorer,
    ModelWatcher,
    load_model,
    model_files,
    publish_model,
)
from remora.plugins.scheduler.selection import FEATURE_NAMES, WeightedScorer
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerService
from remora.plugins.scheduler.state import Host
from remora.plugins.trainer.train import (
    TrainConfig,
    export_trees,
    train,
    train_and_publish,
)

TASK = "sha256:" + "7a" * 32
PIECE = 4 << 20
# Hidden truth: the fast hosts are far away (high RTT), the slow ones near. The weighted score's RTT term
# prefers the near ones; the pieces say otherwise.
FAST = {f"fast{i}": (50e6, 0.040) for i in range(3)}
SLOW = {f"slow{i}": (25e6, 0.002) for i in range(3)}
WORLD = {**FAST, **SLOW}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def metric(svc, sample: str) -> float:
    for line in svc.metrics.render().decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def make_service(tmp_path, clock, scorer="learned"):
    config = SchedulerConfig(peer_ttl=1e9, scorer=scorer, model_dir=str(tmp_path / "models"),
                             history_dir=str(tmp_path / "history"), random_seed=3)
    svc = SchedulerService(config, clock=clock)
    for pid in WORLD:
        svc.state.register_peer(Host(peer_id=pid, host_id=pid, ip="127.0.0.1", upload_port=1))
        svc.state.join_task(pid, TASK, 64 * PIECE, PIECE)
        svc.state.announce(pid, TASK, range(64), (), done=True)
    task = svc.state.tasks[TASK]
    svc.state.learn_metadata(task, "fast0", task.content_length, PIECE, ["sha256:" + "0" * 64] * 64)
    return svc


def child_round(svc, clock, name, rng, pieces_per_parent=2):
    """A child arrives, probes everyone, asks for parents, fetches pieces from them at the hidden rates."""
    svc.state.register_peer(Host(peer_id=name, host_id=name, ip="127.0.0.1", upload_port=1))
    for pid, (_, rtt) in WORLD.items():
        svc.state.record_probe(name, pid, rtt, True)
    svc.state.join_task(name, TASK)
    parents, b2s, _, _ = svc.schedule(svc.state.tasks[TASK], name)
    assert not b2s and parents
    chosen = [p.host.peer_id for p in parents]
    piece = 0
    for pid in chosen:
        rate, rtt = WORLD[pid]
        for _ in range(pieces_per_parent):
            clock.now += 0.05
            svc.piece_result(TASK, name, pid, piece, True, (rtt + PIECE / rate) * rng.lognormvariate(0, 0.1), PIECE)
            piece += 1
    svc.state.leave_task(name, TASK)
    return chosen


def test_history_trains_a_model_that_is_hot_loaded_and_changes_the_choice(tmp_path):
    clock, rng = Clock(), random.Random(5)
    svc = make_service(tmp_path, clock)
    assert isinstance(svc.scorer, LearnedScorer)
    # No model yet: the weighted scorer decides, and says so.
    first = [child_round(svc, clock, f"kid{i}", rng) for i in range(60)]
    assert svc.scorer.kind == "weighted" and svc.scorer.reason == "no_model"
    assert metric(svc, 'remora_scheduler_scorer{kind="weighted"}') == 1
    assert metric(svc, 'remora_scheduler_scorer_fallbacks_total{reason="no_model"}') >= 60
    # The weighted scorer ranks the near, slow hosts first (RTT term), every time.
    assert all(c[0].startswith("slow") for c in first)
    svc.history.sink.flush()
    rows = [json.loads(ln) for p in sorted((tmp_path / "history").iterdir()) for ln in p.read_text().splitlines()]
    assert len(rows) == svc.history.rows == 60 * 4 * 2
    assert all(len(r["f"]) == len(FEATURE_NAMES) and r["scorer"] == "weighted" and r["cost_s"] > 0 for r in rows)

    path, meta = train_and_publish(str(tmp_path / "history"), str(tmp_path / "models"),
                                   TrainConfig(min_rows=100, threads=1))
    assert path.endswith("model-000001.json") and meta["version"] == 1
    assert meta["validation"]["median_rel_error"] < meta["validation"]["naive"]["median_rel_error"]
    # Picked up without a restart, at the next poll.
    clock.now += 2
    later = [child_round(svc, clock, f"late{i}", rng) for i in range(10)]
    assert svc.scorer.kind == "learned" and svc.scorer.watcher.model.version == 1
    assert all(c[0].startswith("fast") for c in later)
    assert metric(svc, 'remora_scheduler_scorer{kind="learned"}') == 1
    assert metric(svc, "remora_scheduler_model_version") == 1
    assert metric(svc, "remora_scheduler_predicted_cost_seconds_per_mib_count") == sum(map(len, later))
    # The published file carries its metadata (what the scheduler checks before using it).
    doc = json.loads((tmp_path / "models" / "model-000001.json").read_text())
    assert doc["features"] == list(FEATURE_NAMES) and doc["training_rows"] == int(len(rows) * 0.8)
    assert doc["created"] > 0 and "HistGradientBoostingRegressor" in doc["trainer"]["estimator"]


def _doc(created: float, error: float, log_error: float = 0.1, naive_log_error: float | None = 1.0,
         target: str = "log_seconds_per_mib") -> dict:
    tree = {"feature": [5, 0, 0], "threshold": [0.01, 0, 0], "missing_left": [1, 0, 0], "left": [1, 0, 0],
            "right": [2, 0, 0], "value": [0, math.log(0.01), math.log(0.1)], "leaf": [0, 1, 1]}
    validation = {"median_rel_error": error, "median_abs_log_error": log_error}
    if naive_log_error is not None:
        validation["naive"] = {"median_abs_log_error": naive_log_error}
    return {"format": "remora-cost-model/1", "version": 0, "created": created, "features": list(FEATURE_NAMES),
            "target": target, "training_rows": 1000, "baseline": 0.0, "trees": [tree], "validation": validation}


def test_a_stale_or_inaccurate_model_falls_back_and_a_bad_file_is_refused(tmp_path):
    clock, wall = Clock(), Clock()
    wall.now = 1_000_000.0
    watcher = ModelWatcher(tmp_path, max_age_s=3600, max_error=0.5, poll_s=1.0, clock=clock, wall=wall)
    assert watcher.current() == (None, "no_model")
    publish_model(tmp_path, _doc(created=wall.now - 7200, error=0.1))
    clock.now += 1.5
    assert watcher.current() == (None, "stale")
    publish_model(tmp_path, _doc(created=wall.now, error=0.9))
    clock.now += 1.5
    assert watcher.current() == (None, "error_too_high")
    # Accurate enough, but its advantage over the naive predictor is not proven: 10 % (< 20 %), or unknown.
    publish_model(tmp_path, _doc(created=wall.now, error=0.2, log_error=0.45, naive_log_error=0.5))
    clock.now += 1.5
    assert watcher.current() == (None, "no_advantage")
    publish_model(tmp_path, _doc(created=wall.now, error=0.2, naive_log_error=None))
    clock.now += 1.5
    assert watcher.current() == (None, "no_advantage")
    publish_model(tmp_path, _doc(created=wall.now, error=0.2))
    clock.now += 0.5                                      # not polled yet: within poll_s
    assert watcher.current()[1] == "no_advantage"
    clock.now += 1.0
    model, why = watcher.current()
    assert why == "" and model.version == 5
    # The 1-tree model: rtt <= 10 ms -> 0.01 s/MiB, else (or unknown) 0.1 s/MiB.
    X = np.full((3, len(FEATURE_NAMES)), np.nan)
    X[0, 5], X[1, 5] = 0.002, 0.05
    assert np.allclose(model.predict_cost(X), [0.01, 0.1, 0.01])   # unknown goes left (missing_left)
    # A newer file that is not a valid model is refused; the last good one stays in use.
    (tmp_path / "model-000006.json").write_text("{not json")
    clock.now += 1.5
    assert watcher.current()[0].version == 5 and watcher.load_errors == 1
    bad = _doc(created=wall.now, error=0.1)
    bad["trees"][0]["left"][0] = 7                        # a child outside the tree
    (tmp_path / "model-000007.json").write_text(json.dumps(dict(bad, version=7)))
    with pytest.raises(InvalidInput, match="children"):
        load_model(tmp_path / "model-000007.json")
    other = _doc(created=wall.now, error=0.1)
    other["features"] = ["rtt_s"]
    with pytest.raises(InvalidInput, match="feature list"):
        CostModel.from_doc(other)
    with pytest.raises(InvalidInput):
        publish_model(tmp_path, other)                    # never published
    clock.now += 1.5
    assert watcher.current()[0].version == 5 and watcher.load_errors == 2
    # Fallback scores are exactly the weighted scores.
    scorer = LearnedScorer(ModelWatcher(tmp_path / "empty", clock=clock))
    from remora.plugins.scheduler.selection import Candidate, Features
    from remora.plugins.scheduler.state import TaskPeer
    cands = [Candidate(TaskPeer(f"p{i}", 0), Features(0.5, 0.2 * i, 0.3, None, 0.0, raw=(None,) * 15))
             for i in range(3)]
    scorer.score("c", cands)
    w = WeightedScorer()
    assert [c.score for c in cands] == [w.value(c.features) for c in cands] and scorer.kind == "weighted"


def test_publishing_is_versioned_and_keeps_the_newest(tmp_path):
    for i in range(7):
        publish_model(tmp_path, _doc(created=1.0 + i, error=0.1), keep=3)
    assert [v for v, _ in model_files(tmp_path)] == [5, 6, 7]
    assert load_model(tmp_path / "model-000007.json").created == 7.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model-")]      # no temp file left


def test_exported_trees_predict_exactly_like_scikit_learn(tmp_path):
    from sklearn.ensemble import HistGradientBoostingRegressor

    rng = np.random.default_rng(4)
    X = rng.lognormal(0, 1, size=(3000, len(FEATURE_NAMES)))
    X[rng.random(X.shape) < 0.3] = np.nan                 # unknown features everywhere
    y = np.log1p(np.nan_to_num(X[:, 0], nan=2.0)) - 0.5 * np.nan_to_num(X[:, 5], nan=0.1) + rng.normal(0, .1, 3000)
    reg = HistGradientBoostingRegressor(max_iter=40, max_depth=6, random_state=0).fit(X[:2000], y[:2000])
    baseline, trees = export_trees(reg)
    doc = dict(_doc(1.0, 0.1), baseline=baseline, trees=trees)
    model = CostModel.from_doc(json.loads(json.dumps(doc)))          # through JSON, as from a file
    assert np.allclose(model.predict_log(X[2000:]), reg.predict(X[2000:]), rtol=0, atol=1e-9)
    assert model.depth <= 6


def test_trainer_refuses_too_little_history(tmp_path):
    (tmp_path / "h").mkdir()
    with pytest.raises(InvalidInput, match="usable history rows"):
        train(str(tmp_path / "h"), TrainConfig(min_rows=10))


def test_scheduler_command_line_selects_the_learned_scorer(tmp_path):
    from remora.errors import UsageError
    from remora.plugins.scheduler.cli import config_from_args, register_scheduler

    ap = __import__("argparse").ArgumentParser()
    register_scheduler(ap.add_subparsers())
    args = ap.parse_args(["scheduler", "--insecure-plain-mesh", "--scorer", "learned", "--model-dir", str(tmp_path),
                          "--model-max-age", "60", "--model-max-error", "0.3", "--history-dir", str(tmp_path / "h")])
    config = config_from_args(args)
    svc = SchedulerService(config)
    assert isinstance(svc.scorer, LearnedScorer) and svc.scorer.watcher.max_error == 0.3
    assert svc.scorer.watcher.max_age_s == 60 and svc.history is not None
    with pytest.raises(UsageError, match="model directory"):
        SchedulerConfig(scorer="learned")
    assert SchedulerService(SchedulerConfig(scorer="random")).scorer.name == "random"


def test_the_model_ranks_only_candidates_it_can_tell_apart_and_multiplies_their_load_back(tmp_path):
    """Per decision: when the model's predictions for the candidates spread less than ``separation`` x its
    own held-out log error, its ranking is noise and the weighted scorer decides (counted as a fallback,
    reason no_separation). An unshared-cost model multiplies each prediction by the parent's load + 1."""
    from remora.plugins.scheduler.selection import Candidate, Features
    from remora.plugins.scheduler.state import TaskPeer

    clock = Clock()
    svc = make_service(tmp_path, clock)
    scorer = svc.scorer
    rtt, load = FEATURE_NAMES.index("rtt_s"), FEATURE_NAMES.index("parent_load")

    def cands(rtts, loads=(0, 0, 0)):
        out = []
        for i, (r, n) in enumerate(zip(rtts, loads)):
            raw = [None] * len(FEATURE_NAMES)
            raw[rtt], raw[load] = r, float(n)
            # The weighted score prefers candidate 2 (declared bandwidth), the model candidate 0 (near).
            out.append(Candidate(TaskPeer(f"p{i}", 0), Features(0.5, 1.0, 0.1 + 0.4 * i, 0.5, 0.0, tuple(raw))))
        return out

    def publish(log_error):
        publish_model(tmp_path / "models", _doc(created=__import__("time").time(), error=0.1, log_error=log_error,
                                                naive_log_error=10.0, target="log_unshared_seconds_per_mib"))
        clock.now += 2

    weighted = WeightedScorer()
    publish(log_error=0.1)
    # Equal links as far as the model can tell: the weighted scorer decides, exactly.
    equal = cands([0.002, 0.003, 0.004])
    scorer.score("kid", equal)
    assert (scorer.kind, scorer.reason) == ("weighted", "no_separation")
    assert [c.score for c in equal] == [weighted.value(c.features) for c in equal]
    assert max(equal, key=lambda c: c.score).peer_id == "p2"
    assert metric(svc, 'remora_scheduler_scorer_fallbacks_total{reason="no_separation"}') == 1
    # Links the model separates (10x, std of the log 1.33 > 2 x 0.1): the model ranks.
    apart = cands([0.002, 0.05, 0.05])
    scorer.score("kid", apart)
    assert scorer.kind == "learned" and max(apart, key=lambda c: c.score).peer_id == "p0"
    assert [round(c.predicted_cost, 6) for c in apart] == [0.01, 0.1, 0.1]
    # The near parent serving 19 transfers: 0.01 x 20 = 0.2 s/MiB, now the worst of the three.
    busy = cands([0.002, 0.05, 0.05], loads=(19, 0, 0))
    scorer.score("kid", busy)
    assert [round(c.predicted_cost, 6) for c in busy] == [0.2, 0.1, 0.1]
    assert min(busy, key=lambda c: c.score).peer_id == "p0"
    # The same predictions from a model whose own error is larger than their spread: weighted again.
    publish(log_error=1.5)
    again = cands([0.002, 0.05, 0.05])
    scorer.score("kid", again)
    assert (scorer.kind, scorer.reason) == ("weighted", "no_separation")
    assert max(again, key=lambda c: c.score).peer_id == "p2"
    assert metric(svc, 'remora_scheduler_scorer_fallbacks_total{reason="no_separation"}') == 2


def test_the_gates_are_scheduler_options(tmp_path):
    """--model-min-advantage and --model-separation reach the scorer; nonsense is a usage error."""
    from remora.cli import build_parser
    from remora.errors import UsageError
    from remora.plugins.scheduler.cli import config_from_args
    from remora.plugins.scheduler.server import make_scorer

    argv = ["scheduler", "--scorer", "learned", "--model-dir", str(tmp_path), "--model-min-advantage", "0.05",
            "--model-separation", "0.5", "--insecure-plain-mesh"]
    scorer = make_scorer(config_from_args(build_parser(argv).parse_args(argv)))
    assert scorer.separation == 0.5 and scorer.watcher.min_advantage == 0.05
    for bad in (["--model-min-advantage", "1.5"], ["--model-separation", "-1"]):
        args = build_parser(argv).parse_args(argv + bad)
        with pytest.raises(UsageError):
            config_from_args(args)


def test_predictions_closer_than_the_model_error_are_ties_broken_by_the_weighted_score(tmp_path):
    """The model ranks by tiers of its own held-out error: a parent predicted 2x cheaper by a model whose
    log error is 0.8 (a factor 2.2) is a tie, and the weighted score orders the tie; a parent 10x dearer
    stays below whatever its weighted score. With ``tie=0`` the predicted cost alone ranks."""
    from remora.plugins.scheduler.selection import Candidate, Features
    from remora.plugins.scheduler.state import TaskPeer

    clock = Clock()
    publish_model(tmp_path, _doc(created=__import__("time").time(), error=0.1, log_error=0.8, naive_log_error=10.0,
                                 target="log_unshared_seconds_per_mib"))
    rtt, load = FEATURE_NAMES.index("rtt_s"), FEATURE_NAMES.index("parent_load")

    def cands():
        out = []
        # p0: near, idle (0.01 s/MiB); p1: near, one transfer running (0.02); p2, p3: far (0.1).
        # The weighted score prefers p3, then p2 (declared bandwidth), then p1, then p0.
        for i, (r, n, bw) in enumerate([(0.002, 0, 0.1), (0.003, 1, 0.5), (0.05, 0, 0.9), (0.05, 0, 1.0)]):
            raw = [None] * len(FEATURE_NAMES)
            raw[rtt], raw[load] = r, float(n)
            out.append(Candidate(TaskPeer(f"p{i}", 0), Features(0.5, 1.0, bw, 0.5, 0.0, tuple(raw))))
        return out

    def ranking(scorer):
        cs = cands()
        scorer.score("kid", cs)
        assert scorer.kind == "learned"
        return [c.peer_id for c in sorted(cs, key=lambda c: c.score, reverse=True)]

    def make(tie):
        return LearnedScorer(ModelWatcher(tmp_path, clock=clock), separation=0.5, tie=tie)

    assert ranking(make(tie=1.0)) == ["p1", "p0", "p3", "p2"]     # ties: weighted order within each tier
    assert ranking(make(tie=0.0)) == ["p0", "p1", "p3", "p2"]     # the cost alone (exact ties: weighted)
    weighted = cands()
    WeightedScorer().score("kid", weighted)
    assert max(weighted, key=lambda c: c.score).peer_id == "p3"   # the model still keeps the far ones last
