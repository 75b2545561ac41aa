"""Keep benchmarks/bench_parent_learning.py working end to end (tiny run; its figures are not asserted):
training history from weighted/bandit runs, `remora trainer`'s code, every strategy, the JSON beside it."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def test_parent_learning_benchmark_runs(tmp_path, monkeypatch, capsys):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_parent_learning.py"
    spec = importlib.util.spec_from_file_location("bench_parent_learning", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)   # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "out.json"
    assert bench.main(["--nodes", "24", "--seeds", "2", "--train-seeds", "1", "--train-nodes", "24",
                       "--ablation", "--ablation-nodes", "24", "--ablation-seeds", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["links"], r["strategy"]): r for r in result["rows"]}
    assert set(rows) == {(links, s) for links in ("heterogeneous", "homogeneous")
                         for s in ("random", "weighted", "weighted-2", "bandit", "learned")}
    # On heterogeneous links the trained model ranked most decisions (it separates 10 Mbit/s from
    # 1 Gbit/s parents); on equal links it leaves most of them to the weighted scorer (no_separation).
    het, hom = rows[("heterogeneous", "learned")], rows[("homogeneous", "learned")]
    assert het["model_decision_share"] > 0.5 > hom["model_decision_share"]
    assert len(het["ratio_per_seed"]) == 2 and het["ratio_min"] <= het["ratio_median"] <= het["ratio_max"]
    assert rows[("heterogeneous", "weighted")]["ratio_per_seed"] == [1.0, 1.0]
    assert result["model"]["training_rows"] > 0
    # The ablation: one row per feature group left out (and none), per link setting.
    left_out = {(r["links"], r["left_out"]) for r in result["ablation"]}
    assert left_out == {(links, name) for links in ("heterogeneous", "homogeneous")
                        for name in ("(none)", *bench.ABLATION)}
    assert "learned" in capsys.readouterr().out
