"""Simulator and online learner: delays agree with the model; the bandit learns, beats ε-greedy, follows drift.

The bandit instances are built so the best placement is known by hand: one function, a user node U and
candidate nodes each one link away; the declared (probed) delays say one thing, the hidden true means
another, so a planner that trusts the declared delays is wrong by construction.
"""
from __future__ import annotations

import numpy as np
import pytest

from remora.errors import InvalidInput
from remora.placement import model as m
from remora.placement.generators import DelayProcess, random_problem
from remora.placement.online import (
    ArmUCB,
    EpsilonGreedy,
    LinkUCB,
    OnlineInstance,
    StaticPlan,
    candidate_placements,
    colocated_placements,
    run,
)
from remora.placement.simulate import DelayEvaluator, simulate

CANDS = "ABCD"
DECLARED = np.array([0.012, 0.010, 0.011, 0.013])   # the probes say B is best ...
TRUE = np.array([0.006, 0.014, 0.010, 0.020])       # ... the truth is A (by 4 ms over C)
BEST = 0


def star(declared=DECLARED, bound=None) -> m.Problem:
    nodes = tuple(m.Node(n, cpu=1e6, memory=1e12) for n in "U" + CANDS)
    links = tuple(m.Link("U", c, 1e9, float(d)) for c, d in zip(CANDS, declared))
    app = m.Application("one", (m.Function("f", cpu=0.001),), delay_bound=bound)
    return m.Problem(m.Network(nodes, links), app, {"U": 1.0})


def star_instance(rounds, seed=1, drift=None, bound=None) -> OnlineInstance:
    prob = star(bound=bound)
    dp = DelayProcess(DECLARED, seed, true_means=TRUE, shape=4.0, drift="abrupt" if drift else "none",
                      schedule=drift, horizon=rounds)
    return OnlineInstance.build(prob, [m.Placement({"f": c}, {}) for c in CANDS], dp, rounds, seed=seed)


def test_evaluator_matches_model_request_delay_at_declared_delays():
    for seed, kind in ((1, "waxman"), (2, "transit-stub")):
        p = random_problem(40, 12, seed=seed, topology=kind)
        rng = np.random.default_rng(seed)
        names = [n.name for n in p.network.nodes]
        pls = [m.Placement({f.name: names[rng.integers(len(names))] for f in p.app.functions},
                           {s.name: names[rng.integers(len(names))] for s in p.app.states}) for _ in range(6)]
        ev = DelayEvaluator(p, pls)
        U = len(ev.users)
        got = ev.delays(np.tile(ev.router.declared, (U, 1)), np.arange(U))
        want = np.array([[m.request_delay(p, pl, u) for pl in pls] for u in ev.users])
        assert np.allclose(got, want, rtol=1e-9, atol=1e-8)
        # a link twice as slow can only slow requests down, and does for some placement crossing it
        slow = np.tile(ev.router.declared * 2, (U, 1))
        assert (ev.delays(slow, np.arange(U)) >= got - 1e-12).all()


def test_simulate_without_jitter_is_the_model_and_jitter_spreads_it():
    p = random_problem(30, 8, seed=3, delay_cv=0.0)
    names = [n.name for n in p.network.nodes]
    pl = m.Placement({f.name: names[i % 5] for i, f in enumerate(p.app.functions)},
                     {s.name: names[0] for s in p.app.states})
    flat = simulate(p, pl, requests=3000, seed=1)
    assert flat.mean == pytest.approx(flat.mean_at_declared, rel=1e-3)   # request mix ~ rates
    assert flat.p95 - flat.p50 < 0.05 * flat.p50 + (max(flat.per_user.values()) - min(flat.per_user.values()))
    jit = simulate(random_problem(30, 8, seed=3, delay_cv=0.8), pl, requests=3000, seed=1)
    assert jit.p99 > jit.p50 and jit.max > flat.max
    with pytest.raises(InvalidInput):
        simulate(p, pl, trace=[(0.0, "nowhere")])


def test_link_ucb_regret_per_round_falls_and_it_settles_on_the_known_best():
    inst = star_instance(8000)
    assert inst.losses.sum(axis=0).argmin() == BEST
    res = run(inst, LinkUCB(inst.arms, DECLARED))
    per_round = [res.regret[t - 1] / t for t in (250, 1000, 4000, 8000)]
    assert per_round[0] > per_round[1] > per_round[2] > per_round[3]
    gap = np.sort(TRUE)[1] - TRUE[BEST]
    assert per_round[-1] < 0.1 * gap                      # toward 0: under a tenth of the smallest gap
    assert (res.arms[-2000:] == BEST).mean() > 0.95
    assert res.best_fixed == BEST


def test_link_ucb_beats_eps_greedy_and_the_static_plan():
    inst = star_instance(8000, seed=5)
    ucb = run(inst, LinkUCB(inst.arms, DECLARED))
    eps = run(inst, EpsilonGreedy(inst.arms, DECLARED, eps=0.1, seed=5))
    static = run(inst, StaticPlan(inst.arms, DECLARED))
    arm = run(inst, ArmUCB(inst.arms, DECLARED))
    assert static.arms[0] == 1 and static.switches == 0    # trusts the probes: B, forever
    assert ucb.regret[-1] < 0.5 * eps.regret[-1]
    assert eps.regret[-1] < static.regret[-1]
    # ε-greedy keeps paying for its exploration: its regret per round does not fall toward 0
    assert eps.regret[-1] / 8000 > 0.5 * 0.1 * np.mean(TRUE - TRUE[BEST])
    assert arm.regret[-1] < eps.regret[-1]


def test_discounted_ucb_follows_a_drift_that_changes_the_best_placement():
    T = 10_000
    flip = np.array([5.0, 1.0, 0.3, 1.0])     # at T/2: A becomes 30 ms, C 3 ms (new best)
    inst = star_instance(T, seed=2, drift=[(T // 2, flip)])
    dyn = inst.dynamic_best()
    ducb = run(inst, LinkUCB(inst.arms, DECLARED, gamma=0.999), dynamic=dyn)
    static = run(inst, StaticPlan(inst.arms, DECLARED), dynamic=dyn)
    eps = run(inst, EpsilonGreedy(inst.arms, DECLARED, seed=2), dynamic=dyn)
    assert (ducb.arms[T // 2 + 1500:] == 2).mean() > 0.9   # found C soon after the change
    assert (ducb.arms[T // 2 - 1500:T // 2] == 0).mean() > 0.8    # (discounting re-explores a little)
    d = {r.name: r.dynamic_regret[-1] / T for r in (ducb, static, eps)}
    assert d[ducb.name] < 0.3 * d["static"] and d[ducb.name] < 0.5 * d[eps.name]
    # the drift made the best fixed placement in hindsight lose to adapting: regret goes negative
    assert ducb.regret[-1] < 0


def test_admission_rejects_what_cannot_meet_the_bound():
    inst = star_instance(4000, seed=3, bound=0.003)   # below every true mean: nothing can meet it
    res = run(inst, LinkUCB(inst.arms, DECLARED))
    assert res.admit[:4].all()                         # optimism admits while nothing is known
    assert res.admit[-1000:].mean() < 0.05
    inst2 = star_instance(4000, seed=3, bound=0.05)    # loose: (almost) everything admitted and met
    res2 = run(inst2, LinkUCB(inst2.arms, DECLARED))
    assert res2.admitted > 0.99 and res2.missed < 0.01


def test_runs_are_deterministic_given_seeds():
    a, b = star_instance(2000, seed=9), star_instance(2000, seed=9)
    assert np.array_equal(a.X, b.X) and np.array_equal(a.users, b.users)
    ra, rb = run(a, LinkUCB(a.arms, DECLARED)), run(b, LinkUCB(b.arms, DECLARED))
    assert np.array_equal(ra.arms, rb.arms) and np.array_equal(ra.regret, rb.regret)
    ea, eb = run(a, EpsilonGreedy(a.arms, DECLARED, seed=1)), run(b, EpsilonGreedy(b.arms, DECLARED, seed=1))
    assert np.array_equal(ea.arms, eb.arms)
    ec = run(a, EpsilonGreedy(a.arms, DECLARED, seed=2))
    assert not np.array_equal(ea.arms, ec.arms)
    assert not np.array_equal(star_instance(2000, seed=10).X, a.X)


def test_candidate_placements_from_delay_scenarios():
    prob = star()

    def nearest(p: m.Problem) -> m.Placement:   # a planner that trusts whatever delays it is given
        link = min(p.network.links, key=lambda ln: ln.delay)
        return m.Placement({"f": link.b}, {})

    cands = candidate_placements(prob, nearest, scenarios=20, spread=0.6, seed=0)
    assert cands[0].functions == {"f": "B"}          # scenario 0 = the declared delays = the static plan
    assert len(cands) >= 3 and len({c.functions["f"] for c in cands}) == len(cands)
    with pytest.raises(InvalidInput):
        LinkUCB(DelayEvaluator(prob, cands), DECLARED, gamma=0.0)


def test_colocated_arms_fit_and_come_nearest_first():
    p = random_problem(30, 5, seed=6)
    arms = colocated_placements(p, 8)
    assert 2 <= len(arms) <= 8
    total = p.total_rate
    score = []
    for a in arms:
        nodes = set(a.functions.values()) | set(a.states.values())
        assert len(nodes) == 1 and not m.violations(p, a)
        node = nodes.pop()
        score.append(sum(r / total * p.paths.d(u, node) for u, r in p.users.items()))
    assert score == sorted(score)


def test_learner_on_a_generated_instance_beats_eps_greedy():
    """End to end on generator output: co-location sites as arms, stale probes, 4,000 rounds."""
    p = random_problem(40, 6, seed=1, delay_weight=500.0)
    arms = colocated_placements(p, 8)
    ev = DelayEvaluator(p, arms)
    dp = DelayProcess(ev.router.declared, seed=3, mismatch=0.8)
    inst = OnlineInstance.build(p, arms, dp, 4000, seed=3)
    ucb = run(inst, LinkUCB(inst.arms, ev.router.declared))
    eps = run(inst, EpsilonGreedy(inst.arms, ev.router.declared, seed=3))
    assert ucb.regret[3999] / 4000 < ucb.regret[399] / 400
    assert ucb.regret[-1] < eps.regret[-1]


def test_replanning_on_optimistic_delays_adds_the_missing_best_arm():
    prob = star()
    dp = DelayProcess(DECLARED, 4, true_means=TRUE, shape=4.0, horizon=6000)
    inst = OnlineInstance.build(prob, [m.Placement({"f": c}, {}) for c in "BCD"], dp, 6000, seed=4)

    def nearest(p: m.Problem) -> m.Placement:   # trusts the delays it is given
        link = min(p.network.links, key=lambda ln: ln.delay)
        return m.Placement({"f": link.b}, {})

    same = inst.copy()
    plain = run(same, LinkUCB(same.arms, DECLARED))
    grown = inst.copy()
    learner = LinkUCB(grown.arms, DECLARED, planner=nearest, replan_every=500)
    res = run(grown, learner)
    assert grown.arms.K == 4 and grown.arms.placements[3].functions == {"f": "A"}
    assert learner.replans[0] == (500, True) and not any(new for _, new in learner.replans[1:])
    assert (res.arms[-2000:] == 3).mean() > 0.95
    ref = grown.losses                      # both judged against the best of all four arms
    plain_regret = np.sum(plain.loss - ref[:, 3])
    assert res.regret[-1] < 0.5 * plain_regret
    with pytest.raises(InvalidInput):
        LinkUCB(grown.arms, DECLARED, planner=nearest, replan_every=0)
