"""Instance builders for the placement tests (small hand-made ones and random ones of any size).

Kept here rather than in remora.placement.generators (another module) so that these tests only depend
on the model: every instance is a plain :class:`Problem`.
"""
from __future__ import annotations

import itertools
import math
import random

from remora.placement.model import (
    Access,
    Application,
    Edge,
    Function,
    Image,
    Link,
    Network,
    Node,
    Placement,
    Problem,
    State,
    evaluate,
)


def random_problem(seed: int, N: int = 3, F: int = 3, S: int = 1, delay_weight=None, delay_bound=None,
                   tight: bool = False) -> Problem:
    r = random.Random(seed)
    cap = (lambda: r.choice([300, 600, 1000])) if tight else (lambda: r.choice([1000, 2000, 4000]))
    nodes = tuple(Node(f"n{i}", cpu=cap(), memory=r.choice([1e9, 2e9]), speed=r.choice([1, 2]),
                       cpu_cost=r.uniform(0.5, 2), storage_cost=r.uniform(0, 1), deploy_cost=r.uniform(0, 2),
                       cached=frozenset(r.sample(["a", "b", "c", "d"], 2)), pos=(r.random(), r.random()))
                  for i in range(N))
    links = tuple(Link(f"n{i}", f"n{j}", r.uniform(1e6, 1e8), r.uniform(0.001, 0.02), r.uniform(0, 1))
                  for i in range(N) for j in range(i + 1, N) if r.random() < 0.8 or j == i + 1)
    fs = tuple(Function(f"f{i}", r.uniform(0.01, 0.1), r.uniform(2e8, 8e8), image=r.choice(["i1", "i2"]))
               for i in range(F))
    edges = tuple(Edge(f"f{i}", f"f{j}", r.uniform(1e4, 1e6)) for i in range(F) for j in range(i + 1, F)
                  if r.random() < 0.6)
    states = tuple(State(f"s{i}", r.uniform(1e8, 1e9)) for i in range(S))
    acc = tuple(Access(f.name, s.name, r.uniform(0, 1e5), r.uniform(0, 1e5)) for f in fs for s in states
                if r.random() < 0.6)
    images = {"i1": Image("i1", (("a", 3e8), ("b", 2e8))), "i2": Image("i2", (("b", 2e8), ("c", 5e8), ("e", 1e8)))}
    app = Application("t", fs, edges, states, acc, images, request_bytes=1e4, response_bytes=1e4,
                      delay_weight=r.choice([0, 100]) if delay_weight is None else delay_weight,
                      delay_bound=delay_bound, horizon=60)
    users = {f"n{i}": r.uniform(0, 3) for i in range(N) if r.random() < 0.7} or {"n0": 1.0}
    return Problem(Network(nodes, links), app, users)


def brute_force(problem: Problem) -> tuple[float, Placement | None]:
    """The optimum by enumeration (N^(F+S) placements: tiny instances only)."""
    import itertools

    names = [n.name for n in problem.network.nodes]
    fn = [f.name for f in problem.app.functions]
    sn = [s.name for s in problem.app.states]
    best: tuple[float, Placement | None] = (math.inf, None)
    for fa in itertools.product(names, repeat=len(fn)):
        for sa in itertools.product(names, repeat=len(sn)):
            pl = Placement(dict(zip(fn, fa)), dict(zip(sn, sa)))
            ev = evaluate(problem, pl)
            if ev.feasible and ev.objective < best[0]:
                best = (ev.objective, pl)
    return best


def large_problem(seed: int, N: int = 1000, F: int = 100, S: int = 20, users: int = 50) -> Problem:
    """A Waxman edge network of N nodes and a layered DAG of F functions with S states."""
    import networkx as nx

    r = random.Random(seed)
    g = nx.waxman_graph(N, beta=0.4, alpha=0.08, seed=seed)
    comps = list(nx.connected_components(g))
    for a, b in itertools.pairwise(comps):  # connect the pieces into one network
        g.add_edge(next(iter(a)), next(iter(b)))
    nodes = tuple(Node(f"e{i}", cpu=r.choice([4000, 8000, 16000]), memory=r.choice([8e9, 16e9, 32e9]),
                       speed=r.choice([1.0, 1.5, 2.0]), cpu_cost=r.uniform(0.5, 2.0) * 1e-4,
                       storage_cost=r.uniform(0.01, 0.1), deploy_cost=r.uniform(0.01, 0.05),
                       pos=tuple(g.nodes[i]["pos"])) for i in range(N))
    links = []
    for a, b in g.edges:
        (xa, ya), (xb, yb) = g.nodes[a]["pos"], g.nodes[b]["pos"]
        dist = math.hypot(xa - xb, ya - yb)
        links.append(Link(f"e{a}", f"e{b}", r.choice([12.5e6, 125e6, 1.25e9]), 0.001 + 0.05 * dist,
                          0.01 + 0.1 * dist))
    fs, edges = [], []
    layers = max(3, int(math.sqrt(F)))
    for i in range(F):
        fs.append(Function(f"f{i}", r.uniform(0.002, 0.02), r.uniform(1e8, 1e9), image=f"img{i % 10}"))
    for i in range(1, F):
        j = r.randrange(max(0, i - layers), i)
        edges.append(Edge(f"f{j}", f"f{i}", r.uniform(1e3, 1e5)))
    states = [State(f"s{i}", r.uniform(1e8, 5e9)) for i in range(S)]
    acc = [Access(f"f{r.randrange(F)}", s.name, r.uniform(1e3, 1e5), r.uniform(0, 1e4))
           for s in states for _ in range(3)]
    images = {f"img{k}": Image(f"img{k}", tuple((f"sha256:{k}-{c}", int(r.uniform(1e6, 5e7))) for c in range(20))
                               + tuple((f"sha256:base-{c}", int(2e7)) for c in range(10)), "remora") for k in range(10)}
    app = Application("big", tuple(fs), tuple(edges), tuple(states), tuple(acc), images, request_bytes=1e4,
                      response_bytes=1e4, delay_weight=10.0, horizon=3600)
    us = {f"e{i}": r.uniform(0.5, 5.0) for i in r.sample(range(N), users)}
    return Problem(Network(nodes, tuple(links)), app, us)
