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
    assert bench.main(["--nodes", "24", "--seeds", "1", "--train-seeds", "1", "--train-nodes", "24",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["links"], r["strategy"]): r for r in result["rows"]}
    assert set(rows) == {(links, s) for links in ("heterogeneous", "homogeneous")
                         for s in ("random", "weighted", "bandit", "learned")}
    # The learned runs were scored by the trained model, not by the fallback.
    assert rows[("heterogeneous", "learned")]["scored_by"] == ["learned"]
    assert result["model"]["training_rows"] > 0
    assert "learned" in capsys.readouterr().out
