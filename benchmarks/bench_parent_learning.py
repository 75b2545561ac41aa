#!/usr/bin/env python3
"""Learned parent selection in a discrete-event simulation: learned vs weighted vs bandit vs random.

    python benchmarks/bench_parent_learning.py                       # 50, 200, 1000 nodes; ~1 h on a busy 2-core box
    python benchmarks/bench_parent_learning.py --nodes 50 --seeds 2  # quick

The simulator is benchmarks/parent_sim.py (shared with bench_parent_selection.py): it drives the REAL
scheduler (SchedulerService.schedule, the filters, the scorers, the bandwidth estimator, the history
recorder, the model loader) with a simulated clock; only the network is modelled. The world here:

* every host has an *uplink class*: ``heterogeneous``: 10 Mbit/s (40 %), 100 Mbit/s (40 %), 1 Gbit/s
  (20 %); ``homogeneous``: all 100 Mbit/s. Downlinks are 1 Gbit/s (edge nodes with thin uplinks);
* ``heterogeneous`` links *drift*: each host is congested (uplink x 0.1, cross traffic) in episodes that
  start every ~20 s and last ~5 s on average, drawn per seed before the run (same for every strategy);
* half the hosts declare their nominal uplink, the others nothing; RTTs (1-20 ms per host, a pair's is
  the sum) are probed;
* ``nodes`` hosts: 5 % hold the blob at the start, the others arrive over ~10 s and fetch 32 pieces of
  1 MiB, 4 at a time, from the parents they are given; a piece takes ``rtt`` then ``size`` bytes at the
  fluid rate ``min(uplink now / uploads of the parent, downlink / downloads of the child)``, recomputed
  whenever either changes (parent_sim.py), both scaled by lognormal noise (sigma 0.25). Children serve
  what they have and list their transfers in flight in their announcements (the scheduler's
  ``parent_load``).

The learned scorer's model is trained, before any measured run, on history that the simulation's own
``weighted`` and ``bandit`` runs wrote on *other seeds* (``--train-seeds``, at ``--train-nodes`` nodes (50 and 200),
both link settings), with ``remora trainer``'s code (plugins/trainer/train.py). The table gives, per
setting, size and scorer, the completion time per child (mean and p95 over the children of all test
seeds) and the p95 ratio against weighted *per seed* (median, min and max over the seeds: the runs are
paired, same world) and pooled, the seeds where it beat weighted ("better"), the pieces the hosts holding
the blob at the start served per run ("origin": herding onto them shows there) and the share of decisions
the model ranked. ``weighted-2`` is the noise floor (below). ``--strategies`` runs a subset.
``--ablation`` trains one model per left-out feature group (RTT probes, inferred bandwidth,
declared/measured bandwidth, concurrency — its features and the load factor —, locality) and
prints the same ratios for each. Everything goes to bench_parent_learning.json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import parent_sim
from parent_sim import SimHost, SwarmParams, p95

from remora.plugins.scheduler.history import HistoryRecorder, LocalHistoryStore
from remora.plugins.scheduler.selection import RandomScorer, SelectionConfig
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerService

TASK = "sha256:" + "1e" * 32
MBIT = 125_000                      # bytes/s
CLASSES = {"heterogeneous": ((10 * MBIT, 0.4), (100 * MBIT, 0.4), (1000 * MBIT, 0.2)),
           "homogeneous": ((100 * MBIT, 1.0),)}
#: "weighted-2" is the weighted scorer again on the same world (hosts, congestion, arrivals) with another
#: draw of the piece-time noise and another tie-break seed in the selector: what the learned scorer also
#: changes, by choosing differently, without being any better. Its ratios to weighted are the noise floor
#: of a row (at 50 nodes a different draw alone moves a seed's p95 by tens of percent).
STRATEGIES = ("random", "weighted", "weighted-2", "bandit", "learned")
#: Feature groups left out, one at a time, by --ablation (plugins/scheduler/selection.FEATURE_NAMES).
ABLATION = {
    "rtt probes": ("rtt_s",),
    "inferred bandwidth": ("pair_goodput", "host_capacity", "expected_goodput", "pair_samples", "estimate_age_s"),
    "declared/measured bw": ("declared_bw", "measured_bw"),
    "concurrency": ("parent_load", "parent_slots", "child_parents", "expected_goodput"),   # + the load factor
    "locality": ("locality",),
}


@dataclass
class Params(SwarmParams):
    nodes: int = 200
    arrival_window: float = 10.0
    downlink: float = 1000 * MBIT
    congestion_every: float = 20.0
    congestion_for: float = 5.0
    congestion_factor: float = 0.1


class Simulation(parent_sim.Simulation):
    """Uplink classes, congestion episodes, thin uplinks and 1 Gbit/s downlinks (module doc)."""

    def __init__(self, strategy: str, links: str, seed: int, p: Params, model_dir: str | None = None,
                 history_dir: str | None = None, time_offset: float = 0.0):
        self.p = p
        world = random.Random(f"{links}-{seed}")       # hosts, congestion, arrivals: identical per strategy
        config = SchedulerConfig(peer_ttl=1e9, scorer=strategy if strategy != "random" else "weighted",
                                 random_seed=seed, retry_after_ms=100, max_schedule_failures=10 ** 6,
                                 model_dir=model_dir, model_max_age=1e12,
                                 selection=SelectionConfig(parent_limit=4))
        scorer = RandomScorer(random.Random(seed + 1)) if strategy == "random" else None
        svc = SchedulerService(config, clock=lambda: self.now, scorer=scorer)
        super().__init__(svc, TASK, p, noise=random.Random(seed * 7919 + 1))
        self.state.bandwidth.normalized = False     # the simulated costs are raw fetch times
        self.history = None
        if history_dir:
            store = LocalHistoryStore(history_dir, rows_per_file=200_000, max_files=50)
            self.history = HistoryRecorder(store, strategy, clock=lambda: self.now,
                                           wall=lambda: time_offset + self.now).attach(self.state, self.svc.selector)
        classes = CLASSES[links]
        n_origins = max(2, p.nodes // 20)
        arrivals = sorted(world.uniform(0, p.arrival_window) for _ in range(p.nodes - n_origins))
        horizon = p.arrival_window + 300.0
        for i in range(p.nodes):
            r, acc, uplink = world.random(), 0.0, classes[-1][0]
            for rate, share in classes:
                acc += share
                if r < acc:
                    uplink = rate
                    break
            host = SimHost(f"{'origin' if i < n_origins else 'child'}{i}", uplink, world.uniform(0.001, 0.02))
            if links == "heterogeneous":
                t = world.expovariate(1 / p.congestion_every)
                while t < horizon:
                    length = world.expovariate(1 / p.congestion_for)
                    host.congested.append((t, t + length))
                    t += length + world.expovariate(1 / p.congestion_every)
            declared = int(uplink) if world.random() < 0.5 else 0
            if i < n_origins:
                self.hold_blob(host, declared)
                self._probe(host)
            else:
                self.push(arrivals[i - n_origins], "arrive", host, declared)

    def _probe(self, host: SimHost) -> None:
        for other in self.state.peers:      # probes: RTT both ways with every registered host
            if other != host.peer_id:
                rtt = host.rtt + self.hosts[other].rtt
                self.state.record_probe(host.peer_id, other, rtt, True)
                self.state.record_probe(other, host.peer_id, rtt, True)

    def arrive(self, host: SimHost, declared: int) -> None:
        self.register(host, declared)
        self._probe(host)
        self.join(host)

    def rate(self, parent: SimHost, child: SimHost) -> float:
        p = self.p
        return min(parent.rate(self.now, p.congestion_factor) / parent.uploads, p.downlink / child.downloads)

    def run(self) -> dict:
        out = super().run()
        if self.history is not None:
            self.history.sink.close()
        scorer = self.svc.scorer
        out["kind"] = getattr(scorer, "kind", scorer.name)
        out["origin_pieces"] = sum(n for pid, n in self.served.items() if pid.startswith("origin"))
        return out


def make_training_history(history_dir: str, sizes: list[int], seeds: list[int], log=print) -> None:
    """History from weighted and bandit runs on both link settings; runs are stamped one after the other
    (the trainer's held-out share is the newest runs), sizes interleaved so every size is in both parts."""
    offset = 0.0
    for seed in seeds:
        for links in CLASSES:
            for strategy in ("weighted", "bandit"):
                for nodes in sizes:
                    Simulation(strategy, links, seed, Params(nodes=nodes), history_dir=history_dir,
                               time_offset=offset).run()
                    offset += 1e5
                    log(f"  history: {links} {strategy} {nodes} nodes seed {seed} done")


def run_row(links: str, n: int, seeds: range, strategies, model_dir: str | None) -> dict:
    """Every strategy on the same seeds; ratios against weighted, per seed (paired) and pooled."""
    children, per_seed, kinds, shares, sim_s, origin = {}, {}, {}, {}, {}, {}
    for strategy in strategies:
        t0 = time.perf_counter()
        children[strategy], per_seed[strategy], kinds[strategy], shares[strategy] = [], [], set(), []
        origin[strategy] = []
        for seed in seeds:
            sim = Simulation(strategy.split("-")[0], links, seed, Params(nodes=n),
                             model_dir=model_dir if strategy == "learned" else None)
            if strategy == "weighted-2":
                sim.svc.selector.rng = random.Random(seed + 1000)
                sim.noise = random.Random(seed * 7919 + 2)
            counts = _count_model_decisions(sim) if strategy == "learned" else None
            r = sim.run()
            children[strategy] += r["child"]
            per_seed[strategy].append(p95(r["child"]))
            kinds[strategy].add(r["kind"])
            origin[strategy].append(r["origin_pieces"])
            if counts is not None:
                shares[strategy].append(counts["learned"] / max(1, sum(counts.values())))
        sim_s[strategy] = round(time.perf_counter() - t0, 1)
    base, base_seed = p95(children["weighted"]), per_seed["weighted"]
    rows = {}
    for strategy in strategies:
        ratios = [a / b for a, b in zip(per_seed[strategy], base_seed)]
        rows[strategy] = {"mean": statistics.fmean(children[strategy]), "p95": p95(children[strategy]),
                          "p95_per_seed": per_seed[strategy], "ratio_per_seed": ratios,
                          "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                          "ratio_max": max(ratios), "ratio_pooled": p95(children[strategy]) / base,
                          "children": len(children[strategy]), "seeds": len(seeds),
                          "wins": sum(1 for r in ratios if r < 1.0), "losses": sum(1 for r in ratios if r > 1.0),
                          "origin_pieces_mean": statistics.fmean(origin[strategy]),
                          "scored_by": sorted(kinds[strategy]), "sim_s": sim_s[strategy]}
        if shares[strategy]:
            rows[strategy]["model_decision_share"] = statistics.fmean(shares[strategy])
    return rows


def _count_model_decisions(sim: Simulation) -> dict:
    """Decisions the model ranked vs left to the weighted scorer (fallbacks, no_separation)."""
    counts = {"learned": 0, "weighted": 0}
    scorer = sim.svc.scorer
    if hasattr(scorer, "_set_kind"):
        set_kind = scorer._set_kind

        def counting(kind, reason):
            counts[kind] = counts.get(kind, 0) + 1
            set_kind(kind, reason)
        scorer._set_kind = counting
    return counts


HEADER = (f"{'links':<14} {'nodes':>5} {'scorer':<10} {'mean':>7} {'p95':>7} | {'p95/w median':>12} "
          f"{'[min - max]':>13} {'pooled':>6} {'better':>6} {'origin':>6}  model")


def print_row(links: str, n: int, label: str, row: dict, width: int = 10) -> None:
    share = row.get("model_decision_share")
    print(f"{links:<14} {n:>5} {label:<{width}} {row['mean']:>7.2f} {row['p95']:>7.2f} | {row['ratio_median']:>12.2f} "
          f"[{row['ratio_min']:>5.2f} - {row['ratio_max']:>5.2f}] {row['ratio_pooled']:>6.2f} "
          f"{row['wins']:>2}/{row['seeds']:<3} {row['origin_pieces_mean']:>6.0f}"
          + (f"  {share:.0%}" if share is not None else ""), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, action="append", help="hosts per run (repeatable; default 50 200 1000)")
    ap.add_argument("--seeds", type=int, default=8, help="test seeds per row (default 8)")
    ap.add_argument("--seeds-1000", type=int, default=3, help="test seeds at >= 1000 nodes (default 3)")
    ap.add_argument("--train-seeds", type=int, default=3)
    ap.add_argument("--train-nodes", type=int, action="append", help="repeatable (default: 50 and 200)")
    ap.add_argument("--links", choices=tuple(CLASSES), action="append")
    ap.add_argument("--model-dir", help="use the models there instead of training (they must exist)")
    ap.add_argument("--history-dir", help="train on the history there instead of simulating it first")
    ap.add_argument("--threads", type=int, default=1, help="trainer threads (default 1: see bench_trainer.py)")
    ap.add_argument("--ablation", action="store_true", help="also the feature-group ablation (--ablation-nodes)")
    ap.add_argument("--ablation-nodes", type=int, default=200)
    ap.add_argument("--ablation-seeds", type=int, default=3)
    ap.add_argument("--strategies", help="comma-separated subset of " + ",".join(STRATEGIES)
                    + " (weighted is always run: the ratios are against it)")
    ap.add_argument("--json", default=str(Path(__file__).with_suffix(".json")), help="'' to skip")
    args = ap.parse_args(argv)
    sizes = args.nodes or [50, 200, 1000]
    strategies = STRATEGIES
    if args.strategies:
        wanted = set(args.strategies.split(",")) | {"weighted"}
        if wanted - set(STRATEGIES):
            ap.error(f"unknown strategies {sorted(wanted - set(STRATEGIES))}")
        strategies = tuple(s for s in STRATEGIES if s in wanted)
    out: dict = {"params": Params().__dict__, "sizes": sizes, "rows": [], "ablation": []}
    with tempfile.TemporaryDirectory(prefix="remora-bench-learn-") as tmp:
        model_dir = args.model_dir
        hist = args.history_dir or f"{tmp}/history"
        if model_dir is None:
            from remora.plugins.trainer.train import TrainConfig, train_and_publish

            model_dir = f"{tmp}/models"
            t0 = time.perf_counter()
            # Training seeds are far from the test seeds (0..): the model never saw a test world.
            if not args.history_dir:
                make_training_history(hist, args.train_nodes or [50, 200],
                                      [10_000 + s for s in range(args.train_seeds)], log=lambda *a: None)
            gen_s = time.perf_counter() - t0
            path, meta = train_and_publish(hist, model_dir, TrainConfig(min_rows=50, threads=args.threads))
            v = meta["validation"]
            print(f"model {path}: {meta['training_rows']} training rows ({gen_s:.0f} s to simulate), "
                  f"fit {meta['trainer']['fit_s']:.1f} s; held-out median abs log error "
                  f"{v['median_abs_log_error']:.3f} (naive {v['naive']['median_abs_log_error']:.3f}), "
                  f"median relative error {v['median_rel_error']:.3f} (naive {v['naive']['median_rel_error']:.3f})")
            out["model"] = {k: meta[k] for k in ("training_rows", "validation", "trainer")}
        print("\nchild completion seconds over all seeds; p95/w: learned (etc.) p95 / weighted p95 of the same "
              "seed (median [min - max] over seeds) and pooled; model: decisions the model ranked")
        print(HEADER)
        for links in args.links or tuple(CLASSES):
            for n in sizes:
                seeds = range(args.seeds_1000 if n >= 1000 else args.seeds)
                rows = run_row(links, n, seeds, strategies, model_dir)
                for strategy, row in rows.items():
                    print_row(links, n, strategy, row)
                    out["rows"].append(dict(row, links=links, nodes=n, strategy=strategy))
        if args.ablation:
            out["ablation"] = ablation(args, hist, f"{tmp}/ablation")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def ablation(args, hist: str, tmp: str) -> list[dict]:
    """One model per feature group left out (same history), learned vs weighted on the same seeds."""
    from remora.plugins.trainer.train import TrainConfig, train_and_publish

    if not Path(hist).is_dir():
        make_training_history(hist, args.train_nodes or [50, 200], [10_000 + s for s in range(args.train_seeds)],
                              log=lambda *a: None)
    n, seeds = args.ablation_nodes, range(args.ablation_seeds)
    print(f"\nablation at {n} nodes, {len(seeds)} seeds: learned p95 / weighted p95 with one feature group "
          "left out of the model")
    print(HEADER.replace("scorer    ", f"{'left out of the model':<21}"))
    variants = {"(none)": TrainConfig(min_rows=50, threads=args.threads)}
    for name, drop in ABLATION.items():
        variants[name] = TrainConfig(min_rows=50, threads=args.threads, drop=drop,
                                     unshared=name != "concurrency")
    out = []
    for name, config in variants.items():
        model_dir = f"{tmp}/{len(out)}"
        _, meta = train_and_publish(hist, model_dir, config)
        for links in args.links or tuple(CLASSES):
            rows = run_row(links, n, seeds, ("weighted", "learned"), model_dir)
            print_row(links, n, name, rows["learned"], width=21)
            out.append(dict(rows["learned"], links=links, nodes=n, left_out=name, dropped=list(config.drop),
                            unshared=config.unshared,
                            validation_log_error=meta["validation"]["median_abs_log_error"]))
    return out


if __name__ == "__main__":
    sys.exit(main())
