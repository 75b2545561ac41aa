#!/usr/bin/env python3
"""How long `remora trainer` takes on a big history, and what one learned decision costs.

    python benchmarks/bench_trainer.py                   # 1,000,000 rows, threads 1 and 2
    python benchmarks/bench_trainer.py --rows 200000 --threads 2

1. Writes ``--rows`` synthetic history rows (the real schema, plugins/scheduler/history.py: 15 features,
   a third of them unknown, the cost following the goodput features with lognormal noise) into rotating
   files, then trains with plugins/trainer/train.py (load + fit + validate + publish), once per
   ``--threads`` value, printing wall and CPU seconds of each phase. Target: < 60 s on 2 cores.
2. Times the scheduler side of one GetParents with the learned scorer: the selector's decision over 40
   candidates with the model (features + numpy inference) against the same decision with the weighted
   scorer (the difference is what the model adds; target < 1 ms), best of ``--repeat`` runs, CPU time
   (the machine may be shared: wall time would measure the neighbours).
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from remora.plugins.scheduler.selection import FEATURE_NAMES

N = len(FEATURE_NAMES)


def write_history(directory: Path, rows: int, seed: int = 0, per_file: int = 200_000) -> None:
    """Rows in the store's format, written in bulk (the recorder would take minutes for a million)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    done, index = 0, 1
    while done < rows:
        n = min(per_file, rows - done)
        X = rng.lognormal(15, 1.5, size=(n, N))
        X[:, 5] = rng.uniform(0.001, 0.08, n)                    # rtt_s
        X[:, 6] = rng.integers(0, 8, n)                          # parent_load
        known = rng.random((n, N)) > 0.33
        cost = (1 << 20) / X[:, 2] * (X[:, 6] + 1) ** 0.5 + X[:, 5]
        cost *= rng.lognormal(0, 0.25, n)
        with open(directory / f"history-{index:06d}.ndjson", "w") as fh:
            for i in range(n):
                f = ",".join(f"{X[i, j]:.6g}" if known[i, j] else "null" for j in range(N))
                fh.write(f'{{"v":1,"t":{done + i},"parent":"p{i % 997}","child":"c{i % 991}","scorer":"weighted",'
                         f'"size":1048576,"cost_s":{cost[i]:.6g},"age_s":0.1,"f":[{f}]}}\n')
        done += n
        index += 1


def bench_training(rows: int, threads: list[int]) -> None:
    from remora.plugins.trainer.train import TrainConfig, train_and_publish

    with tempfile.TemporaryDirectory(prefix="remora-bench-trainer-") as tmp:
        t0 = time.perf_counter()
        write_history(Path(tmp) / "h", rows)
        print(f"wrote {rows:,} history rows in {time.perf_counter() - t0:.1f} s")
        for n in threads:
            w0, c0 = time.perf_counter(), time.process_time()
            path, meta = train_and_publish(f"{tmp}/h", f"{tmp}/m", TrainConfig(max_rows=rows, threads=n))
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            tr, v = meta["trainer"], meta["validation"]
            print(f"threads={n}: total {wall:.1f} s wall / {cpu:.1f} s CPU (load {tr['load_s']:.1f} s, fit "
                  f"{tr['fit_s']:.1f} s), {meta['training_rows']:,} training rows, held-out median relative "
                  f"error {v['median_rel_error']:.3f} (naive {v['naive']['median_rel_error']:.3f}) -> "
                  f"{Path(path).name}")


def bench_inference(repeat: int) -> None:
    from remora.plugins.scheduler.learned import LearnedScorer, ModelWatcher
    from remora.plugins.scheduler.selection import ParentSelector, WeightedScorer
    from remora.plugins.scheduler.state import Host, SchedulerState
    from remora.plugins.trainer.train import TrainConfig, train_and_publish

    with tempfile.TemporaryDirectory(prefix="remora-bench-infer-") as tmp:
        write_history(Path(tmp) / "h", 50_000)
        train_and_publish(f"{tmp}/h", f"{tmp}/m", TrainConfig(threads=1))
        state = SchedulerState()
        task_id = "sha256:" + "ee" * 32
        rng = random.Random(1)
        for i in range(60):
            pid = f"p{i}"
            state.register_peer(Host(peer_id=pid, host_id=pid, upload_port=1, upload_bandwidth=rng.choice([0, 10**7])))
            state.join_task(pid, task_id, 64 << 20, 1 << 20)
            state.announce(pid, task_id, range(64), (), done=True)
            state.bandwidth.observe(pid, "child", 1 << 20, rng.uniform(0.01, 1))
        state.register_peer(Host(peer_id="child", host_id="child", upload_port=1))
        state.join_task("child", task_id)
        for i in range(0, 60, 2):
            state.record_probe("child", f"p{i}", rng.uniform(0.001, 0.05), True)
        task = state.tasks[task_id]
        # separation 0: the model ranks every decision (the full path; a no_separation fallback would
        # predict too, then score with the weighted scorer: no dearer)
        learned = LearnedScorer(ModelWatcher(f"{tmp}/m"), separation=0.0)
        results = {}
        for name, scorer in (("weighted", WeightedScorer()), ("learned", learned)):
            sel = ParentSelector(state, scorer, rng=random.Random(2))
            sel.select(task, "child")
            best = math.inf
            for _ in range(repeat):
                c0 = time.process_time()
                for _ in range(50):
                    sel.select(task, "child")
                best = min(best, (time.process_time() - c0) / 50)
            results[name] = best
        assert learned.kind == "learned"
        m = learned.watcher.model
        print(f"GetParents decision over 40 candidates ({m.feature.shape[0]} trees, depth {m.depth}): weighted "
              f"{results['weighted'] * 1e3:.3f} ms, learned {results['learned'] * 1e3:.3f} ms CPU: the model adds "
              f"{(results['learned'] - results['weighted']) * 1e3:.3f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, action="append", help="repeatable (default: 1 and 2)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args(argv)
    bench_inference(args.repeat)
    if not args.skip_training:
        bench_training(args.rows, args.threads or [1, 2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
