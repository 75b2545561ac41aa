"""A numeric view of a :class:`Problem` restricted to candidate nodes, shared by every algorithm.

The MIP, the LP relaxation and the heuristic all need the same coefficients (processing cost of function
f on candidate k, transfer time of edge e between candidates i and j, deployment bytes of image-part group
g on k, ...). Computing them once, as numpy arrays over K candidate nodes, keeps the algorithms short and
makes them agree with :func:`remora.placement.model.evaluate` (tests check that they do).

Routing needs only one Dijkstra per candidate: links are undirected, so the user -> candidate and
candidate -> user distances are read from the candidates' rows.
"""
from __future__ import annotations

import math

import numpy as np

from .model import GB, Placement, Problem


class Compiled:
    def __init__(self, problem: Problem, candidates: list[str] | None = None):
        self.problem = problem
        net, app = problem.network, problem.app
        idx = net.index
        self.cand = list(candidates) if candidates is not None else [n.name for n in net.nodes]
        K = self.K = len(self.cand)
        nodes = [net.node(c) for c in self.cand]
        pt = problem.paths
        ci = [idx[c] for c in self.cand]
        rows = [pt.row(i) for i in ci]
        self.D = np.array([r[0][ci] for r in rows])
        self.B = np.array([r[1][ci] for r in rows])
        self.C = np.array([r[2][ci] for r in rows])
        np.fill_diagonal(self.D, 0.0)
        np.fill_diagonal(self.B, np.inf)
        np.fill_diagonal(self.C, 0.0)
        self.users = [u for u, r in problem.users.items() if r > 0]
        ui = [idx[u] for u in self.users]
        self.rate = np.array([problem.users[u] for u in self.users], dtype=float)
        lam = self.rate.sum()
        self.wu = self.rate / lam if lam > 0 else self.rate
        # Candidate k -> user u (same as u -> k on an undirected graph); zero when u is the candidate.
        uix = np.array(ui, dtype=int)
        self.Du = np.array([r[0][uix] for r in rows]).T.reshape(len(ui), K)
        self.Bu = np.array([r[1][uix] for r in rows]).T.reshape(len(ui), K)
        self.Cu = np.array([r[2][uix] for r in rows]).T.reshape(len(ui), K)
        for a, u in enumerate(self.users):
            if u in self.cand:
                k = self.cand.index(u)
                self.Du[a, k], self.Bu[a, k], self.Cu[a, k] = 0.0, np.inf, 0.0

        self.fnames = [f.name for f in app.functions]
        self.snames = [s.name for s in app.states]
        fi = {n: i for i, n in enumerate(self.fnames)}
        si = {n: i for i, n in enumerate(self.snames)}
        F, S = len(self.fnames), len(self.snames)
        R, H = problem.requests, app.horizon
        self.cpu_cost = np.array([n.cpu_cost for n in nodes])
        self.speed = np.array([n.speed for n in nodes])
        self.cap_cpu = np.array([n.cpu for n in nodes])
        self.cap_mem = np.array([n.memory for n in nodes])
        self.cap_sto = np.array([n.storage for n in nodes])
        self.cpu_dem = np.array([[problem.cpu_demand(f, n) for n in nodes] for f in app.functions]).reshape(F, K)
        self.mem = np.array([f.memory for f in app.functions])
        self.size = np.array([s.size for s in app.states])
        self.proc_delay = np.array([[f.cpu / n.speed for n in nodes] for f in app.functions]).reshape(F, K)
        self.entries = [fi[n] for n in app.entries]
        self.exits = [fi[n] for n in app.exits]
        # Node-linear costs (processing + user traffic) and storage costs.
        self.lin_f = np.array([[R * f.cpu * n.cpu_cost for n in nodes] for f in app.functions]).reshape(F, K)
        users_req = (H * self.rate[:, None] * self.Cu).sum(axis=0) if len(ui) else np.zeros(K)
        for f in self.entries:
            self.lin_f[f] += users_req * app.request_bytes / GB
        for h in self.exits:
            self.lin_f[h] += users_req * app.response_bytes / GB
        self.lin_s = np.array([[s.size / GB * n.storage_cost * H / 3600.0 for n in nodes]
                               for s in app.states]).reshape(S, K)
        # Request entry/exit times per user and candidate.
        with np.errstate(divide="ignore", invalid="ignore"):
            self.t_req = self.Du + np.where(app.request_bytes > 0, app.request_bytes / self.Bu, 0.0)
            self.t_resp = self.Du + np.where(app.response_bytes > 0, app.response_bytes / self.Bu, 0.0)
        # Edges and accesses: cost weight per GB-of-C and time matrices.
        self.edges = [(fi[e.src], fi[e.dst], e.bytes) for e in app.edges]
        self.e_cost = np.array([R * b / GB for _, _, b in self.edges])
        self.e_time = [self._tmat(b, 1.0) for _, _, b in self.edges]
        self.acc = [(fi[a.function], si[a.state], a.read + a.write) for a in app.accesses]
        self.a_cost = np.array([R * rw / GB for _, _, rw in self.acc])
        self.a_time = [self._tmat(rw, 2.0) for _, _, rw in self.acc]
        self.preds: list[list[int]] = [[] for _ in range(F)]  # edge indices into self.edges
        for ei, (_g, f, _) in enumerate(self.edges):
            self.preds[f].append(ei)
        self.f_acc: list[list[int]] = [[] for _ in range(F)]
        for ai, (f, _s, _) in enumerate(self.acc):
            self.f_acc[f].append(ai)
        order = app.topo_order
        self.topo = [fi[n] for n in order]
        self.groups, self.g_cost = deployment_groups(app, nodes)
        self.f_groups: list[list[int]] = [[] for _ in range(F)]
        for g, members in enumerate(self.groups):
            for f in members:
                self.f_groups[f].append(g)
        self.delay_bound = app.delay_bound
        self.delay_weight = app.delay_weight
        self.needs_delay = app.delay_bound is not None or app.delay_weight > 0
        self._epos = {f: i for i, f in enumerate(self.entries)}
        self._lists = None

    def _tmat(self, nbytes: float, trips: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = trips * self.D + (nbytes / self.B if nbytes > 0 else 0.0)
        t = np.where(self.B > 0, t, np.inf)
        np.fill_diagonal(t, 0.0)
        return t

    # -------------------------------------------------------------------------------------------
    def cost(self, pf: np.ndarray, ps: np.ndarray) -> float:
        """Total cost of assignment ``pf`` (function -> candidate index) and ``ps`` (state -> index)."""
        F = len(pf)
        c = float(self.lin_f[np.arange(F), pf].sum()) + float(self.lin_s[np.arange(len(ps)), ps].sum())
        for ei, (g, f, _) in enumerate(self.edges):
            c += self.e_cost[ei] * self.C[pf[g], pf[f]]
        for ai, (f, s, _) in enumerate(self.acc):
            c += self.a_cost[ai] * self.C[pf[f], ps[s]]
        for g, members in enumerate(self.groups):
            for k in {int(pf[f]) for f in members}:
                c += self.g_cost[g, k]
        return c

    def delays(self, pf: np.ndarray, ps: np.ndarray) -> np.ndarray:
        """Per-user request delay (seconds).

        Only the entry transfer depends on the user, so the critical path is computed once per entry
        function (longest path L_e(h) from entry e's start to exit h's finish, plain floats) and then
        delay(u) = max_(e,h) t_req[u, p(e)] + L_e(h) + t_resp[u, p(h)], vectorised over users.
        """
        U = len(self.users)
        ne = len(self.entries)
        if self._lists is None:  # python lists index ~5x faster than numpy scalars in these loops
            self._lists = ([m.tolist() for m in self.e_time], [m.tolist() for m in self.a_time],
                           self.proc_delay.tolist())
        et, at, proc = self._lists
        pfl, psl = pf.tolist(), ps.tolist()
        own = [proc[f][k] for f, k in enumerate(pfl)]
        for ai, (f, s, _) in enumerate(self.acc):
            own[f] += at[ai][pfl[f]][psl[s]]
        L: list = [None] * len(pfl)
        ninf = -math.inf
        epos = self._epos
        edges, preds = self.edges, self.preds
        for f in self.topo:
            pr = preds[f]
            kf = pfl[f]
            if pr:
                vec = None
                for ei in pr:
                    g = edges[ei][0]
                    t = et[ei][pfl[g]][kf]
                    if ne == 1:
                        cand = [L[g][0] + t]
                    else:
                        cand = [x + t for x in L[g]]
                    vec = cand if vec is None else [max(b, a) for a, b in zip(vec, cand)]
            else:
                vec = [ninf] * ne
                vec[epos[f]] = 0.0
            o = own[f]
            L[f] = [x + o for x in vec]
        if not U:
            return np.zeros(0)
        M = np.array([L[h] for h in self.exits]).T  # [entry, exit]
        treq = self.t_req[:, pf[self.entries]]  # [U, ne]
        tresp = self.t_resp[:, pf[self.exits]]  # [U, nh]
        with np.errstate(invalid="ignore"):
            tot = treq[:, :, None] + M[None, :, :] + tresp[:, None, :]
        tot = np.where(np.isnan(tot), -np.inf, tot)
        return tot.reshape(U, -1).max(axis=1)

    def delay_term(self, pf: np.ndarray, ps: np.ndarray, penalty: float = 0.0) -> tuple[float, bool]:
        """(delay_weight * mean delay + penalty * seconds over the bound, bound met)."""
        if not (self.needs_delay and len(self.users)):
            return 0.0, True
        d = self.delays(pf, ps)
        term = self.delay_weight * float(self.wu @ d) if self.delay_weight else 0.0
        ok = True
        if self.delay_bound is not None:
            over = np.maximum(d - self.delay_bound, 0.0)
            ok = bool((over <= 1e-9 * max(1.0, self.delay_bound)).all())
            term += penalty * float(over.sum())
        return term, ok

    def objective(self, pf: np.ndarray, ps: np.ndarray, penalty: float = 0.0) -> tuple[float, bool]:
        """(cost + delay_weight * mean delay [+ penalty * seconds over the bound], delay-feasible)."""
        term, ok = self.delay_term(pf, ps, penalty)
        return self.cost(pf, ps) + term, ok

    def capacity_ok(self, pf: np.ndarray, ps: np.ndarray) -> bool:
        cpu = np.zeros(self.K)
        mem = np.zeros(self.K)
        sto = np.zeros(self.K)
        np.add.at(cpu, pf, self.cpu_dem[np.arange(len(pf)), pf])
        np.add.at(mem, pf, self.mem)
        np.add.at(sto, ps, self.size)
        tol = 1e-6
        return bool((cpu <= self.cap_cpu * (1 + tol) + tol).all() and (mem <= self.cap_mem * (1 + tol) + tol).all()
                    and (sto <= self.cap_sto * (1 + tol) + tol).all())

    def placement(self, pf, ps, algorithm: str, **meta) -> Placement:
        return Placement({self.fnames[i]: self.cand[int(k)] for i, k in enumerate(pf)},
                         {self.snames[i]: self.cand[int(k)] for i, k in enumerate(ps)}, algorithm, dict(meta))

    def indices(self, placement: Placement) -> tuple[np.ndarray, np.ndarray]:
        ci = {c: i for i, c in enumerate(self.cand)}
        return (np.array([ci[placement.functions[f]] for f in self.fnames], dtype=int),
                np.array([ci[placement.states[s]] for s in self.snames], dtype=int))


def deployment_groups(app, nodes) -> tuple[list[list[int]], np.ndarray]:
    """Image parts grouped by the set of functions whose image holds them (a part is deployed once per
    node however many of those functions run there): the groups (sorted function indexes) and each
    group's deployment cost per node (the bytes the node does not hold already, in GB, times its
    deploy cost), shape (groups, nodes)."""
    groups: dict[frozenset, dict[str, int]] = {}
    by_part: dict[str, set] = {}
    sizes: dict[str, int] = {}
    for i, f in enumerate(app.functions):
        img = app.images.get(f.image) if f.image else None
        for d, s in (img.parts if img else ()):
            by_part.setdefault(d, set()).add(i)
            sizes[d] = s
    for d, fs in by_part.items():
        groups.setdefault(frozenset(fs), {})[d] = sizes[d]
    dc = np.array([n.deploy_cost for n in nodes])
    cost = np.array([[sum(s for d, s in parts.items() if d not in n.cached) / GB for n in nodes]
                     for parts in groups.values()]).reshape(len(groups), len(nodes)) * dc[None, :]
    return [sorted(g) for g in groups], cost


def is_finite(x: float) -> bool:
    return math.isfinite(x)
