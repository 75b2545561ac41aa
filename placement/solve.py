"""One interface to every placement algorithm: ``solve(problem, algorithm=...) -> Placement``.

The registry maps a name to a function ``(problem, **options) -> Placement``; the CLI, the benchmarks
and the tests go through it, so a new algorithm is one entry here. Each returned placement carries its
algorithm's name and ``meta['seconds']`` (planning time, measured here when the algorithm does not).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from remora.errors import UsageError

from .model import Placement, Problem


def _mip(problem: Problem, **kw) -> Placement:
    from . import mip
    return mip.solve(problem, **kw)


def _heuristic(problem: Problem, **kw) -> Placement:
    from . import heuristic
    return heuristic.solve(problem, **kw)


def _approx(problem: Problem, **kw) -> Placement:
    from . import approx
    return approx.solve(problem, **kw)


def _random(problem: Problem, **kw) -> Placement:
    from . import baselines
    return baselines.random_placement(problem, **kw)


def _nearest(problem: Problem, **kw) -> Placement:
    from . import baselines
    return baselines.nearest(problem, **kw)


def _stateless(problem: Problem, **kw) -> Placement:
    from . import baselines
    return baselines.stateless(problem, **kw)


ALGORITHMS: dict[str, tuple[Callable[..., Placement], str]] = {
    "heuristic": (_heuristic, "greedy + local search on candidate nodes (fast, default)"),
    "mip": (_mip, "exact mixed-integer program with HiGHS (small instances)"),
    "approx": (_approx, "LP relaxation of the flow formulation + threshold rounding + repair"),
    "random": (_random, "baseline: random nodes with room"),
    "nearest": (_nearest, "baseline: as near the heaviest users as capacity allows"),
    "stateless": (_stateless, "baseline: heuristic blind to state, state on the cheapest storage"),
}


def register(name: str, fn: Callable[..., Placement], description: str = "") -> None:
    """Add an algorithm (e.g. an online learner's current plan) under ``name``."""
    ALGORITHMS[name] = (fn, description)


def solve(problem: Problem, algorithm: str = "heuristic", **options) -> Placement:
    try:
        fn = ALGORITHMS[algorithm][0]
    except KeyError:
        raise UsageError(f"unknown algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})") from None
    start = time.perf_counter()
    plan = fn(problem, **options)
    plan.algorithm = plan.algorithm or algorithm
    plan.meta.setdefault("seconds", time.perf_counter() - start)
    return plan
