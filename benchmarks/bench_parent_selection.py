#!/usr/bin/env python3
"""Parent selection in a discrete-event simulation: weighted score vs UCB bandit vs random.

    python benchmarks/bench_parent_selection.py                 # all scenarios, 5 seeds each
    python benchmarks/bench_parent_selection.py --seeds 2 --children 20

The simulation (benchmarks/parent_sim.py, shared with bench_parent_learning.py) drives the REAL
scheduler code — :class:`SchedulerService.schedule` (seed, filters, blocklist, retry),
:class:`ParentSelector` and the scorers — with a simulated clock; only the network is modelled. Every
strategy sees the same peers, arrivals and noise (same seed), so the ratios against random are paired
comparisons within one run.

Model:
* ``origins`` peers already hold the whole blob, with heterogeneous hidden upload bandwidths and RTTs;
* ``children`` arrive (Poisson) and download ``pieces`` pieces, ``concurrency`` at a time, from the
  parents the scheduler gives them; they re-ask every ``reschedule`` pieces, announce what they finish
  (so they become parents too) and report every piece's time (which feeds measured bandwidth, the slow
  rule and the bandit);
* a piece takes ``rtt(parent, child)`` then ``size`` bytes at ``parent upload bandwidth / uploads in
  progress``, a fluid share recomputed whenever a transfer starts or ends (parent_sim.py), both scaled
  by lognormal noise (sigma 0.25); children download at most ``child_cap`` bytes/s each;
* what the scheduler KNOWS depends on the scenario: ``known`` — every origin declares its bandwidth and
  probes measured RTTs; ``mixed`` — half the origins are unknown and a quarter declare a stale
  bandwidth 10x their real one; ``unknown`` — nothing declared, nothing probed.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import parent_sim
from parent_sim import SimHost, SwarmParams, p95

from remora.plugins.scheduler.selection import RandomScorer, SelectionConfig
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerService

TASK = "sha256:" + "be" * 32
MB = 1_000_000


@dataclass
class Params(SwarmParams):
    origins: int = 12
    children: int = 40
    arrival_mean: float = 0.25
    child_cap: float = 50 * MB


ORIGIN_BW = [100, 60, 40, 25, 15, 10, 8, 5, 3, 2, 1.5, 1]
ORIGIN_RTT = [0.002, 0.030, 0.005, 0.060, 0.001, 0.020, 0.004, 0.080, 0.010, 0.003, 0.050, 0.015]


class Simulation(parent_sim.Simulation):
    """Origins with fixed, heterogeneous uplinks; children capped at ``child_cap`` each (module doc)."""

    def __init__(self, strategy: str, scenario: str, seed: int, p: Params):
        self.p = p
        self.world = random.Random(seed)            # peers, arrivals, noise: identical per strategy
        config = SchedulerConfig(peer_ttl=1e9, scorer="bandit" if strategy == "bandit" else "weighted",
                                 random_seed=seed, retry_after_ms=100, max_schedule_failures=10 ** 6,
                                 selection=SelectionConfig(parent_limit=4))
        scorer = RandomScorer(random.Random(seed + 1)) if strategy == "random" else None
        svc = SchedulerService(config, clock=lambda: self.now, scorer=scorer)
        super().__init__(svc, TASK, p, noise=self.world)
        self._origins(scenario)
        t = 0.0
        for i in range(p.children):
            self.push(t, "arrive", i)
            t += self.world.expovariate(1 / p.arrival_mean)

    def _origins(self, scenario: str) -> None:
        order = list(range(self.p.origins))
        self.world.shuffle(order)
        for n, i in enumerate(order):
            bw = ORIGIN_BW[i % len(ORIGIN_BW)] * MB
            host = SimHost(f"origin{i}", bw, ORIGIN_RTT[i % len(ORIGIN_RTT)])
            known = scenario == "known" or (scenario == "mixed" and n % 2 == 0)
            stale = scenario == "mixed" and n % 4 == 1
            self.hold_blob(host, int(bw) if known else int(bw * 10) if stale else 0)
        self.known_rtt = scenario == "known"
        self.half_known = scenario == "mixed"

    def arrive(self, idx: int) -> None:
        host = SimHost(f"child{idx}", self.world.uniform(5, 50) * MB, self.world.uniform(0.001, 0.02))
        self.register(host)
        for n, origin in enumerate(h for h in self.hosts.values() if h.peer_id.startswith("origin")):
            if self.known_rtt or (self.half_known and self.state.peers[origin.peer_id].host.upload_bandwidth
                                  and n % 2 == 0):
                self.state.record_probe(host.peer_id, origin.peer_id, origin.rtt + host.rtt, True)
        self.join(host)

    def rate(self, parent: SimHost, child: SimHost) -> float:
        return min(parent.uplink / parent.uploads, self.p.child_cap)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--children", type=int, default=Params.children)
    ap.add_argument("--pieces", type=int, default=Params.pieces)
    ap.add_argument("--scenario", choices=("known", "mixed", "unknown"), action="append")
    args = ap.parse_args(argv)
    params = Params(children=args.children, pieces=args.pieces)
    strategies = ("random", "weighted", "bandit")
    print(f"{params.origins} origins, {params.children} children x {params.pieces} pieces of "
          f"{params.piece_size >> 20} MiB, {args.seeds} seeds per row; times in seconds")
    for scenario in args.scenario or ("known", "mixed", "unknown"):
        rows = {}
        for strategy in strategies:
            pieces, children, totals = [], [], []
            for seed in range(args.seeds):
                r = Simulation(strategy, scenario, seed, params).run()
                pieces += r["piece"]
                children += r["child"]
                totals.append(r["total"])
            rows[strategy] = (statistics.fmean(pieces), p95(pieces), statistics.fmean(children), p95(children),
                              statistics.fmean(totals))
        base = rows["random"]
        print(f"\nscenario: {scenario}")
        print(f"{'strategy':<9} {'piece mean':>10} {'piece p95':>10} {'child mean':>10} {'child p95':>10} "
              f"{'total':>8} | {'piece/rand':>10} {'child/rand':>10} {'total/rand':>10}")
        for strategy, row in rows.items():
            print(f"{strategy:<9} {row[0]:>10.3f} {row[1]:>10.3f} {row[2]:>10.2f} {row[3]:>10.2f} {row[4]:>8.2f} | "
                  f"{row[0] / base[0]:>10.2f} {row[2] / base[2]:>10.2f} {row[4] / base[4]:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
