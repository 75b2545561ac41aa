"""Instances small enough to solve by hand; the optimum of each is derived in its docstring."""
from __future__ import annotations

import dataclasses

from remora.placement.model import (
    Access,
    Application,
    Edge,
    Function,
    Link,
    Network,
    Node,
    Problem,
    State,
)


def two_nodes(delay_weight: float = 0.0, delay_bound: float | None = None) -> Problem:
    """Nodes "near" (the users, 1 request/s) and "far", one link: 1 MB/s, 10 ms, 10 per GB.

    near: 150m CPU, speed 1, 0.5 per core-second, storage 3.6 per GB-hour.  far: 4000m, speed 2, 1.0 per
    core-second, free storage. Horizon 1000 s, so R = 1000 requests.
    Functions f -> g (0.1 core-second each; f sends g 1 MB), state s (1 GB) read by g (1 MB/request).
      processing: f or g on near 1000*0.1*0.5 = 50 (uses 100m, so only one fits), on far 100
      transfer f->g when split: 1000 * 0.001 GB * 10 = 10; g<->s when split: 10
      storage of s: near 1 GB * 3.6 * 1000/3600 = 1, far 0
    (f, g, s) cost:  (near, far, far) = 50+100+10 = 160 <- optimum without delay terms
                     (far, near, near) = 100+50+10+1 = 161;  (near, far, near) = 171;  (far, near, far) = 170
                     (far, far, far) = 200;  (far, far, near) = 211;  f and g both on near: no capacity.
    Delay of a request (s): (near, far, far) = 0.1 (f) + 1.01 (1 MB over 1 MB/s + 10 ms) + 0.05 (g at
      speed 2) + 0.01 (answer back) = 1.17;  (far, near, near) = 0.01+0.05+1.01+0.1 = 1.17;
      (far, far, far) = 0.01 + 0.05 + 0.05 + 0.01 = 0.12;  (far, far, near) = 0.12 + 2*0.01 + 1.0 = 1.14.
    With delay_weight 50: (far,far,far) = 200 + 6 = 206 beats 160 + 58.5 and 161 + 58.5  -> optimum 206.
    With delay_bound 1 s: only (far, far, far) meets it (others >= 1.14 s)            -> optimum 200.
    """
    nodes = (Node("near", cpu=150, memory=1e9, speed=1.0, cpu_cost=0.5, storage_cost=3.6),
             Node("far", cpu=4000, memory=4e9, speed=2.0, cpu_cost=1.0, storage_cost=0.0))
    links = (Link("near", "far", bandwidth=1e6, delay=0.01, cost_per_gb=10.0),)
    app = Application("hand", (Function("f", 0.1), Function("g", 0.1)), (Edge("f", "g", 1e6),),
                      (State("s", 1e9),), (Access("g", "s", read=1e6),), horizon=1000.0,
                      delay_weight=delay_weight, delay_bound=delay_bound)
    return Problem(Network(nodes, links), app, {"near": 1.0})


OPT_PLAIN = ({"f": "near", "g": "far"}, {"s": "far"}, 160.0)
OPT_WEIGHTED = ({"f": "far", "g": "far"}, {"s": "far"}, 206.0)
OPT_BOUNDED = ({"f": "far", "g": "far"}, {"s": "far"}, 200.0)


def state_matters() -> Problem:
    """Where the state lives decides everything (the stateless baseline's blind spot).

    Three nodes on a line a - b - c, each link 100 MB/s, 1 ms, 1 per GB; users at a (1 request/s),
    horizon 1000 s (R = 1000). One function h (0.01 core-s; cpu cost 1 on a and c, 3 on b; 10m CPU)
    reads 100 MB per request of state "db" (1 GB), whose storage costs 0 on a and b and 1000 per
    GB-hour on c (so c: 1000*1000/3600 = 277.8).
      h on x, db on y: processing 1000*0.01*cost(x) (10 on a/c, 30 on b),
      access transfer 1000 * 0.1 GB * hops(x,y) * 1 = 100 per hop.
    Optimum: h and db on a: 10 + 0 + 0 = 10.  The stateless baseline places h without looking at db
    (h on a or c, 10 either way) and db on the cheapest storage (a or b, both 0; ties broken by node
    order -> a): with node order (b, a, c) it puts db on b: 10 + 100 = 110.
    """
    nodes = (Node("b", cpu=1000, memory=1e9, cpu_cost=3.0, storage_cost=0.0),
             Node("a", cpu=1000, memory=1e9, cpu_cost=1.0, storage_cost=0.0),
             Node("c", cpu=1000, memory=1e9, cpu_cost=1.0, storage_cost=1000.0))
    links = (Link("a", "b", 1e8, 0.001, 1.0), Link("b", "c", 1e8, 0.001, 1.0))
    app = Application("state", (Function("h", 0.01),), (), (State("db", 1e9),), (Access("h", "db", read=1e8),),
                      horizon=1000.0)
    return Problem(Network(nodes, links), app, {"a": 1.0})


def uniform_metric(problem: Problem, cost_per_gb: float = 1.0) -> Problem:
    """The same problem on a full mesh with equal transfer cost between any two nodes (§7.3's case)."""
    names = [n.name for n in problem.network.nodes]
    links = tuple(Link(a, b, 1e8, 0.001, cost_per_gb) for i, a in enumerate(names) for b in names[i + 1:])
    nodes = tuple(dataclasses.replace(n, cpu=1e12, memory=1e18) for n in problem.network.nodes)
    app = dataclasses.replace(problem.app, delay_weight=0.0, delay_bound=None)
    return Problem(Network(nodes, links), app, dict(problem.users))
