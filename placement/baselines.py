"""Baselines the benchmarks compare against (docs/placement.md §8); each is capacity-aware but naive.

* ``random``: every function and state on a uniformly random node that still has room (seeded);
* ``nearest``: everything as close as possible (least delay) to the heaviest user node, filling nodes in
  order of distance: what "run it at the edge next to the users" gives, blind to prices and images;
* ``stateless``: the heuristic run on the application with its state accesses removed (placement that
  ignores where state lives), with the state kept where storage is cheapest, as a remote data store.
"""
from __future__ import annotations

import dataclasses
import random as _random

import numpy as np

from .mip import Infeasible
from .model import Placement, Problem


class _Room:
    def __init__(self, problem: Problem):
        self.p = problem
        self.cpu = {n.name: n.cpu for n in problem.network.nodes}
        self.mem = {n.name: n.memory for n in problem.network.nodes}
        self.sto = {n.name: n.storage for n in problem.network.nodes}

    def fits_f(self, f, node: str) -> bool:
        n = self.p.network.node(node)
        return self.p.cpu_demand(f, n) <= self.cpu[node] * (1 + 1e-9) and f.memory <= self.mem[node] * (1 + 1e-9)

    def put_f(self, f, node: str) -> None:
        self.cpu[node] -= self.p.cpu_demand(f, self.p.network.node(node))
        self.mem[node] -= f.memory

    def fits_s(self, s, node: str) -> bool:
        return s.size <= self.sto[node] * (1 + 1e-9)

    def put_s(self, s, node: str) -> None:
        self.sto[node] -= s.size


def _reachable(problem: Problem) -> list[str]:
    """Nodes reachable from the heaviest user node (placing elsewhere is never useful)."""
    net = problem.network
    users = sorted(((r, u) for u, r in problem.users.items()), reverse=True)
    if not users:
        return [n.name for n in net.nodes]
    D = problem.paths.row(net.index[users[0][1]])[0]
    return [n.name for i, n in enumerate(net.nodes) if np.isfinite(D[i])]


def random_placement(problem: Problem, seed: int = 0) -> Placement:
    rng = _random.Random(seed)
    room = _Room(problem)
    nodes = _reachable(problem)
    pf, ps = {}, {}
    for f in problem.app.functions:
        ok = [n for n in nodes if room.fits_f(f, n)]
        if not ok:
            raise Infeasible(f"random: no node has room for function {f.name!r}")
        pf[f.name] = rng.choice(ok)
        room.put_f(f, pf[f.name])
    for s in problem.app.states:
        ok = [n for n in nodes if room.fits_s(s, n)]
        if not ok:
            raise Infeasible(f"random: no node has room for state {s.name!r}")
        ps[s.name] = rng.choice(ok)
        room.put_s(s, ps[s.name])
    return Placement(pf, ps, "random", {"seed": seed})


def nearest(problem: Problem) -> Placement:
    net = problem.network
    users = sorted(((r, u) for u, r in problem.users.items()), reverse=True)
    origin = users[0][1] if users else net.nodes[0].name
    D = problem.paths.row(net.index[origin])[0]
    order = [net.nodes[i].name for i in np.argsort(D, kind="stable") if np.isfinite(D[i])]
    room = _Room(problem)
    pf, ps = {}, {}
    for name in problem.app.topo_order:
        f = problem.app.function(name)
        node = next((n for n in order if room.fits_f(f, n)), None)
        if node is None:
            raise Infeasible(f"nearest: no node has room for function {name!r}")
        pf[name] = node
        room.put_f(f, node)
    for s in problem.app.states:
        node = next((n for n in order if room.fits_s(s, n)), None)
        if node is None:
            raise Infeasible(f"nearest: no node has room for state {s.name!r}")
        ps[s.name] = node
        room.put_s(s, node)
    return Placement(pf, ps, "nearest", {"origin": origin})


def stateless(problem: Problem, time_budget: float = 8.0) -> Placement:
    from . import heuristic

    app = problem.app
    blind = Problem(problem.network, dataclasses.replace(app, states=(), accesses=()), problem.users)
    blind.__dict__["_paths"] = problem.paths  # same routing; do not recompute it
    plan = heuristic.solve(blind, time_budget=time_budget)
    room = _Room(problem)
    nodes = _reachable(problem)
    for name, node in plan.functions.items():
        room.put_f(app.function(name), node)
    ps = {}
    for s in app.states:
        ok = sorted((n for n in nodes if room.fits_s(s, n)), key=lambda n: problem.network.node(n).storage_cost)
        if not ok:
            raise Infeasible(f"stateless: no node has room for state {s.name!r}")
        ps[s.name] = ok[0]
        room.put_s(s, ok[0])
    return Placement(dict(plan.functions), ps, "stateless", {})
