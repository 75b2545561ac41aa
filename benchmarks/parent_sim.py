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
* every announcement lists the child's piece transfers running now (``transfers``, as peers do since
  the scheduler counts a parent's load as its transfers in flight, plugins/scheduler/state.py), and a
  child announces as soon as it starts pieces: the scheduler's ``parent_load`` is the simulated
  parent's real upload count (real peers announce every 0.25 s, so theirs lags by up to that);
* a piece takes ``rtt(parent) + rtt(child)`` (latency, no bytes move) then ``size`` bytes at a *fluid*
  rate: :meth:`Simulation.rate` (the parent's uplink now shared by its uploads, capped by the child's
  downlink shared by its downloads) recomputed whenever a transfer starts or ends at either end or the
  parent's congestion starts or ends; latency and size are scaled by one lognormal draw (sigma 0.25).
  (Rates were once fixed when a piece started: one piece begun on a congested 10 Mbit/s seed with 30
  uploads then took 400 s after the congestion and the uploads were gone, and those pieces alone made
  the 50-node p95 — a simulator artefact, not a property of any scorer.)
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
    sending: set = field(default_factory=set)       # Transfers from this host
    receiving: set = field(default_factory=set)     # Transfers to this host

    def rate(self, t: float, factor: float = 1.0) -> float:
        for start, end in self.congested:
            if start <= t < end:
                return self.uplink * factor
        return self.uplink


@dataclass(eq=False)
class Transfer:
    """One piece moving from ``parent`` to ``child`` at a rate that changes with the load at both ends."""

    child: Child
    parent: SimHost
    piece: int
    started: float
    since: float          # bytes move from here on (after the latency), at ``rate``
    left: float           # bytes still to move at ``since``
    rate: float = 0.0
    version: int = 0


@dataclass
class Child:
    host: SimHost
    arrived: float
    missing: set[int]
    parents: list[str] = field(default_factory=list)
    outstanding: dict[str, int] = field(default_factory=dict)
    in_progress: set[int] = field(default_factory=set)
    fetching: dict[int, str] = field(default_factory=dict)     # piece -> parent, for ``transfers``
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
        self.served: dict[str, int] = {}      # pieces each parent served (herding shows here)
        self._digests_known = False

    # -- world building --------------------------------------------------------------------------------------

    def register(self, host: SimHost, declared: int = 0) -> None:
        self.hosts[host.peer_id] = host
        for start, end in host.congested:          # its transfers change pace at every edge
            for t in (start, end):
                if t >= self.now:
                    self.push(t, "pace", host.peer_id)
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
        # It reports transfers from the start (none yet), as peers do: else the scheduler counts it as an
        # older peer, one transfer on every parent it lists, until its first piece starts.
        self.state.announce(host.peer_id, self.task, (), (), transfers=())
        child = self.children[host.peer_id] = Child(host, self.now, set(range(self.pieces)))
        self.schedule(child)

    def push(self, t: float, kind: str, *data) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    # -- what a subclass says ----------------------------------------------------------------------------------

    def arrive(self, *data) -> None:
        raise NotImplementedError

    def rate(self, parent: SimHost, child: SimHost) -> float:
        """Bytes/s of a transfer now (the parent's uploads and the child's downloads count every transfer running)."""
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

    def transfers(self, child: Child) -> list[tuple[str, int]]:
        return [(parent, piece) for piece, parent in child.fetching.items()]

    def fill(self, child: Child) -> None:
        before = len(child.fetching)
        self._fill(child)
        if len(child.fetching) > before:      # new transfers: the scheduler hears of them at once
            self.state.announce(child.host.peer_id, self.task, (), sorted(child.in_progress),
                                transfers=self.transfers(child))

    def _fill(self, child: Child) -> None:
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
            child.fetching[piece] = parent_id
            noise = self.noise.lognormvariate(0, NOISE_SIGMA)
            tr = Transfer(child, parent, piece, self.now, self.now + (parent.rtt + child.host.rtt) * noise,
                          self.piece_size * noise)
            parent.sending.add(tr)
            child.host.receiving.add(tr)
            self.pace(parent.sending | child.host.receiving)

    def pace(self, transfers) -> None:
        """Bring ``transfers`` up to now at their old rates, give them the rates of now, re-plan their ends."""
        for tr in transfers:
            if self.now > tr.since:
                tr.left = max(0.0, tr.left - tr.rate * (self.now - tr.since))
                tr.since = self.now
            tr.rate = self.rate(tr.parent, tr.child.host)
            tr.version += 1
            self.push(tr.since + tr.left / tr.rate, "piece", tr, tr.version)

    def transfer_done(self, tr: Transfer) -> None:
        tr.parent.sending.discard(tr)
        tr.child.host.receiving.discard(tr)
        tr.parent.uploads -= 1
        tr.child.host.downloads -= 1
        self.pace(tr.parent.sending | tr.child.host.receiving)
        self.piece_done(tr.child.host.peer_id, tr.parent.peer_id, tr.piece, self.now - tr.started)

    def piece_done(self, child_id: str, parent_id: str, piece: int, cost: float) -> None:
        child = self.children[child_id]
        child.outstanding[parent_id] -= 1
        child.in_progress.discard(piece)
        child.fetching.pop(piece, None)
        child.missing.discard(piece)
        self.piece_times.append(cost)
        self.served[parent_id] = self.served.get(parent_id, 0) + 1
        self.svc.piece_result(self.task, child_id, parent_id, piece, True, cost, self.piece_size)
        done = not child.missing
        self.state.announce(child_id, self.task, [piece], sorted(child.in_progress), done=done,
                            transfers=None if done else self.transfers(child))
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
                tr, version = data
                if version == tr.version and tr in tr.parent.sending:
                    self.transfer_done(tr)
            elif kind == "pace":
                self.pace(set(self.hosts[data[0]].sending))
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
