#!/usr/bin/env python3
"""Parent selection in a discrete-event simulation: weighted score vs UCB bandit vs random.

    python benchmarks/bench_parent_selection.py                 # all scenarios, 5 seeds each
    python benchmarks/bench_parent_selection.py --seeds 2 --children 20

The simulation drives the REAL scheduler code — :class:`SchedulerService.schedule` (seed, filters,
blocklist, retry), :class:`ParentSelector` and the scorers — with a simulated clock; only the network is
modelled. Every strategy sees the same peers, arrivals and noise (same seed), so the ratios against
random are paired comparisons within one run.

Model:
* ``origins`` peers already hold the whole blob, with heterogeneous hidden upload bandwidths and RTTs;
* ``children`` arrive (Poisson) and download ``pieces`` pieces, ``concurrency`` at a time, from the
  parents the scheduler gives them; they re-ask every ``reschedule`` pieces, announce what they finish
  (so they become parents too) and report every piece's time (which feeds measured bandwidth, the slow
  rule and the bandit);
* a piece takes ``rtt(parent, child) + size / (parent upload bandwidth / uploads in progress)``, the
  share fixed when the piece starts, times lognormal noise (sigma 0.25); children download at most
  ``child_cap`` bytes/s each;
* what the scheduler KNOWS depends on the scenario: ``known`` — every origin declares its bandwidth and
  probes measured RTTs; ``mixed`` — half the origins are unknown and a quarter declare a stale
  bandwidth 10x their real one; ``unknown`` — nothing declared, nothing probed.
"""
from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remora.plugins.scheduler.selection import Candidate, SelectionConfig  # noqa: E402
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerService  # noqa: E402
from remora.plugins.scheduler.state import Host  # noqa: E402

TASK = "sha256:" + "be" * 32
MB = 1_000_000


class RandomScorer:
    """Baseline: the same filters, then parents in random order."""

    name = "random"

    def __init__(self, rng: random.Random):
        self.rng = rng

    def score(self, child_id: str, candidates: list[Candidate]) -> None:
        for c in candidates:
            c.score = self.rng.random()

    def observe(self, *args) -> None:
        pass

    def forget(self, peer_id: str) -> None:
        pass


@dataclass
class SimPeer:
    peer_id: str
    bandwidth: float           # hidden upload bytes/s
    rtt: float                 # hidden per-link latency (s); a pair's RTT is the sum of both ends
    uploads: int = 0


@dataclass
class Child:
    sim: SimPeer
    arrived: float
    missing: set[int]
    parents: list[str] = field(default_factory=list)
    outstanding: dict[str, int] = field(default_factory=dict)
    in_progress: set[int] = field(default_factory=set)
    since_schedule: int = 0
    waiting: bool = False
    done_at: float | None = None


@dataclass
class Params:
    origins: int = 12
    children: int = 40
    pieces: int = 32
    piece_size: int = 1 << 20
    concurrency: int = 4
    reschedule: int = 8
    arrival_mean: float = 0.25
    child_cap: float = 50 * MB


ORIGIN_BW = [100, 60, 40, 25, 15, 10, 8, 5, 3, 2, 1.5, 1]
ORIGIN_RTT = [0.002, 0.030, 0.005, 0.060, 0.001, 0.020, 0.004, 0.080, 0.010, 0.003, 0.050, 0.015]


class Simulation:
    def __init__(self, strategy: str, scenario: str, seed: int, p: Params):
        self.p = p
        self.now = 0.0
        self.world = random.Random(seed)            # peers, arrivals, noise: identical per strategy
        config = SchedulerConfig(peer_ttl=1e9, scorer="bandit" if strategy == "bandit" else "weighted",
                                 random_seed=seed, retry_after_ms=100, max_schedule_failures=10 ** 6,
                                 selection=SelectionConfig(parent_limit=4))
        scorer = RandomScorer(random.Random(seed + 1)) if strategy == "random" else None
        self.svc = SchedulerService(config, clock=lambda: self.now, scorer=scorer)
        self.state = self.svc.state
        self.peers: dict[str, SimPeer] = {}
        self.children: dict[str, Child] = {}
        self.events: list = []
        self.seq = 0
        self.piece_times: list[float] = []
        self._origins(scenario)

    def push(self, t: float, kind: str, *data) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    def _origins(self, scenario: str) -> None:
        order = list(range(self.p.origins))
        self.world.shuffle(order)
        for n, i in enumerate(order):
            bw = ORIGIN_BW[i % len(ORIGIN_BW)] * MB
            sim = SimPeer(f"origin{i}", bw, ORIGIN_RTT[i % len(ORIGIN_RTT)])
            self.peers[sim.peer_id] = sim
            known = scenario == "known" or (scenario == "mixed" and n % 2 == 0)
            stale = scenario == "mixed" and n % 4 == 1
            declared = int(bw) if known else int(bw * 10) if stale else 0
            self.state.register_peer(Host(peer_id=sim.peer_id, host_id=sim.peer_id, upload_port=1,
                                          upload_bandwidth=declared))
            self.state.join_task(sim.peer_id, TASK, self.p.pieces * self.p.piece_size, self.p.piece_size)
            self.state.announce(sim.peer_id, TASK, range(self.p.pieces), (), done=True)
            if n == 0:  # digests a seed hashed from the registry: without them a done peer proves nothing
                task = self.state.tasks[TASK]
                self.state.learn_metadata(task, sim.peer_id, task.content_length, task.piece_size,
                                          ["sha256:" + "0" * 64] * self.p.pieces)
        self.known_rtt = scenario == "known"
        self.half_known = scenario == "mixed"

    def arrive(self, idx: int) -> None:
        sim = SimPeer(f"child{idx}", self.world.uniform(5, 50) * MB, self.world.uniform(0.001, 0.02))
        self.peers[sim.peer_id] = sim
        self.state.register_peer(Host(peer_id=sim.peer_id, host_id=sim.peer_id, upload_port=1))
        self.state.join_task(sim.peer_id, TASK)
        child = self.children[sim.peer_id] = Child(sim, self.now, set(range(self.p.pieces)))
        for n, origin in enumerate(p for p in self.peers.values() if p.peer_id.startswith("origin")):
            if self.known_rtt or (self.half_known and self.state.peers[origin.peer_id].host.upload_bandwidth
                                  and n % 2 == 0):
                self.state.record_probe(sim.peer_id, origin.peer_id, origin.rtt + sim.rtt, True)
        self.schedule(child)

    def schedule(self, child: Child) -> None:
        task = self.state.tasks[TASK]
        parents, b2s, retry, _ = self.svc.schedule(task, child.sim.peer_id)
        assert not b2s, "origins hold the blob: nobody should be sent to the source"
        child.since_schedule = 0
        child.parents = [p.host.peer_id for p in parents]
        if not child.parents:
            child.waiting = True
            self.push(self.now + retry / 1000, "retry", child.sim.peer_id)
            return
        self.fill(child)

    def has(self, parent_id: str, piece: int) -> bool:
        tp = self.state.tasks[TASK].peers.get(parent_id)
        return tp is not None and (tp.done or piece in tp.finished)

    def fill(self, child: Child) -> None:
        while len(child.in_progress) < self.p.concurrency:
            choice = None
            for piece in sorted(child.missing - child.in_progress):
                holders = [pid for pid in child.parents if self.has(pid, piece)]
                if holders:
                    # spread over the parents, best-ranked first on ties
                    choice = (piece, min(holders, key=lambda pid: child.outstanding.get(pid, 0)))
                    break
            if choice is None:
                if not child.in_progress:
                    child.waiting = True
                    self.push(self.now + 0.1, "retry", child.sim.peer_id)
                return
            piece, parent_id = choice
            parent = self.peers[parent_id]
            parent.uploads += 1
            child.outstanding[parent_id] = child.outstanding.get(parent_id, 0) + 1
            child.in_progress.add(piece)
            rate = min(parent.bandwidth / parent.uploads, self.p.child_cap)
            cost = (parent.rtt + child.sim.rtt + self.p.piece_size / rate) * self.world.lognormvariate(0, 0.25)
            self.push(self.now + cost, "piece", child.sim.peer_id, parent_id, piece, cost)

    def piece_done(self, child_id: str, parent_id: str, piece: int, cost: float) -> None:
        child = self.children[child_id]
        self.peers[parent_id].uploads -= 1
        child.outstanding[parent_id] -= 1
        child.in_progress.discard(piece)
        child.missing.discard(piece)
        self.piece_times.append(cost)
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
        t = 0.0
        for i in range(self.p.children):
            self.push(t, "arrive", i)
            t += self.world.expovariate(1 / self.p.arrival_mean)
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
        durations = [c.done_at - c.arrived for c in self.children.values()]
        assert all(c.done_at is not None for c in self.children.values())
        return {"piece": self.piece_times, "child": durations,
                "total": max(c.done_at for c in self.children.values())}


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


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
