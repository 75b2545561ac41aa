"""Every algorithm on instances with a known optimum; MIP == brute force; heuristic/approx stay feasible.

The hand instances and their optima are derived in placement_hand.py's docstrings.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from placement_hand import (
    OPT_BOUNDED,
    OPT_PLAIN,
    OPT_WEIGHTED,
    state_matters,
    two_nodes,
    uniform_metric,
)
from placement_instances import brute_force, large_problem, random_problem
from remora.placement import approx, heuristic, mip
from remora.placement.arrays import Compiled
from remora.placement.mip import Infeasible
from remora.placement.model import evaluate
from remora.placement.solve import ALGORITHMS, solve

EXACT = ("mip", "heuristic", "approx")


@pytest.mark.parametrize("algorithm", EXACT)
@pytest.mark.parametrize("case", ["plain", "weighted", "bounded"])
def test_hand_optimum(algorithm, case):
    problem, (fs, ss, value) = {
        "plain": (two_nodes(), OPT_PLAIN),
        "weighted": (two_nodes(delay_weight=50.0), OPT_WEIGHTED),
        "bounded": (two_nodes(delay_bound=1.0), OPT_BOUNDED),
    }[case]
    plan = solve(problem, algorithm)
    ev = evaluate(problem, plan)
    assert ev.feasible, ev.violations
    assert ev.objective == pytest.approx(value, rel=1e-9)
    assert (plan.functions, plan.states) == (fs, ss)


def test_baselines_on_hand_instance():
    p = two_nodes()
    # nearest fills "near" first: f there, g does not fit (CPU) -> far, s -> near: 50+100+10+10+1 = 171
    plan = solve(p, "nearest")
    assert (plan.functions, plan.states) == ({"f": "near", "g": "far"}, {"s": "near"})
    assert evaluate(p, plan).objective == pytest.approx(171.0)
    for seed in range(5):
        assert evaluate(p, solve(p, "random", seed=seed)).feasible


def test_stateless_baseline_pays_for_ignoring_state():
    p = state_matters()
    assert evaluate(p, solve(p, "mip")).objective == pytest.approx(10.0)
    assert evaluate(p, solve(p, "heuristic")).objective == pytest.approx(10.0)
    blind = solve(p, "stateless")
    assert blind.states == {"db": "b"}
    assert evaluate(p, blind).objective == pytest.approx(110.0)


@pytest.mark.parametrize("seed", range(16))
def test_mip_equals_brute_force(seed):
    kw = [{}, {"tight": True}, {"delay_bound": 0.3}, {"delay_weight": 200.0, "tight": True}][seed % 4]
    p = random_problem(seed, N=3, F=3, S=2, **kw)
    best, _ = brute_force(p)
    try:
        plan = mip.solve(p)
    except Infeasible:
        assert best == float("inf")
        return
    ev = evaluate(p, plan)
    assert ev.feasible and plan.meta["optimal"]
    assert ev.objective == pytest.approx(best, rel=1e-6)


@pytest.mark.parametrize("seed", range(24))
def test_heuristic_and_approx_feasible_and_close(seed):
    kw = [{"tight": True}, {"delay_bound": 0.5}, {"delay_weight": 100.0}, {"tight": True, "delay_bound": 0.6}][seed % 4]
    p = random_problem(100 + seed, N=4, F=3, S=2, **kw)
    best, _ = brute_force(p)
    for name in ("heuristic", "approx"):
        if best == float("inf"):
            with pytest.raises(Infeasible):
                plan = solve(p, name)
                if evaluate(p, plan).feasible is False:
                    raise Infeasible("reported infeasible")
            continue
        ev = evaluate(p, solve(p, name))
        assert ev.feasible, (name, ev.violations)
        assert ev.objective <= 1.5 * best + 1e-9, name


def test_capacity_infeasible_instance_is_reported_by_every_algorithm():
    p = two_nodes()
    import dataclasses

    from remora.placement.model import Network, Problem

    small = Network(tuple(dataclasses.replace(n, cpu=10) for n in p.network.nodes), p.network.links)
    q = Problem(small, p.app, p.users)
    for name in ALGORITHMS:
        with pytest.raises(Infeasible):
            solve(q, name)


def test_heuristic_reports_an_unmeetable_delay_bound():
    p = two_nodes(delay_bound=0.05)  # even (far, far, far) needs 0.12 s
    with pytest.raises(Infeasible):
        mip.solve(p)
    plan = heuristic.solve(p)
    assert plan.meta["delay_feasible"] is False
    assert not evaluate(p, plan).feasible


def test_threshold_rounding_keeps_marginals():
    frac = np.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.0, 0.25, 0.75]])
    rng = np.random.default_rng(7)
    counts = np.zeros_like(frac)
    n = 6000
    for _ in range(n):
        r = approx.threshold_round(frac, rng)
        counts[np.arange(3), r] += 1
    assert np.allclose(counts / n, frac, atol=0.025)
    assert (counts[1] == [n, 0, 0]).all()  # integral rows stay where they are


@pytest.mark.parametrize("seed", range(10))
def test_approx_bound_in_the_proved_case(seed):
    # §7.3: uncapacitated, no delay terms, equal transfer cost: E[cost] <= max(2, 1 + ln g + 2/K) * LP.
    p = uniform_metric(random_problem(200 + seed, N=4, F=4, S=2))
    opt, _ = brute_force(p)
    plan = approx.solve(p, seed=seed)
    lp = plan.meta["lower_bound"]
    comp = Compiled(p)
    g = max((len(m) for m in comp.groups), default=1)
    factor = max(2.0, 1 + np.log(g) + 2 / comp.K)
    assert lp <= opt * (1 + 1e-7) + 1e-9
    assert evaluate(p, plan).objective <= factor * lp + 1e-9


def test_mip_time_limit_still_returns_a_placement():
    p = large_problem(5, N=25, F=12, S=3, users=5)
    plan = mip.solve(p, time_limit=2.0)
    assert evaluate(p, plan).feasible
    assert "optimal" in plan.meta


def test_heuristic_plans_1000_nodes_100_functions_quickly():
    p = large_problem(1, N=1000, F=100, S=20, users=50)
    wall, cpu = time.perf_counter(), time.process_time()
    plan = solve(p, "heuristic")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ev = evaluate(p, plan)
    assert ev.feasible
    # CPU seconds (the shared CI box's load inflates wall time, not CPU time)
    assert cpu < 10.0, (cpu, wall)
    near = evaluate(p, solve(p, "nearest"))
    rnd = evaluate(p, solve(p, "random"))
    assert ev.objective < near.objective and ev.objective < rnd.objective


def test_mip_refuses_an_instance_too_large_to_build(monkeypatch):
    from remora.errors import UsageError

    p = random_problem(3, N=4, F=3, S=2)
    monkeypatch.setattr(mip, "MAX_NONZEROS", 100)
    with pytest.raises(UsageError, match="use --algorithm heuristic"):
        mip.solve(p)
    with pytest.raises(UsageError, match=r"approx \(LP relaxation\)"):
        approx.solve(p)


def test_mip_on_a_large_network_uses_candidate_nodes():
    p = large_problem(4, N=120, F=5, S=1, users=3)
    plan = mip.solve(p)
    assert plan.meta["candidates_restricted"] is True and plan.meta["optimal"] is False
    ev = evaluate(p, plan)
    assert ev.feasible
    # optimal over the candidates, which include everything the heuristic may use
    assert ev.objective <= evaluate(p, heuristic.solve(p)).objective + 1e-6
