"""A UCB bandit parent scorer: learn which parents are fast from the piece times children report.

The weighted score trusts what peers declare and what probes measured. Those are often missing (a new
peer, no probe yet) or wrong (a declared 1 Gbit/s uplink that is saturated by another job), while the
quantity that matters — how long a piece from this parent takes — is reported for every piece anyway.
Each parent is an arm; handing it out is pulling it; the reward of a piece is its throughput.

The bandit replaces only the *speed* part of the weighted score (the bandwidth and RTT terms); free
upload slots, pieces held and locality keep their weights, since no piece time says whether a parent
holds the pieces the child lacks. For each candidate i::

    prior_i = population * belief_i / mean(belief)        # throughput units
    post_i  = (count_i * mean_i + n0 * prior_i) / (count_i + n0)
    ucb_i   = post_i / max_j(post_j) + c * sqrt(ln(N + 1) / (count_i + n0))
    score_i = w_free * free_i + w_pieces * pieces_i + w_locality * locality_i + (w_bw + w_rtt) * ucb_i

* ``mean_i``/``count_i``: discounted mean throughput and number of pieces from parent i; ``N``: the
  discounted number of all pieces; ``population``: the discounted mean throughput of all recent pieces;
* ``belief_i``: the weighted scorer's bandwidth/RTT features (unknown = 0.5). An untried parent starts
  as "an average parent, tilted by what the heuristics know" — not at +infinity as in plain UCB, which
  would try all 40 candidates before exploiting anything, and not at the bare heuristic score, which
  would never beat a parent observed once (its normalized reward is 1.0 by construction);
* ``gamma`` < 1 discounts old observations, since a parent's speed changes (it takes on more children,
  its uplink gets busy): discounted UCB (Garivier & Moulines 2008) keeps tracking it;
* ``c`` trades exploration against exploitation; ``n0`` is how many pieces' worth of evidence the prior
  counts as. Every new peer is a new arm, so a mesh has many arms and few pulls each: textbook values
  (c ~ 1, n0 = 1) explore far too much. See benchmarks/bench_parent_selection.py for the comparison.

Observations are pooled over children and tasks: a parent's upload speed is a property of the parent.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .selection import UNKNOWN, Candidate, WeightedScorer


@dataclass
class Arm:
    count: float = 0.0        # discounted number of observations
    total: float = 0.0        # discounted sum of throughputs (bytes/s)
    step: int = 0             # global step of the last decay


class BanditScorer:
    name = "bandit"

    def __init__(self, c: float = 0.05, gamma: float = 0.99, prior_weight: float = 8.0,
                 failure_penalty: float = 0.0, prior: WeightedScorer | None = None, max_arms: int = 50_000):
        if c < 0 or not 0 < gamma <= 1 or prior_weight <= 0:
            raise ValueError("bandit needs c >= 0, 0 < gamma <= 1, prior_weight > 0")
        self.c = c
        self.gamma = gamma
        self.prior_weight = prior_weight
        self.failure_penalty = failure_penalty
        self.prior = prior or WeightedScorer()
        self.max_arms = max_arms
        self.arms: dict[str, Arm] = {}
        self.step = 0
        self.total_count = 0.0
        self.total_throughput = 0.0

    def _decayed(self, arm: Arm) -> Arm:
        if self.gamma < 1 and arm.step != self.step:
            factor = self.gamma ** (self.step - arm.step)
            arm.count *= factor
            arm.total *= factor
            arm.step = self.step
        return arm

    def observe(self, parent_id: str, size: int, cost_s: float, success: bool) -> None:
        """One piece from ``parent_id``: a throughput sample, or a zero reward if it failed."""
        if success and (size <= 0 or cost_s <= 0):
            return
        self.step += 1
        self.total_count = self.total_count * self.gamma + 1.0   # == sum of every arm's discounted count
        sample = size / cost_s if success else self.failure_penalty
        self.total_throughput = self.total_throughput * self.gamma + sample
        arm = self.arms.get(parent_id)
        if arm is None:
            if len(self.arms) >= self.max_arms:
                self.forget(min(self.arms, key=lambda k: self.arms[k].step))
            arm = self.arms[parent_id] = Arm(step=self.step)
        arm = self._decayed(arm)
        arm.count += 1
        arm.total += sample

    def forget(self, parent_id: str) -> None:
        """Drop a parent that left (its id never comes back: peer ids are per daemon run)."""
        self.arms.pop(parent_id, None)

    def mean_throughput(self, parent_id: str) -> float | None:
        arm = self.arms.get(parent_id)
        if arm is None or arm.count <= 1e-12:
            return None
        return arm.total / arm.count     # discounting scales both alike: no decay needed here

    def population_throughput(self) -> float:
        """Discounted mean throughput of all recent pieces: what an untried parent is assumed to do."""
        return self.total_throughput / self.total_count if self.total_count > 1e-12 else 0.0

    def score(self, child_id: str, candidates: list[Candidate]) -> None:
        if not candidates:
            return
        w = self.prior.weights
        speed_weight = w.bandwidth + w.rtt
        log_total = math.log(self.total_count + 1.0)
        n0 = self.prior_weight
        # What the heuristics believe about each candidate's speed (bandwidth and RTT features), in [0, 1].
        beliefs = []
        for cand in candidates:
            f = cand.features
            bw = UNKNOWN if f.bandwidth is None else f.bandwidth
            rtt = UNKNOWN if f.rtt is None else f.rtt
            beliefs.append((w.bandwidth * bw + w.rtt * rtt) / speed_weight)
        population = self.population_throughput()
        mean_belief = statistics.fmean(beliefs) or 1.0
        posterior, counts = [], []
        for cand, belief in zip(candidates, beliefs):
            mean = self.mean_throughput(cand.peer_id)
            count = self._decayed(self.arms[cand.peer_id]).count if mean is not None else 0.0
            if population > 0:
                # Prior in throughput units: the recent average piece, tilted by the heuristics' belief.
                prior = population * belief / mean_belief
                posterior.append((count * (mean or 0.0) + n0 * prior) / (count + n0))
            else:
                posterior.append(belief)       # nothing observed yet: the heuristics alone
            counts.append(count)
        best = max(posterior) or 1.0
        for cand, post, count in zip(candidates, posterior, counts):
            ucb = post / best + self.c * math.sqrt(log_total / (count + n0))
            cand.score = self.prior.value_without_speed(cand.features) + speed_weight * ucb
