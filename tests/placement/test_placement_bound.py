"""The whole-network lower bound (placement/bound.py) and the heuristic's candidate nodes on large networks.

The bound must never exceed what any placement achieves (checked against brute-force enumeration, the
optimum of every objective it can bound), and equals hand-derived values on the hand instances.
"""
from __future__ import annotations

import itertools
import math

import pytest
from placement_hand import state_matters, two_nodes
from placement_instances import brute_force, random_problem

from remora.placement import heuristic
from remora.placement.bound import lower_bound
from remora.placement.model import (
    Application,
    Function,
    Link,
    Network,
    Node,
    Placement,
    Problem,
    evaluate,
)


def _all_placements(problem: Problem):
    names = [n.name for n in problem.network.nodes]
    fn = [f.name for f in problem.app.functions]
    sn = [s.name for s in problem.app.states]
    for fa in itertools.product(names, repeat=len(fn)):
        for sa in itertools.product(names, repeat=len(sn)):
            ev = evaluate(problem, Placement(dict(zip(fn, fa)), dict(zip(sn, sa))))
            if ev.feasible:
                yield ev


def test_bound_on_hand_instances():
    # state_matters: h and db on a, cost 10, is also what the relaxation finds (nothing is fractional).
    assert lower_bound(state_matters())["bound"] == pytest.approx(10.0)
    # two_nodes (optimum 160, placement_hand.py): near holds 1.5 functions' CPU, so the LP puts 0.75 of
    # f and of g there: processing 2 * (0.75 * 50 + 0.25 * 100) = 125, no transfer (f and g split alike),
    # and 0.75 of s on near (storage 0.75 * 1) so g's access is never separated: 125.75.
    assert lower_bound(two_nodes())["bound"] == pytest.approx(125.75)


@pytest.mark.parametrize("seed", range(12))
def test_bound_never_exceeds_the_optimum(seed):
    p = random_problem(seed, N=3, F=3, S=1, tight=seed % 2 == 0)
    opt, _ = brute_force(p)
    lb = lower_bound(p)["bound"]
    assert lb <= opt * (1 + 1e-7) + 1e-9
    assert lb >= 0.5 * opt  # not vacuous on these instances (measured 0.69-1.00)


@pytest.mark.parametrize("seed", range(6))
def test_cost_and_delay_bounds_never_exceed_the_best_placement(seed):
    p = random_problem(seed, N=3, F=3, S=1, delay_weight=100.0, tight=seed % 2 == 0)
    evs = list(_all_placements(p))
    min_cost = min(e.cost.total for e in evs)
    min_delay = min(e.mean_delay for e in evs)
    assert lower_bound(p, 1.0, 0.0)["bound"] <= min_cost * (1 + 1e-7) + 1e-9
    dl = lower_bound(p, 0.0, 1.0)["bound"]
    assert 0 < dl <= min_delay * (1 + 1e-7) + 1e-12
    # Under a cost cap: the least delay among placements costing at most the cap.
    cap = sorted(e.cost.total for e in evs)[len(evs) // 3]
    capped = min(e.mean_delay for e in evs if e.cost.total <= cap)
    capped_lb = lower_bound(p, 0.0, 1.0, cost_cap=cap)["bound"]
    assert dl * (1 - 1e-9) <= capped_lb <= capped * (1 + 1e-7) + 1e-12
    # A cap below the cost bound leaves nothing: infinite.
    assert lower_bound(p, 0.0, 1.0, cost_cap=0.5 * lower_bound(p, 1.0, 0.0)["bound"])["bound"] == math.inf


def _far_cheap_network(n: int = 80) -> Problem:
    """A star of ``n - 1`` leaves around hub "u" (the users); every leaf costs 1.0 per core-second,
    except "cheap", the last leaf, at 0.1, reached over a 1 ms link like the others, at no transfer cost.
    One function (0.5 core-s, 1 request/s, horizon 100 s: R = 100), no traffic: 50 on any leaf or the
    hub, 5 on "cheap", which is therefore the optimum (delay is not weighted)."""
    leaves = [f"l{i}" for i in range(n - 2)] + ["cheap"]
    nodes = (Node("u", cpu=4000, memory=1e12, cpu_cost=1.0),) + tuple(
        Node(x, cpu=4000, memory=1e12, cpu_cost=0.1 if x == "cheap" else 1.0) for x in leaves)
    links = tuple(Link("u", x, bandwidth=1e9, delay=0.001 * (1 + (x == "cheap")), cost_per_gb=0.0)
                  for x in leaves)
    app = Application("one", (Function("f", 0.5),), (), horizon=100.0)
    return Problem(Network(nodes, links), app, {"u": 1.0})


def test_candidates_hold_the_cheapest_processor_on_a_large_network():
    # Before: the 12 nearest nodes of each user came first and filled the candidates, so the cheapest
    # processor (slightly farther than every other leaf) was never one and the plan cost 50 instead of 5.
    p = _far_cheap_network()
    assert len(p.network.nodes) > heuristic.FULL_BELOW
    assert "cheap" in heuristic.candidates(p, k=12, near=12)
    plan = heuristic.solve(p)
    assert plan.functions == {"f": "cheap"}
    assert evaluate(p, plan).objective == pytest.approx(5.0)
    assert lower_bound(p)["bound"] == pytest.approx(5.0)


def _two_chains() -> tuple[Problem, Placement]:
    """Chain A (a0 -> ... -> a19) on "old", chain B (b0 -> ... -> b19) on "home", function x on "new".

    1 request/s, horizon 3600 s (R = 3600); every function 0.1 core-s (100m), every chain edge 1 GB per
    request; a full mesh of links at 0.195 per GB, so a split chain edge costs 3600 * 0.195 = 702.
    Processing per function: 360 * cpu_cost, i.e. 360 on old (1.0), 324 on new (0.9), 180 on home (0.5).
    home and old hold 20 functions each (2000m); new holds 21 (2100m) but old cannot hold x (memory).
    From the given plan, moving the first L functions of chain A to new saves 36 L and splits one edge
    (702): a loss for every L < 20 (36 * 19 = 684), a gain of 720 for the whole chain. No single move or
    swap gains, and exchanging old's and new's contents is impossible (x does not fit on old), so only a
    group move of all 20 functions improves; the optimum moves chain A to new: 20 * 360 + 20 * 180 + 324
    = 11,124 -> 20 * 324 + 20 * 180 + 324 = 10,404 (x stays on new: home and old are full)."""
    from remora.placement.model import Edge

    nodes = (Node("home", cpu=2000, memory=1e12, cpu_cost=0.5), Node("old", cpu=2000, memory=1e9, cpu_cost=1.0),
             Node("new", cpu=2100, memory=1e12, cpu_cost=0.9))
    names = [n.name for n in nodes]
    links = tuple(Link(a, b, bandwidth=1e12, delay=0.001, cost_per_gb=0.195)
                  for i, a in enumerate(names) for b in names[i + 1:])
    fs = [Function(f"{c}{i}", 0.1) for c in "ab" for i in range(20)] + [Function("x", 0.1, memory=2e9)]
    edges = tuple(Edge(f"{c}{i}", f"{c}{i + 1}", 1e9) for c in "ab" for i in range(19))
    p = Problem(Network(nodes, links), Application("two", tuple(fs), edges, horizon=3600.0), {"home": 1.0})
    start = Placement({**{f"a{i}": "old" for i in range(20)}, **{f"b{i}": "home" for i in range(20)}, "x": "new"}, {})
    return p, start


def test_group_move_pulls_a_cluster_longer_than_16_functions():
    # Before: group moves grew at most 16 functions, so chain A (20) stayed split from its cheaper node.
    import time

    import numpy as np

    from remora.placement.arrays import Compiled

    p, start = _two_chains()
    assert evaluate(p, start).objective == pytest.approx(11124.0)
    comp = Compiled(p)
    search = heuristic._Search(comp, 1.0)
    pf, ps = comp.indices(start)
    pf2, ps2, o = search.local_search(pf.copy(), ps.copy(), time.perf_counter() + 60, 0.0)
    assert o == pytest.approx(10404.0)
    assert {comp.placement(pf2, ps2, "x").functions[f"a{i}"] for i in range(20)} == {"new"}
    assert evaluate(p, heuristic.solve(p)).objective == pytest.approx(10404.0)
    assert lower_bound(p)["bound"] <= 10404.0 + 1e-6
    assert np.array_equal(pf, comp.indices(start)[0])
