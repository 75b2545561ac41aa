"""The UCB parent scorer finds the fastest parent from piece times alone, and follows it when it changes."""
from __future__ import annotations

import random

from remora.plugins.scheduler.bandit import BanditScorer
from remora.plugins.scheduler.selection import Candidate, Features
from remora.plugins.scheduler.state import TaskPeer

PIECE = 4 << 20


def candidates(n: int) -> list[Candidate]:
    # Nothing known about anyone: equal priors, so only the observations can tell them apart.
    unknown = Features(pieces=1.0, free_upload=1.0, bandwidth=None, rtt=None, locality=0.0)
    return [Candidate(tp=TaskPeer(peer_id=f"p{i}", joined_at=0), features=unknown) for i in range(n)]


def play(bandit: BanditScorer, rates: list[float], rounds: int, rng: random.Random) -> list[int]:
    """Each round: pick the top-scored arm, fetch a piece at its hidden rate (noisy), report the time."""
    picks = []
    for _ in range(rounds):
        cands = candidates(len(rates))
        bandit.score("child", cands)
        best = max(range(len(cands)), key=lambda i: cands[i].score)
        throughput = rates[best] * rng.lognormvariate(0, 0.3)      # heavy-ish noise around the mean
        bandit.observe(f"p{best}", PIECE, PIECE / throughput, True)
        picks.append(best)
    return picks


def test_converges_to_the_best_arm():
    rates = [5e6, 20e6, 8e6, 30e6, 12e6, 2e6, 25e6, 10e6]   # bytes/s; p3 is best, p6 close second
    picks = play(BanditScorer(), rates, 1500, random.Random(1))   # the shipped defaults
    tail = picks[-500:]
    assert tail.count(3) / len(tail) > 0.8
    assert tail[-100:].count(3) > 80
    assert set(picks) == set(range(len(rates)))               # it did explore every arm


def test_tracks_a_parent_that_slows_down():
    """Discounting is what lets it follow a change; without it (gamma = 1) it stays on the old best."""
    for gamma, follows in ((0.99, True), (1.0, False)):
        rates = [10e6, 30e6, 15e6]
        rng = random.Random(2)
        bandit = BanditScorer(gamma=gamma)
        assert play(bandit, rates, 600, rng)[-200:].count(1) > 150
        rates[1] = 1e6                    # the best parent's uplink gets saturated by someone else
        picks = play(bandit, rates, 600, rng)
        assert (picks[-200:].count(2) > 150) is follows


def test_failures_count_against_an_arm():
    bandit = BanditScorer(c=0.2, gamma=1.0)
    for _ in range(20):
        bandit.observe("good", PIECE, 0.5, True)
        bandit.observe("broken", PIECE, 0.4, True)
        bandit.observe("broken", 0, 0, False)
        bandit.observe("broken", 0, 0, False)
    cands = candidates(0) + [Candidate(tp=TaskPeer(peer_id=p, joined_at=0),
                                       features=Features(1.0, 1.0, None, None, 0.0)) for p in ("good", "broken")]
    bandit.score("child", cands)
    assert cands[0].score > cands[1].score


def test_the_prior_orders_untried_arms():
    bandit = BanditScorer()
    known_fast = Candidate(tp=TaskPeer(peer_id="a", joined_at=0), features=Features(1.0, 1.0, 1.0, 1.0, 1.0))
    unknown = Candidate(tp=TaskPeer(peer_id="b", joined_at=0), features=Features(1.0, 1.0, None, None, 0.0))
    bandit.score("child", [known_fast, unknown])
    assert known_fast.score > unknown.score
