"""Parent selection: sample candidates, drop the bad ones, score the rest, return the best few.

The drop rules are hard constraints that hold whatever the scorer:

* ``self`` / ``same_host`` — a peer never downloads from itself, nor from another daemon on its machine
  (that would only move bytes between two caches of one disk);
* ``isolated`` — the candidate was caught lying (a corrupt piece, digests the blob contradicts) in this
  task, or by peers on several hosts (:meth:`SchedulerState.isolate`);
* ``blocklisted`` — the child excluded the parent, or the parent sent it a corrupt piece / failed
  repeatedly in this task (:meth:`SchedulerState.report_piece`);
* ``no_data`` — the candidate holds (or fetches) no piece the child still lacks;
* ``slow`` — the last piece the candidate served in this task cost more than 20x the mean of the earlier
  ones while there are fewer than 30 samples (too few for a distribution), more than mean + 3 sigma once
  there are enough (a normal-distribution outlier). Only a recent last sample counts, or a parent that
  was slow once would stay banned forever (nobody picks it, no new sample ever arrives). A slow
  candidate that is the only one sampled holding (finished, or done) a piece the child still needs is
  kept all the same, and the debug log says so: a slow parent beats none, and dropping the only holder
  left the child nothing to fetch those pieces from but the registry.

Two children may be each other's parents (a swarm: each relays the pieces it got first to the others).
That cannot deadlock: a child fetches from a parent only pieces the parent has *finished*; a piece the
parent is still fetching only tells the child to wait for it, and the parent's own fetch never depends on
the child. (An acyclic parent graph, as a peer-level DAG, made 8 children of one seed queue behind each
other: a child that was handed out as a parent could not get pieces from its own children.)

Scoring is pluggable (:class:`Scorer`): :class:`WeightedScorer` here, the UCB bandit in :mod:`.bandit`,
the learned cost model in :mod:`.learned`. After a decision the selector tells ``on_choice`` listeners
(the download history) which parents were chosen with which features.
"""
from __future__ import annotations

import logging
import math
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from .state import SchedulerState, Task, TaskPeer

DROP_REASONS = ("self", "same_host", "isolated", "blocklisted", "no_data", "slow")

log = logging.getLogger(__name__)


@dataclass
class SelectionConfig:
    candidate_limit: int = 40        # peers sampled per decision (bounds the cost on huge tasks)
    parent_limit: int = 4            # parents returned
    min_cost_samples: int = 2        # below this the slow-peer rule has nothing to compare with
    normal_samples: int = 30         # from here on costs are treated as normally distributed
    slow_factor: float = 20.0        # few samples: last > slow_factor * mean is slow
    slow_sigmas: float = 3.0         # many samples: last > mean + slow_sigmas * stdev is slow
    slow_recent_s: float = 30.0      # a last sample older than this no longer makes a peer slow


def is_slow(costs: list[float], config: SelectionConfig | None = None) -> bool:
    """The slow-peer rule on a parent's served piece costs, oldest first (the last one is judged)."""
    config = config or SelectionConfig()
    if len(costs) < config.min_cost_samples:
        return False
    last, history = costs[-1], costs[:-1]
    mean = statistics.fmean(history)
    if len(costs) < config.normal_samples:
        return last > config.slow_factor * mean
    # Plain float arithmetic: statistics.pstdev is exact (fractions) and was a fifth of the scheduler's
    # CPU with children asking for parents ten times a second.
    var = max(0.0, math.fsum(c * c for c in history) / len(history) - mean * mean)
    return last > mean + config.slow_sigmas * math.sqrt(var)


#: The raw features of a candidate, in this order, for the learned scorer and the download history
#: (docs/p2p.md, "Learned parent selection"). Bandwidths in bytes/s, times in seconds; None = unknown.
FEATURE_NAMES = (
    "pair_goodput",      # corrected goodput of parent host -> child host (bandwidth.py), EWMA
    "host_capacity",     # corrected upload goodput of the parent host over all its children, EWMA
    "expected_goodput",  # pair (else host) goodput / (parent's transfers now + 1)
    "measured_bw",       # the peer's own EWMA of size/cost over pieces it served (uncorrected)
    "declared_bw",       # what the peer declared at registration
    "rtt_s",             # probe RTT child host -> parent host (inf-free: unreachable = 10 s)
    "parent_load",       # piece transfers in flight from the parent, as children report them (all tasks)
    "parent_slots",      # its upload slots
    "child_parents",     # parents the child fetches from now
    "pieces",            # share of the blob the parent holds (in flight counts half)
    "locality",          # share of the child's labels the parent matches
    "parent_done",       # 1: it holds the whole blob
    "parent_source",     # 1: it is the seed, still fetching from the registry
    "pair_samples",      # pieces behind the pair estimate (0 = none)
    "estimate_age_s",    # age of the pair (else host) estimate
)
UNREACHABLE_RTT_S = 10.0


@dataclass
class Features:
    """What the scheduler knows about one candidate, each in [0, 1] (None: unknown), and ``raw``: the
    same and more, unnormalized, in :data:`FEATURE_NAMES` order (None: unknown)."""

    pieces: float
    free_upload: float
    bandwidth: float | None
    rtt: float | None
    locality: float
    raw: tuple | None = None


@dataclass
class Candidate:
    tp: TaskPeer
    features: Features
    score: float = 0.0
    predicted_cost: float | None = None   # seconds per MiB, set by the learned scorer

    @property
    def peer_id(self) -> str:
        return self.tp.peer_id


class Scorer(Protocol):
    name: str

    def score(self, child_id: str, candidates: list[Candidate]) -> None:
        """Set ``candidate.score`` (higher is better) on every candidate."""

    def observe(self, parent_id: str, size: int, cost_s: float, success: bool) -> None:
        """Learn from one piece fetched from ``parent_id``."""

    def forget(self, peer_id: str) -> None:
        """The peer left: drop what was learned about it."""


@dataclass
class Weights:
    bandwidth: float = 0.30
    rtt: float = 0.20
    free_upload: float = 0.20
    pieces: float = 0.15
    locality: float = 0.15


UNKNOWN = 0.5   # an unknown bandwidth or RTT scores as average: neither preferred nor avoided


class WeightedScorer:
    """A fixed weighted sum of the candidate's features (the Dragonfly-style evaluator)."""

    name = "weighted"

    def __init__(self, weights: Weights | None = None):
        self.weights = weights or Weights()

    def value(self, f: Features) -> float:
        w = self.weights
        return (w.bandwidth * (UNKNOWN if f.bandwidth is None else f.bandwidth)
                + w.rtt * (UNKNOWN if f.rtt is None else f.rtt)
                + w.free_upload * f.free_upload + w.pieces * f.pieces + w.locality * f.locality)

    def value_without_speed(self, f: Features) -> float:
        """The part of the score that is not about link speed (the bandit learns that part instead)."""
        w = self.weights
        return w.free_upload * f.free_upload + w.pieces * f.pieces + w.locality * f.locality

    def score(self, child_id: str, candidates: list[Candidate]) -> None:
        for c in candidates:
            c.score = self.value(c.features)

    def observe(self, parent_id: str, size: int, cost_s: float, success: bool) -> None:
        """The weighted score reads measured bandwidth from the state; nothing to learn here."""

    def forget(self, peer_id: str) -> None:
        """Nothing kept per peer."""


class RandomScorer:
    """Baseline (``--scorer random``): the same filters, then parents in random order."""

    name = "random"

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def score(self, child_id: str, candidates: list[Candidate]) -> None:
        for c in candidates:
            c.score = self.rng.random()

    def observe(self, parent_id: str, size: int, cost_s: float, success: bool) -> None:
        """Random learns nothing."""

    def forget(self, peer_id: str) -> None:
        """Nothing kept per peer."""


@dataclass
class Decision:
    parents: list[Candidate]
    dropped: Counter = field(default_factory=Counter)
    sampled: int = 0
    kept_slow: list[str] = field(default_factory=list)   # slow, kept as the only holders of needed pieces


class ParentSelector:
    """Filtering and scoring for one scheduler (its state, scorer, config and random source)."""

    def __init__(self, state: SchedulerState, scorer: Scorer, config: SelectionConfig | None = None,
                 rng: random.Random | None = None):
        self.state = state
        self.scorer = scorer
        self.config = config or SelectionConfig()
        self.rng = rng or random.Random()
        #: Called as ``fn(task, child_id, chosen_candidates)`` after every decision that returned parents.
        self.on_choice: list = []

    # -- filtering -----------------------------------------------------------------------------------------

    def drop_reason(self, task: Task, child: TaskPeer, cand: TaskPeer) -> str | None:
        if cand.peer_id == child.peer_id:
            return "self"
        me, other = self.state.peers.get(child.peer_id), self.state.peers.get(cand.peer_id)
        if other is None:
            return "no_data"
        if me is not None and me.host.host_id and me.host.host_id == other.host.host_id:
            return "same_host"
        if self.state.is_isolated(task, cand.peer_id):
            return "isolated"
        if cand.peer_id in child.blocklist:
            return "blocklisted"
        if child.done:
            return "no_data"
        if not cand.done and not ((cand.finished | cand.in_flight) - child.finished):
            return "no_data"
        if cand.done and task.total_pieces and len(child.finished) >= task.total_pieces:
            return "no_data"
        if self.slow(cand):
            return "slow"
        return None

    def slow(self, cand: TaskPeer) -> bool:
        if not cand.served_costs:
            return False
        last_at = cand.served_costs[-1][0]
        if self.state.clock() - last_at > self.config.slow_recent_s:
            return False
        return is_slow([cost for _, cost in cand.served_costs], self.config)

    def only_holders(self, task: Task, child: TaskPeer, kept: list[TaskPeer], slow: list[TaskPeer],
                     decision: Decision) -> list[TaskPeer]:
        """The slow candidates to keep after all: those holding a piece the child needs that no kept
        candidate (nor a slow one kept before it) holds. The others count as dropped ("slow")."""
        total = task.total_pieces

        def holds(tp: TaskPeer) -> set[int] | None:   # None: every piece
            return None if tp.done else tp.finished

        covered: set[int] = set()
        everything = False
        for tp in kept:
            h = holds(tp)
            if h is None:
                everything = True
                break
            covered |= h
        back = []
        for cand in sorted(slow, key=lambda tp: tp.peer_id):
            h = holds(cand)
            if everything:
                needed = 0
            elif h is None:   # a complete slow candidate: whatever the child lacks and no kept one holds
                needed = sum(1 for i in range(total) if i not in covered and i not in child.finished) if total else 1
            else:
                needed = len(h - covered - child.finished)
            if not needed:
                decision.dropped["slow"] += 1
                continue
            back.append(cand)
            decision.kept_slow.append(cand.peer_id)
            log.debug("task %s: keeping slow parent %s for %s: the only candidate holding %d needed piece(s)",
                      task.task_id, cand.peer_id, child.peer_id, needed)
            if h is None:
                everything = True
            else:
                covered |= h
        return back

    # -- features --------------------------------------------------------------------------------------------

    def features(self, task: Task, child: TaskPeer, cands: list[TaskPeer]) -> list[Features]:
        state = self.state
        me = state.peers.get(child.peer_id)
        my_labels = me.host.labels if me else {}
        total = task.total_pieces
        raw_pieces, raw_bw, raw_rtt, out = [], [], [], []
        for c in cands:
            held = (task.total_pieces if c.done and total else len(c.finished)) + 0.5 * len(c.in_flight - c.finished)
            raw_pieces.append(held)
            peer = state.peers[c.peer_id]
            raw_bw.append(peer.bandwidth if peer.bandwidth else (peer.host.upload_bandwidth or None))
            sample = state.rtt_between(child.peer_id, c.peer_id)
            raw_rtt.append(None if sample is None else (sample.rtt_s if sample.reachable else float("inf")))
        loads = [state.upload_load(c.peer_id) for c in cands]
        raw_features = self.raw_features(task, child, cands, raw_pieces, raw_rtt, loads, my_labels)
        max_pieces = total or max(raw_pieces, default=0) or 1
        known_bw = [b for b in raw_bw if b]
        max_bw = max(known_bw, default=1.0)
        known_rtt = [r for r in raw_rtt if r is not None and r != float("inf")]
        min_rtt = max(min(known_rtt, default=1e-3), 1e-4)
        for c, held, bw, rtt, raw, load in zip(cands, raw_pieces, raw_bw, raw_rtt, raw_features, loads):
            peer = state.peers[c.peer_id]
            slots = peer.upload_slots
            free = max(0, slots - load) / slots
            labels = peer.host.labels
            locality = (sum(1 for k, v in my_labels.items() if labels.get(k) == v) / len(my_labels)
                        if my_labels else 0.0)
            if rtt is None:
                rtt_f = None
            elif rtt == float("inf"):
                rtt_f = 0.0
            else:
                rtt_f = min(1.0, min_rtt / max(rtt, 1e-4))
            out.append(Features(pieces=min(1.0, held / max_pieces), free_upload=free,
                                bandwidth=None if not bw else bw / max_bw, rtt=rtt_f, locality=locality,
                                raw=raw))
        return out

    def raw_features(self, task: Task, child: TaskPeer, cands: list[TaskPeer], held: list[float],
                     rtts: list[float | None], loads: list[int], my_labels: dict) -> list[tuple]:
        """:data:`FEATURE_NAMES` for each candidate: what the learned scorer and the history see."""
        state = self.state
        bw = state.bandwidth
        now = state.clock()
        me = state.peers.get(child.peer_id)
        child_host = me.host.host_id if me else ""
        total = task.total_pieces
        max_pieces = total or max(held, default=0) or 1
        out = []
        for c, h, rtt, load in zip(cands, held, rtts, loads):
            peer = state.peers[c.peer_id]
            host = peer.host.host_id
            pair = bw.pair(host, child_host)
            cap = bw.capacity(host)
            est = pair or cap
            labels = peer.host.labels
            locality = (sum(1 for k, v in my_labels.items() if labels.get(k) == v) / len(my_labels)
                        if my_labels else 0.0)
            out.append((
                pair.goodput if pair else None,
                cap.goodput if cap else None,
                est.goodput / (load + 1) if est else None,
                peer.bandwidth,
                float(peer.host.upload_bandwidth) if peer.host.upload_bandwidth else None,
                None if rtt is None else min(rtt, UNREACHABLE_RTT_S),
                float(load),
                float(peer.upload_slots),
                float(len(child.parents)),
                min(1.0, h / max_pieces),
                locality,
                1.0 if c.done else 0.0,
                1.0 if c.back_to_source and not c.done else 0.0,
                float(pair.samples) if pair else 0.0,
                now - est.updated_at if est else None,
            ))
        return out

    # -- the decision ----------------------------------------------------------------------------------------

    def select(self, task: Task, child_id: str, limit: int | None = None) -> Decision:
        """The best ``limit`` parents for ``child_id`` in ``task`` (possibly none), best first."""
        child = task.peers[child_id]
        limit = limit or self.config.parent_limit
        pool = [tp for pid, tp in task.peers.items() if pid != child_id]
        if len(pool) > self.config.candidate_limit:
            pool = self.rng.sample(pool, self.config.candidate_limit)
        else:
            self.rng.shuffle(pool)   # ties in the score then break randomly, not by arrival order
        decision = Decision(parents=[], sampled=len(pool))
        kept, slow = [], []
        for cand in pool:
            reason = self.drop_reason(task, child, cand)
            if reason == "slow":
                slow.append(cand)
            elif reason:
                decision.dropped[reason] += 1
            else:
                kept.append(cand)
        if slow:
            kept += self.only_holders(task, child, kept, slow, decision)
        if not kept:
            return decision
        candidates = [Candidate(tp=tp, features=f) for tp, f in zip(kept, self.features(task, child, kept))]
        self.scorer.score(child_id, candidates)
        candidates.sort(key=lambda c: c.score, reverse=True)
        decision.parents = candidates[:limit]
        for listener in self.on_choice:
            listener(task, child_id, decision.parents)
        return decision
