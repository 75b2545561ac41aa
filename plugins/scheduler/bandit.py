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
* ``c`` trades exploration against exploitation; rewards are in [0, 1], so c around 0.3–1 is sensible.

Observations are pooled over children and tasks: a parent's upload speed is a property of the parent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .selection import Candidate, WeightedScorer


@dataclass
class Arm:
    count: float = 0.0        # discounted number of observations
    total: float = 0.0        # discounted sum of throughputs (bytes/s)
    step: int = 0             # global step of the last decay


class BanditScorer:
    name = "bandit"

    def __init__(self, c: float = 0.5, gamma: float = 0.995, prior_weight: float = 1.0,
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
        arm = self.arms.get(parent_id)
        if arm is None:
            if len(self.arms) >= self.max_arms:
                self.forget(min(self.arms, key=lambda k: self.arms[k].step))
            arm = self.arms[parent_id] = Arm(step=self.step)
        arm = self._decayed(arm)
        arm.count += 1
        arm.total += size / cost_s if success else self.failure_penalty

    def forget(self, parent_id: str) -> None:
        """Drop a parent that left (its id never comes back: peer ids are per daemon run)."""
        self.arms.pop(parent_id, None)

    def mean_throughput(self, parent_id: str) -> float | None:
        arm = self.arms.get(parent_id)
        if arm is None or arm.count <= 1e-12:
            return None
        return arm.total / arm.count     # discounting scales both alike: no decay needed here

    def score(self, child_id: str, candidates: list[Candidate]) -> None:
        # Rewards are throughputs relative to the best candidate of this decision: UCB only ever compares
        # these candidates with each other, and the scale is then [0, 1] whatever the network.
        self.prior.score(child_id, candidates)   # candidate.score = prior, replaced below
        means = {c.peer_id: self.mean_throughput(c.peer_id) for c in candidates}
        best = max((m for m in means.values() if m), default=0.0)
        log_total = math.log(self.total_count + 1.0)
        n0 = self.prior_weight
        for cand in candidates:
            count, reward_sum = 0.0, 0.0
            mean = means[cand.peer_id]
            if mean is not None and best > 0:
                count = self._decayed(self.arms[cand.peer_id]).count
                reward_sum = count * mean / best
            n = count + n0
            cand.score = (reward_sum + n0 * cand.score) / n + self.c * math.sqrt(log_total / n)
