#!/usr/bin/env python3
"""Learned parent selection in a discrete-event simulation: learned vs weighted vs bandit vs random.

    python benchmarks/bench_parent_learning.py                       # 50, 200, 1000 nodes; ~10 min
    python benchmarks/bench_parent_learning.py --nodes 50 --seeds 2  # quick

Like benchmarks/bench_parent_selection.py this drives the REAL scheduler (SchedulerService.schedule, the
filters, the scorers, the bandwidth estimator, the history recorder, the model loader) with a simulated
clock; only the network is modelled. What is new here is the world:

* every host has an *uplink class*: ``heterogeneous``: 10 Mbit/s (40 %), 100 Mbit/s (40 %), 1 Gbit/s
  (20 %); ``homogeneous``: all 100 Mbit/s. Downlinks are 1 Gbit/s (edge nodes with thin uplinks);
* ``heterogeneous`` links *drift*: each host is congested (uplink x 0.1, cross traffic) in episodes that
  start every ~20 s and last ~5 s on average, drawn per seed before the run (same for every strategy);
* half the hosts declare their nominal uplink, the others nothing; RTTs (1-20 ms per host, a pair's is
  the sum) are probed;
* ``nodes`` hosts: 5 % hold the blob at the start, the others arrive over ~10 s and fetch 32 pieces of
  1 MiB, 4 at a time, from the parents they are given; a piece takes ``rtt + size / rate`` with the rate
  ``min(uplink now / uploads of the parent, downlink / downloads of the child)`` fixed at its start,
  times lognormal noise (sigma 0.25). Children serve what they have.

The learned scorer's model is trained, before any measured run, on history that the simulation's own
``weighted`` and ``bandit`` runs wrote on *other seeds* (``--train-seeds``, at ``--train-nodes`` nodes (50 and 200),
both link settings), with ``remora trainer``'s code (plugins/trainer/train.py). The table gives the
completion time per child (mean, p95) over the test seeds, the ratio against weighted, and writes the same
as JSON beside this file (bench_parent_learning.json).
"""
from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remora.plugins.scheduler.history import HistoryRecorder, LocalHistoryStore
from remora.plugins.scheduler.selection import RandomScorer, SelectionConfig
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerService
from remora.plugins.scheduler.state import Host

TASK = "sha256:" + "1e" * 32
MBIT = 125_000                      # bytes/s
CLASSES = {"heterogeneous": ((10 * MBIT, 0.4), (100 * MBIT, 0.4), (1000 * MBIT, 0.2)),
           "homogeneous": ((100 * MBIT, 1.0),)}
STRATEGIES = ("random", "weighted", "bandit", "learned")


@dataclass
class Params:
    nodes: int = 200
    pieces: int = 32
    piece_size: int = 1 << 20
    concurrency: int = 4
    reschedule: int = 8
    arrival_window: float = 10.0
    downlink: float = 1000 * MBIT
    congestion_every: float = 20.0
    congestion_for: float = 5.0
    congestion_factor: float = 0.1


@dataclass
class SimHost:
    peer_id: str
    uplink: float
    rtt: float
    congested: list[tuple[float, float]] = field(default_factory=list)
    uploads: int = 0
    downloads: int = 0

    def rate(self, t: float, factor: float) -> float:
        for start, end in self.congested:
            if start <= t < end:
                return self.uplink * factor
        return self.uplink


@dataclass
class Child:
    host: SimHost
    arrived: float
    missing: set[int]
    parents: list[str] = field(default_factory=list)
    outstanding: dict[str, int] = field(default_factory=dict)
    in_progress: set[int] = field(default_factory=set)
    since_schedule: int = 0
    waiting: bool = False
    done_at: float | None = None


class Simulation:
    def __init__(self, strategy: str, links: str, seed: int, p: Params, model_dir: str | None = None,
                 history_dir: str | None = None, time_offset: float = 0.0):
        self.p = p
        self.now = 0.0
        world = random.Random(f"{links}-{seed}")       # hosts, congestion, arrivals: identical per strategy
        self.noise = random.Random(seed * 7919 + 1)
        config = SchedulerConfig(peer_ttl=1e9, scorer=strategy if strategy != "random" else "weighted",
                                 random_seed=seed, retry_after_ms=100, max_schedule_failures=10 ** 6,
                                 model_dir=model_dir, model_max_age=1e12,
                                 selection=SelectionConfig(parent_limit=4))
        scorer = RandomScorer(random.Random(seed + 1)) if strategy == "random" else None
        self.svc = SchedulerService(config, clock=lambda: self.now, scorer=scorer)
        self.state = self.svc.state
        self.state.bandwidth.normalized = False     # the simulated costs are raw fetch times
        self.history = None
        if history_dir:
            store = LocalHistoryStore(history_dir, rows_per_file=200_000, max_files=50)
            self.history = HistoryRecorder(store, strategy, clock=lambda: self.now,
                                           wall=lambda: time_offset + self.now).attach(self.state, self.svc.selector)
        self.hosts: dict[str, SimHost] = {}
        self.children: dict[str, Child] = {}
        self.events: list = []
        self.seq = 0
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
            self.hosts[host.peer_id] = host
            if i < n_origins:
                self._register(host, declared)
                self.state.join_task(host.peer_id, TASK, p.pieces * p.piece_size, p.piece_size)
                self.state.announce(host.peer_id, TASK, range(p.pieces), (), done=True)
                if i == 0:
                    task = self.state.tasks[TASK]
                    self.state.learn_metadata(task, host.peer_id, task.content_length, task.piece_size,
                                              ["sha256:" + "0" * 64] * p.pieces)
            else:
                self.push(arrivals[i - n_origins], "arrive", host.peer_id, declared)

    def _register(self, host: SimHost, declared: int) -> None:
        self.state.register_peer(Host(peer_id=host.peer_id, host_id=host.peer_id, upload_port=1,
                                      upload_bandwidth=declared))
        for other in self.state.peers:      # probes: RTT both ways with every registered host
            if other != host.peer_id:
                rtt = host.rtt + self.hosts[other].rtt
                self.state.record_probe(host.peer_id, other, rtt, True)
                self.state.record_probe(other, host.peer_id, rtt, True)

    def push(self, t: float, kind: str, *data) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    def arrive(self, peer_id: str, declared: int) -> None:
        host = self.hosts[peer_id]
        self._register(host, declared)
        self.state.join_task(peer_id, TASK)
        child = self.children[peer_id] = Child(host, self.now, set(range(self.p.pieces)))
        self.schedule(child)

    def schedule(self, child: Child) -> None:
        parents, b2s, retry, _ = self.svc.schedule(self.state.tasks[TASK], child.host.peer_id)
        assert not b2s, "origins hold the blob: nobody should be sent to the source"
        child.since_schedule = 0
        child.parents = [p.host.peer_id for p in parents]
        if not child.parents:
            child.waiting = True
            self.push(self.now + retry / 1000, "retry", child.host.peer_id)
            return
        self.fill(child)

    def has(self, parent_id: str, piece: int) -> bool:
        tp = self.state.tasks[TASK].peers.get(parent_id)
        return tp is not None and (tp.done or piece in tp.finished)

    def fill(self, child: Child) -> None:
        p = self.p
        while len(child.in_progress) < p.concurrency:
            choice = None
            for piece in sorted(child.missing - child.in_progress):
                holders = [pid for pid in child.parents if self.has(pid, piece)]
                if holders:
                    choice = (piece, min(holders, key=lambda pid: child.outstanding.get(pid, 0)))
                    break
            if choice is None:
                if not child.in_progress:
                    child.waiting = True
                    self.push(self.now + 0.1, "retry", child.host.peer_id)
                return
            piece, parent_id = choice
            parent = self.hosts[parent_id]
            parent.uploads += 1
            child.host.downloads += 1
            child.outstanding[parent_id] = child.outstanding.get(parent_id, 0) + 1
            child.in_progress.add(piece)
            rate = min(parent.rate(self.now, p.congestion_factor) / parent.uploads, p.downlink / child.host.downloads)
            cost = (parent.rtt + child.host.rtt + p.piece_size / rate) * self.noise.lognormvariate(0, 0.25)
            self.push(self.now + cost, "piece", child.host.peer_id, parent_id, piece, cost)

    def piece_done(self, child_id: str, parent_id: str, piece: int, cost: float) -> None:
        child = self.children[child_id]
        self.hosts[parent_id].uploads -= 1
        child.host.downloads -= 1
        child.outstanding[parent_id] -= 1
        child.in_progress.discard(piece)
        child.missing.discard(piece)
        self.svc.piece_result(TASK, child_id, parent_id, piece, True, cost, self.p.piece_size)
        done = not child.missing
        self.state.announce(child_id, TASK, [piece], (), done=done)
        if done:
            child.done_at = self.now
            return
        child.since_schedule += 1
        if child.since_schedule >= self.p.reschedule:
            self.schedule(child)
        else:
            self.fill(child)

    def run(self) -> dict:
        while self.events:
            self.now, _, kind, data = heapq.heappop(self.events)
            if kind == "arrive":
                self.arrive(*data)
            elif kind == "piece":
                self.piece_done(*data)
            elif kind == "retry":
                child = self.children[data[0]]
                if child.waiting and child.done_at is None:
                    child.waiting = False
                    self.schedule(child)
        assert all(c.done_at is not None for c in self.children.values())
        if self.history is not None:
            self.history.sink.close()
        scorer = self.svc.scorer
        return {"child": [c.done_at - c.arrived for c in self.children.values()],
                "kind": getattr(scorer, "kind", scorer.name)}


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, action="append", help="hosts per run (repeatable; default 50 200 1000)")
    ap.add_argument("--seeds", type=int, default=3, help="test seeds per row (1000-node rows use 1)")
    ap.add_argument("--train-seeds", type=int, default=3)
    ap.add_argument("--train-nodes", type=int, action="append", help="repeatable (default: 50 and 200)")
    ap.add_argument("--links", choices=tuple(CLASSES), action="append")
    ap.add_argument("--model-dir", help="use the models there instead of training (they must exist)")
    ap.add_argument("--threads", type=int, default=1, help="trainer threads (default 1: see bench_trainer.py)")
    ap.add_argument("--json", default=str(Path(__file__).with_suffix(".json")), help="'' to skip")
    args = ap.parse_args(argv)
    sizes = args.nodes or [50, 200, 1000]
    out: dict = {"params": Params().__dict__, "sizes": sizes, "rows": []}
    with tempfile.TemporaryDirectory(prefix="remora-bench-learn-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from remora.plugins.trainer.train import TrainConfig, train_and_publish

            hist = f"{tmp}/history"
            model_dir = f"{tmp}/models"
            t0 = time.perf_counter()
            # Training seeds are far from the test seeds (0..): the model never saw a test world.
            make_training_history(hist, args.train_nodes or [50, 200], [10_000 + s for s in range(args.train_seeds)], log=print)
            gen_s = time.perf_counter() - t0
            path, meta = train_and_publish(hist, model_dir, TrainConfig(min_rows=50, threads=args.threads))
            v = meta["validation"]
            print(f"model {path}: {meta['training_rows']} training rows ({gen_s:.0f} s to simulate), "
                  f"fit {meta['trainer']['fit_s']:.1f} s; held-out median relative error "
                  f"{v['median_rel_error']:.3f} (naive {v['naive']['median_rel_error']:.3f}), "
                  f"MAE {v['mae_s_per_mib'] * 1000:.0f} ms/MiB (naive {v['naive']['mae_s_per_mib'] * 1000:.0f})")
            out["model"] = {k: meta[k] for k in ("training_rows", "validation", "trainer")}
        print(f"\n{'links':<14} {'nodes':>5} {'strategy':<9} {'mean':>7} {'p95':>7} | {'mean/w':>7} {'p95/w':>7}"
              f"   (child completion seconds, {args.seeds} seed(s), 1 at 1000 nodes)")
        for links in args.links or tuple(CLASSES):
            for n in sizes:
                seeds = range(1 if n >= 1000 else args.seeds)
                rows = {}
                for strategy in STRATEGIES:
                    children, kinds, t0 = [], set(), time.perf_counter()
                    for seed in seeds:
                        r = Simulation(strategy, links, seed, Params(nodes=n),
                                       model_dir=model_dir if strategy == "learned" else None).run()
                        children += r["child"]
                        kinds.add(r["kind"])
                    rows[strategy] = {"mean": statistics.fmean(children), "p95": p95(children),
                                      "children": len(children), "scored_by": sorted(kinds),
                                      "sim_s": round(time.perf_counter() - t0, 1)}
                base = rows["weighted"]
                for strategy, row in rows.items():
                    row["mean_vs_weighted"] = row["mean"] / base["mean"]
                    row["p95_vs_weighted"] = row["p95"] / base["p95"]
                    print(f"{links:<14} {n:>5} {strategy:<9} {row['mean']:>7.2f} {row['p95']:>7.2f} | "
                          f"{row['mean_vs_weighted']:>7.2f} {row['p95_vs_weighted']:>7.2f}"
                          + ("" if strategy != "learned" or row["scored_by"] == ["learned"]
                             else f"   (scored by {row['scored_by']})"))
                    out["rows"].append(dict(row, links=links, nodes=n, strategy=strategy, seeds=len(seeds)))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
