"""A UCB bandit parent scorer: learn which parents are fast from the piece times children report.

The weighted score trusts what peers declare and what probes measured. Those are often missing (a new
peer, no probe yet) or wrong (a declared 1 Gbit/s uplink that is saturated by another job), while the
quantity that matters — how long a piece from this parent takes — is reported for every piece anyway.
Each parent is an arm; pulling it is handing it out as a parent; the reward of a piece is its throughput
relative to the best parent's mean throughput (so rewards sit in [0, 1] whatever the link speeds).

Score of arm i (UCB1 with a prior and discounting)::

    mean_i  = (gamma-discounted sum of rewards + n0 * prior_i) / (discounted count + n0)
    score_i = mean_i + c * sqrt(ln(total count + 1) / (discounted count + n0))

* ``prior_i`` is the weighted score (:class:`.selection.WeightedScorer`): an arm nobody tried yet starts
  where the heuristics put it, with a wide bonus, instead of at +infinity (plain UCB would try every one
  of 40 candidates before exploiting anything);
* ``gamma`` < 1 discounts old observations, since a parent's speed changes (it takes on more children,
  its uplink gets busy): discounted UCB (Garivier & Moulines 2008) keeps tracking it;
* ``c`` trades exploration against exploitation. Every new peer is a new arm, so a mesh has many arms
  and few pulls each: textbook values (c ~ 1, n0 = 1) explore far too much. The defaults (c = 0.15,
  n0 = 4 pseudo-pieces of prior) came out best in benchmarks/bench_parent_selection.py (c 0.05–0.5,
  n0 1–8, gamma 0.99–0.995); c = 0.5 with n0 = 1 was worse than random there.

Observations are pooled over children and tasks: a parent's upload speed is a property of the parent.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .selection import Candidate, WeightedScorer


@dataclass
class Arm:
    count: float = 0.0        # discounted number of observations
    total: float = 0.0        # discounted sum of throughputs (bytes/s)
    step: int = 0             # global step of the last decay


class BanditScorer:
    name = "bandit"

    def __init__(self, c: float = 0.15, gamma: float = 0.995, prior_weight: float = 4.0,
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
        self.prior.score(child_id, candidates)   # candidate.score = weighted score, replaced below
        if not candidates:
            return
        log_total = math.log(self.total_count + 1.0)
        n0 = self.prior_weight
        population = self.population_throughput()
        if population <= 0:
            # Nothing observed yet: the heuristics decide, every arm with the same exploration bonus.
            for cand in candidates:
                cand.score += self.c * math.sqrt(log_total / n0)
            return
        # Prior in throughput units: the recent average, tilted by how the heuristics rank this candidate
        # against the others. Relative to the best posterior of this decision, rewards sit in [0, 1].
        mean_prior = statistics.fmean(c.score for c in candidates) or 1.0
        posterior, counts = {}, {}
        for cand in candidates:
            prior = population * cand.score / mean_prior
            mean = self.mean_throughput(cand.peer_id)
            count = self._decayed(self.arms[cand.peer_id]).count if mean is not None else 0.0
            posterior[cand.peer_id] = (count * (mean or 0.0) + n0 * prior) / (count + n0)
            counts[cand.peer_id] = count
        best = max(posterior.values()) or 1.0
        for cand in candidates:
            n = counts[cand.peer_id] + n0
            cand.score = posterior[cand.peer_id] / best + self.c * math.sqrt(log_total / n)
