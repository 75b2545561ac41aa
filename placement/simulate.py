"""Request-level simulation of a placement under sampled link delays.

Why: the model (:mod:`remora.placement.model`) judges a placement by *mean* link delays. Real links
jitter and drift, and the delay of a request is a max over DAG paths, so the mean of the request
delay is not the request delay at mean link delays (Jensen: it is larger). The simulator draws one
delay per link per request and replays the model's delay recursion on it, giving the distribution
(mean, p50, p95, p99, share over the bound) a user would see.

Fixed routes. Routes are the least-delay paths at the *declared* delays, exactly the ones
:class:`~remora.placement.model.PathTable` uses; a sampled delay changes how long a packet takes on a
route, not which route it takes (IP routing does not chase per-packet jitter). So at the declared
means the simulator's delay equals ``model.request_delay`` (tested), and the delay of a request is
a max-plus expression in the link-delay vector ``x``:

    term(x)  = const + r . x        (r counts how often each link is crossed: 1 per transfer,
                                     2 per state access round trip)
    delay(x) = max over entry->exit DAG paths of the sum of its terms

:class:`DelayEvaluator` compiles every term of many placements into one sparse matrix, so evaluating
K placements on R rounds of sampled delays is one sparse product plus a DP over the DAG vectorised
over (R, K): what the online learner and the hindsight regret need at 10,000 rounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix

from remora.errors import InvalidInput

from .generators import DelayProcess
from .model import Placement, Problem, evaluate


class Router:
    """Least-delay routes at declared delays, as link-index lists: the routes of the problem's own
    :class:`~remora.placement.model.PathTable` (its Dijkstra predecessors, computed once and shared
    with the model's evaluation), so the simulator and the model cannot route differently."""

    def __init__(self, problem: Problem):
        net = problem.network
        self.paths = problem.paths
        self.index = net.index
        self.n = len(net.nodes)
        self.link_of = self.paths.link_of
        self.graph = self.paths.graph
        self.bw = np.array([link.bandwidth for link in net.links], dtype=float)
        self.declared = np.array([link.delay for link in net.links], dtype=float)

    def route(self, a: str, b: str) -> list[int]:
        """Link indices from a to b (empty when a == b); raises InvalidInput when unreachable."""
        try:
            return self.paths.route(a, b)
        except ValueError as e:
            raise InvalidInput(str(e)) from None

    def transfer_term(self, a: str, b: str, nbytes: float, trips: int = 1) -> tuple[float, list[int]]:
        """(constant seconds, links crossed) of moving ``nbytes`` a -> b (``trips`` 2 for an access)."""
        if a == b:
            return 0.0, []
        links = self.route(a, b)
        bottleneck = min(self.bw[k] for k in links)
        const = (nbytes / bottleneck) if nbytes > 0 else 0.0
        return const, links * trips


class DelayEvaluator:
    """Request delays of K placements for any link-delay vectors, vectorised (see module doc)."""

    def __init__(self, problem: Problem, placements: list[Placement], users: list[str] | None = None,
                 router: Router | None = None):
        if not placements:
            raise InvalidInput("DelayEvaluator needs at least one placement")
        self.problem = problem
        self.router = router or Router(problem)
        app = problem.app
        self.users = list(users if users is not None else problem.users)
        self.funcs = app.topo_order
        self.fidx = {f: i for i, f in enumerate(self.funcs)}
        self.edges = [(self.fidx[e.src], self.fidx[e.dst]) for e in app.edges]
        self.preds: list[list[int]] = [[] for _ in self.funcs]
        for k, (_, d) in enumerate(self.edges):
            self.preds[d].append(k)
        self.entries = [self.fidx[f] for f in app.entries]
        self.exits = [self.fidx[f] for f in app.exits]
        self.L = len(problem.network.links)
        self.K = 0
        self._rows: list[dict[int, float]] = []
        self._const: list[float] = []
        self._own: list[list[int]] = []
        self._edge: list[list[int]] = []
        self._in: list[list[list[int]]] = []
        self._out: list[list[list[int]]] = []
        self.placements: list[Placement] = []
        for p in placements:
            self._add(p)
        self._compile()

    def _term(self, const: float, links: list[int]) -> int:
        row: dict[int, float] = {}
        for k in links:
            row[k] = row.get(k, 0.0) + 1.0
        self._rows.append(row)
        self._const.append(const)
        return len(self._rows) - 1

    def _add(self, placement: Placement) -> None:
        app, rt, p, ps = self.problem.app, self.router, placement.functions, placement.states
        speed = {n.name: n.speed for n in self.problem.network.nodes}
        acc: dict[str, tuple[float, list[int]]] = {f: (0.0, []) for f in self.funcs}
        for a in app.accesses:
            c, links = rt.transfer_term(p[a.function], ps[a.state], a.read + a.write, trips=2)
            c0, l0 = acc[a.function]
            acc[a.function] = (c0 + c, l0 + links)
        fn = {f.name: f for f in app.functions}
        self._own.append([self._term(fn[f].cpu / speed[p[f]] + acc[f][0], acc[f][1]) for f in self.funcs])
        self._edge.append([self._term(*rt.transfer_term(p[e.src], p[e.dst], e.bytes)) for e in app.edges])
        self._in.append([[self._term(*rt.transfer_term(u, p[self.funcs[j]], app.request_bytes)) for j in self.entries]
                         for u in self.users])
        self._out.append([[self._term(*rt.transfer_term(p[self.funcs[h]], u, app.response_bytes)) for h in self.exits]
                          for u in self.users])
        self.placements.append(placement)
        self.K += 1

    def add(self, placement: Placement) -> int:
        """Append one placement (index returned); recompiles the matrix."""
        self._add(placement)
        self._compile()
        return self.K - 1

    def _compile(self) -> None:
        data, ri, ci = [], [], []
        for r, row in enumerate(self._rows):
            for k, v in row.items():
                ri.append(r)
                ci.append(k)
                data.append(v)
        self.M = csr_matrix((data, (ri, ci)), shape=(len(self._rows), self.L))
        self.MT = self.M.T.tocsr()
        self.c = np.array(self._const)
        self.own_idx = np.array(self._own, dtype=int).reshape(self.K, len(self.funcs))
        self.edge_idx = np.array(self._edge, dtype=int).reshape(self.K, len(self.edges))
        self.in_idx = np.array(self._in, dtype=int).reshape(self.K, len(self.users), len(self.entries))
        self.out_idx = np.array(self._out, dtype=int).reshape(self.K, len(self.users), len(self.exits))
        # the links each (placement, user) request crosses: what a learner observes when it plays it
        used = np.zeros((self.K, len(self.users), self.L), dtype=bool)
        touched = self.M.tolil().rows
        for k in range(self.K):
            common = {c for t in list(self.own_idx[k]) + list(self.edge_idx[k]) for c in touched[t]}
            for u in range(len(self.users)):
                links = set(common)
                for t in list(self.in_idx[k, u]) + list(self.out_idx[k, u]):
                    links.update(touched[t])
                used[k, u, sorted(links)] = True
        self.used = used

    def delays(self, X: np.ndarray, user_idx) -> np.ndarray:
        """Delay (seconds) of every placement for each row of ``X`` (rounds x links).

        ``user_idx``: the user (index into ``self.users``) whose request each round carries, an int
        array of length R (or one int for all rounds). Returns an (R, K) array.
        """
        X = np.atleast_2d(np.asarray(X, dtype=float))
        R = X.shape[0]
        T = np.asarray(X @ self.MT) + self.c   # (R, terms)
        u = np.broadcast_to(np.asarray(user_idx, dtype=int), (R,))
        rr = np.arange(R)[:, None, None]
        inn = T[rr, self.in_idx[:, u, :].transpose(1, 0, 2)]     # (R, K, entries)
        out = T[rr, self.out_idx[:, u, :].transpose(1, 0, 2)]    # (R, K, exits)
        own = T[:, self.own_idx]                                  # (R, K, F)
        edge = T[:, self.edge_idx]                                # (R, K, E)
        finish = np.empty_like(own)
        entry_pos = {f: j for j, f in enumerate(self.entries)}
        for f in range(len(self.funcs)):
            if self.preds[f]:
                ready = None
                for e in self.preds[f]:
                    cand = finish[:, :, self.edges[e][0]] + edge[:, :, e]
                    ready = cand if ready is None else np.maximum(ready, cand)
            else:
                ready = inn[:, :, entry_pos[f]]
            finish[:, :, f] = ready + own[:, :, f]
        res = None
        for j, h in enumerate(self.exits):
            cand = finish[:, :, h] + out[:, :, j]
            res = cand if res is None else np.maximum(res, cand)
        return res


    def delays_all_users(self, x: np.ndarray) -> np.ndarray:
        """Delay of every (user, placement) at one link-delay vector ``x``: a (U, K) array.

        The online learners call this every round; the link terms are computed once for all users
        (only the entry/exit transfers differ per user), which is U times less work than ``delays``.
        """
        T = self.M @ np.asarray(x, dtype=float) + self.c
        own = T[self.own_idx]                       # (K, F)
        edge = T[self.edge_idx]                     # (K, E)
        inn = T[self.in_idx].transpose(1, 0, 2)     # (U, K, entries)
        out = T[self.out_idx].transpose(1, 0, 2)    # (U, K, exits)
        finish: list = [None] * len(self.funcs)
        entry_pos = {f: j for j, f in enumerate(self.entries)}
        for f in range(len(self.funcs)):
            if self.preds[f]:
                ready = None
                for e in self.preds[f]:
                    cand = finish[self.edges[e][0]] + edge[:, e]
                    ready = cand if ready is None else np.maximum(ready, cand)
            else:
                ready = inn[:, :, entry_pos[f]]
            finish[f] = ready + own[:, f]
        res = None
        for j, h in enumerate(self.exits):
            cand = finish[h] + out[:, :, j]
            res = cand if res is None else np.maximum(res, cand)
        return np.broadcast_to(res, (len(self.users), self.K))


@dataclass
class SimResult:
    """What users of one placement saw over a trace (seconds), plus the model's cost for reference."""

    requests: int
    mean: float
    p50: float
    p95: float
    p99: float
    max: float
    over_bound: float          # share of requests slower than the application's delay bound (0 if none)
    mean_at_declared: float    # the model's mean delay (declared link delays), for the Jensen gap
    cost: float
    per_user: dict[str, float]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def simulate(problem: Problem, placement: Placement, trace: list[tuple[float, str]] | None = None, *,
             delays: DelayProcess | None = None, requests: int = 10_000, seed=0,
             batch: int = 4096) -> SimResult:
    """Replay ``trace`` (``(time, user node)``; default: ``requests`` draws by user rate) on ``placement``.

    Request i sees link delays ``delays.sample`` row i; the default process is stationary, centred on
    the declared means, with each link's ``delay_std`` (gamma-distributed, mean preserved).
    """
    users = list(problem.users)
    if not users:
        raise InvalidInput("simulate needs at least one user node with a rate")
    rng = np.random.default_rng(seed)
    if trace is None:
        rates = np.array([problem.users[u] for u in users], dtype=float)
        who = rng.choice(len(users), size=requests, p=rates / rates.sum())
    else:
        pos = {u: i for i, u in enumerate(users)}
        try:
            who = np.array([pos[u] for _, u in trace], dtype=int)
        except KeyError as e:
            raise InvalidInput(f"trace names user node {e.args[0]!r} that has no rate in the problem") from None
    n = len(who)
    if n == 0:
        raise InvalidInput("simulate needs at least one request")
    ev = DelayEvaluator(problem, [placement], users)
    if delays is None:
        declared = ev.router.declared
        std = np.array([link.delay_std for link in problem.network.links], dtype=float)
        cv2 = np.where(std > 0, (std / np.maximum(declared, 1e-15)) ** 2, 1e-6)
        delays = DelayProcess(np.maximum(declared, 1e-12), rng, mismatch=0.0, shape=float(1.0 / np.mean(cv2)),
                              horizon=max(n, 1))
    out = np.empty(n)
    for s in range(0, n, batch):
        e = min(n, s + batch)
        out[s:e] = ev.delays(delays.sample(e - s, start=s), who[s:e])[:, 0]
    model_ev = evaluate(problem, placement)
    bound = problem.app.delay_bound
    per_user = {u: float(out[who == i].mean()) for i, u in enumerate(users) if (who == i).any()}
    return SimResult(requests=n, mean=float(out.mean()), p50=float(np.percentile(out, 50)),
                     p95=float(np.percentile(out, 95)), p99=float(np.percentile(out, 99)), max=float(out.max()),
                     over_bound=float((out > bound).mean()) if bound else 0.0,
                     mean_at_declared=model_ev.mean_delay, cost=model_ev.cost.total if math.isfinite(
                         model_ev.cost.total) else math.inf, per_user=per_user)
