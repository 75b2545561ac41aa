"""The discrete-event simulator shared by bench_parent_selection.py and bench_parent_learning.py.

It drives the REAL scheduler code — :meth:`SchedulerService.schedule` (seed, filters, blocklist, retry),
the parent selector and the scorers, the bandwidth estimator, the history recorder — with a simulated
clock; only the network is modelled. A benchmark subclasses :class:`Simulation` to build its world (which
hosts hold the blob, who arrives when, what the scheduler is told) and to say how fast a piece goes
(:meth:`Simulation.rate`); the mechanics below are common:

* children ask for parents on arrival and every ``reschedule`` finished pieces, fetch ``concurrency``
  pieces at a time — the lowest missing piece one of their parents has *finished*, from the holder with
  the fewest of their pieces in flight — announce each finished piece (so they become parents) and report
  its cost (which feeds measured bandwidth, the slow rule, the bandit and the history);
* a piece costs ``rtt(parent) + rtt(child) + size / rate`` times lognormal noise (sigma 0.25), the rate
  fixed when the piece starts (:meth:`Simulation.rate`, with the parent's and the child's transfers
  already counted);
* a child that gets no parent, or whose parents hold nothing it can fetch yet, asks again later.
"""
from __future__ import annotations

import heapq
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remora.plugins.scheduler.server import SchedulerService
from remora.plugins.scheduler.state import Host

NOISE_SIGMA = 0.25


@dataclass
class SwarmParams:
    """What every simulated swarm has; a benchmark's own Params extend it."""

    pieces: int = 32
    piece_size: int = 1 << 20
    concurrency: int = 4                 # pieces in flight per child
    reschedule: int = 8                  # a child asks for parents again every this many pieces


@dataclass
class SimHost:
    peer_id: str
    uplink: float              # hidden upload bytes/s
    rtt: float                 # hidden per-host latency (s); a pair's RTT is the sum of both ends
    congested: list[tuple[float, float]] = field(default_factory=list)   # (start, end): uplink x factor
    uploads: int = 0
    downloads: int = 0

    def rate(self, t: float, factor: float = 1.0) -> float:
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
    """One run of one scorer in one world. Subclasses set ``self.hosts``, register the hosts that hold
    the blob (:meth:`hold_blob`), push ``arrive`` events and implement :meth:`arrive` and :meth:`rate`."""

    def __init__(self, svc: SchedulerService, task: str, params: SwarmParams, noise: random.Random):
        self.svc = svc
        self.state = svc.state
        self.task = task
        self.pieces = params.pieces
        self.piece_size = params.piece_size
        self.concurrency = params.concurrency
        self.reschedule = params.reschedule
        self.noise = noise
        self.now = 0.0
        self.hosts: dict[str, SimHost] = {}
        self.children: dict[str, Child] = {}
        self.events: list = []
        self.seq = 0
        self.piece_times: list[float] = []
        self._digests_known = False

    # -- world building --------------------------------------------------------------------------------------

    def register(self, host: SimHost, declared: int = 0) -> None:
        self.hosts[host.peer_id] = host
        self.state.register_peer(Host(peer_id=host.peer_id, host_id=host.peer_id, upload_port=1,
                                      upload_bandwidth=declared))

    def hold_blob(self, host: SimHost, declared: int = 0) -> None:
        """``host`` holds the whole blob from the start. The first one also carries the digests a seed
        hashed from the registry: without them a peer that says "done" proves nothing."""
        self.register(host, declared)
        self.state.join_task(host.peer_id, self.task, self.pieces * self.piece_size, self.piece_size)
        self.state.announce(host.peer_id, self.task, range(self.pieces), (), done=True)
        if not self._digests_known:
            self._digests_known = True
            task = self.state.tasks[self.task]
            self.state.learn_metadata(task, host.peer_id, task.content_length, task.piece_size,
                                      ["sha256:" + "0" * 64] * self.pieces)

    def join(self, host: SimHost) -> None:
        """``host`` (registered) arrives as a child and asks for parents."""
        self.state.join_task(host.peer_id, self.task)
        child = self.children[host.peer_id] = Child(host, self.now, set(range(self.pieces)))
        self.schedule(child)

    def push(self, t: float, kind: str, *data) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    # -- what a subclass says ----------------------------------------------------------------------------------

    def arrive(self, *data) -> None:
        raise NotImplementedError

    def rate(self, parent: SimHost, child: SimHost) -> float:
        """Bytes/s of a piece starting now (the parent's and the child's transfers include it)."""
        raise NotImplementedError

    # -- mechanics ---------------------------------------------------------------------------------------------

    def schedule(self, child: Child) -> None:
        parents, b2s, retry, _ = self.svc.schedule(self.state.tasks[self.task], child.host.peer_id)
        assert not b2s, "hosts hold the blob: nobody should be sent to the source"
        child.since_schedule = 0
        child.parents = [p.host.peer_id for p in parents]
        if not child.parents:
            child.waiting = True
            self.push(self.now + retry / 1000, "retry", child.host.peer_id)
            return
        self.fill(child)

    def has(self, parent_id: str, piece: int) -> bool:
        tp = self.state.tasks[self.task].peers.get(parent_id)
        return tp is not None and (tp.done or piece in tp.finished)

    def fill(self, child: Child) -> None:
        while len(child.in_progress) < self.concurrency:
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
                    self.push(self.now + 0.1, "retry", child.host.peer_id)
                return
            piece, parent_id = choice
            parent = self.hosts[parent_id]
            parent.uploads += 1
            child.host.downloads += 1
            child.outstanding[parent_id] = child.outstanding.get(parent_id, 0) + 1
            child.in_progress.add(piece)
            rate = self.rate(parent, child.host)
            cost = (parent.rtt + child.host.rtt + self.piece_size / rate) * self.noise.lognormvariate(0, NOISE_SIGMA)
            self.push(self.now + cost, "piece", child.host.peer_id, parent_id, piece, cost)

    def piece_done(self, child_id: str, parent_id: str, piece: int, cost: float) -> None:
        child = self.children[child_id]
        self.hosts[parent_id].uploads -= 1
        child.host.downloads -= 1
        child.outstanding[parent_id] -= 1
        child.in_progress.discard(piece)
        child.missing.discard(piece)
        self.piece_times.append(cost)
        self.svc.piece_result(self.task, child_id, parent_id, piece, True, cost, self.piece_size)
        done = not child.missing
        self.state.announce(child_id, self.task, [piece], (), done=done)
        if done:
            child.done_at = self.now
            return
        child.since_schedule += 1
        if child.since_schedule >= self.reschedule:
            self.schedule(child)
        else:
            self.fill(child)

    def run(self) -> dict:
        """Until every child is done: piece costs, child completion times, the time the last one finished."""
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
        return {"piece": self.piece_times, "child": [c.done_at - c.arrived for c in self.children.values()],
                "total": max(c.done_at for c in self.children.values())}


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]
