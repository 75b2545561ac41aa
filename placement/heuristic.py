"""The fast heuristic (docs/placement.md §6): candidate pruning, greedy construction, local search.

1. *Candidates*: on a large network only nodes near the users, and the cheapest processors, matter.
   Take the cheapest processors (until they could hold twice the application's CPU), the nearest nodes
   (by least-delay path) to the heaviest user nodes, and more nearby nodes until the candidates hold at
   least twice the CPU and memory the application needs; routing is then computed only from those K
   nodes (K Dijkstra runs instead of N), see :func:`candidates`.
2. *Starts*: functions in topological order, each on the candidate with the least marginal objective
   (processing, transfers to already placed predecessors and state, new image bytes, weighted delay)
   among those with room left; a state goes with its heaviest accessor (by bytes per request) when that
   function is placed. Also feasibility-first starts (largest functions first; a best-fit-decreasing
   packing), everything co-located, and when nothing packs an overfilled greedy made feasible by
   :meth:`_Search.repair` (moves and swaps that lower the overload).
3. *Local search*: move one function, or one state, or a function together with the states only it
   uses; swap two functions; exchange two nodes' contents; pull a connected group of functions onto one
   node (:meth:`_Search.group_moves`), while the objective (delay-bound violations penalised) drops;
   the exact objective confirms the best few moves ranked by a cheap incremental estimate.
4. *Iterated local search* (:func:`iterated_local_search`): kicks and re-searches for a fixed number of
   kicks (or until a run of them fails), so the work does not depend on the machine's load; the time
   budget is only a safety net.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .arrays import Compiled
from .mip import Infeasible
from .model import Placement, Problem

FULL_BELOW = 60  # networks up to this many nodes use every node as a candidate
LARGE_STARTS = 1  # starts searched on applications of more than 40 functions (each costs seconds)


def candidates(problem: Problem, k: int = 40, near: int = 12, top_users: int = 8) -> list[str]:
    """Candidate nodes for a large network (all nodes when it is small); see the module doc."""
    net = problem.network
    N = len(net.nodes)
    if N <= max(k, FULL_BELOW):
        return [n.name for n in net.nodes]
    pt = problem.paths
    users = sorted(((r, u) for u, r in problem.users.items() if r > 0), reverse=True)[:top_users]
    if not users:
        users = [(1.0, net.nodes[0].name)]
    dist = np.full(N, np.inf)
    chosen: list[int] = []
    seen: set[int] = set()

    def take(i: int) -> None:
        if i not in seen and len(chosen) < k:
            seen.add(i)
            chosen.append(int(i))

    rows = []
    for _, u in users:
        D = pt.row(net.index[u])[0]
        rows.append(D)
        dist = np.minimum(dist, D)
    need_cpu = sum(problem.cpu_demand(f, net.nodes[0]) * net.nodes[0].speed for f in problem.app.functions)
    need_mem = sum(f.memory for f in problem.app.functions)
    # The cheapest processors (cpu_cost/speed) first, until they could hold twice the application's CPU
    # (at least 3, at most k/4): processing is usually the largest cost, and when these came after the
    # near-user nodes they never made it into the k slots (the near-user nodes of 8 users fill 40).
    cost = np.array([n.cpu_cost / n.speed for n in net.nodes])
    reachable = np.isfinite(dist)
    held = 0.0
    for i in np.argsort(np.where(reachable, cost, np.inf), kind="stable")[:max(3, k // 4)]:
        if not reachable[i] or (len(chosen) >= 3 and held >= 2 * need_cpu):
            break
        take(int(i))
        held += net.nodes[i].cpu * net.nodes[i].speed
    for D in rows:
        for i in np.argsort(D, kind="stable")[:near]:
            if math.isfinite(D[i]):
                take(int(i))
    order = np.argsort(dist, kind="stable")
    for i in order:
        cpu = sum(net.nodes[j].cpu * net.nodes[j].speed for j in chosen)
        mem = sum(net.nodes[j].memory for j in chosen)
        if cpu >= 2 * need_cpu and mem >= 2 * need_mem:
            break
        if math.isfinite(dist[i]):
            if len(chosen) >= k:
                k += 1  # capacity matters more than the size target
            take(int(i))
    return [net.nodes[i].name for i in chosen]


class _Search:
    def __init__(self, comp: Compiled, penalty: float):
        self.c = comp
        self.penalty = penalty
        F, S, K = len(comp.fnames), len(comp.snames), comp.K
        self.F, self.S, self.K = F, S, K
        self.succ: list[list[int]] = [[] for _ in range(F)]
        for ei, (g, _f, _) in enumerate(comp.edges):
            self.succ[g].append(ei)
        self.s_acc: list[list[int]] = [[] for _ in range(S)]
        for qi, (_f, s, _) in enumerate(comp.acc):
            self.s_acc[s].append(qi)
        # Swap partners on large applications: DAG neighbours and functions sharing a state.
        nb: list[set] = [set() for _ in range(F)]
        for g, f, _ in comp.edges:
            nb[g].add(f)
            nb[f].add(g)
        for qs in self.s_acc:
            users = [comp.acc[q][0] for q in qs]
            for a in users:
                nb[a].update(u for u in users if u != a)
        self.nbrs = [sorted(x for x in n if x > i) for i, n in enumerate(nb)]

    def obj(self, pf, ps) -> float:
        return self.c.objective(pf, ps, self.penalty)[0]

    def loads(self, pf, ps):
        c = self.c
        cpu, mem, sto = np.zeros(self.K), np.zeros(self.K), np.zeros(self.K)
        np.add.at(cpu, pf, c.cpu_dem[np.arange(self.F), pf])
        np.add.at(mem, pf, c.mem)
        np.add.at(sto, ps, c.size)
        return cpu, mem, sto

    def f_scores(self, f: int, pf, ps, counts, weight: float) -> np.ndarray:
        """Estimated objective of f on each candidate (up to a constant), other placements fixed."""
        sc, dl = self.f_parts(f, pf, ps, counts)
        return sc + weight * dl

    def f_parts(self, f: int, pf, ps, counts) -> tuple[np.ndarray, np.ndarray]:
        """(exact cost of f's terms on each candidate, summed delay of f's terms): cost[k] - cost[k0]
        is the exact cost change of moving f from k0 to k; the delay part is only an estimate."""
        c = self.c
        sc = c.lin_f[f].copy()
        dl = c.proc_delay[f].copy()
        for ei in c.preds[f]:
            g = c.edges[ei][0]
            if pf[g] >= 0:
                sc += c.e_cost[ei] * c.C[pf[g], :]
                dl += c.e_time[ei][pf[g], :]
        for ei in self.succ[f]:
            h = c.edges[ei][1]
            if pf[h] >= 0:
                sc += c.e_cost[ei] * c.C[:, pf[h]]
                dl += c.e_time[ei][:, pf[h]]
        for qi in c.f_acc[f]:
            s = c.acc[qi][1]
            if ps[s] >= 0:
                sc += c.a_cost[qi] * c.C[:, ps[s]]
                dl += c.a_time[qi][:, ps[s]]
        if len(c.users):
            if f in c.entries:
                dl += c.wu @ c.t_req
            if f in c.exits:
                dl += c.wu @ c.t_resp
        for g in c.f_groups[f]:
            own = np.zeros(self.K)
            if pf[f] >= 0:
                own[pf[f]] = 1
            sc += c.g_cost[g] * ((counts[g] - own) <= 0)
        return np.where(np.isfinite(sc), sc, np.inf), np.where(np.isfinite(dl), dl, 1e18)

    def s_scores(self, s: int, pf, weight: float) -> np.ndarray:
        sc, dl = self.s_parts(s, pf)
        return sc + weight * dl

    def s_parts(self, s: int, pf) -> tuple[np.ndarray, np.ndarray]:
        c = self.c
        sc = c.lin_s[s].copy()
        dl = np.zeros(self.K)
        for qi in self.s_acc[s]:
            f = c.acc[qi][0]
            if pf[f] >= 0:
                sc += c.a_cost[qi] * c.C[pf[f], :]
                dl += c.a_time[qi][pf[f], :]
        return np.where(np.isfinite(sc), sc, np.inf), np.where(np.isfinite(dl), dl, 1e18)

    # -------------------------------------------------------------------------------------------
    def size_order(self) -> list[int]:
        """Functions largest first (CPU or memory share of the biggest candidate, whichever is larger):
        the order of a decreasing bin packing, which places the hard-to-fit functions while room exists."""
        c = self.c
        share = np.maximum(c.cpu_dem.min(axis=1) / max(float(c.cap_cpu.max()), 1e-12),
                           c.mem / max(float(c.cap_mem.max()), 1e-12))
        return [int(f) for f in np.argsort(-share, kind="stable")]

    def greedy(self, weight: float, order: list[int] | None = None, fit: bool = False, force: bool = False):
        """One constructive start: functions in ``order`` (topological by default), each on the candidate
        with room that minimises its marginal objective; ``fit`` instead picks the candidate left with the
        least room (best-fit decreasing, cost only breaks ties: a feasibility-first packing); ``force``
        puts a function that fits nowhere on the node it overloads least (for :meth:`repair`)."""
        c = self.c
        pf = np.full(self.F, -1)
        ps = np.full(self.S, -1)
        counts = np.zeros((len(c.groups), self.K))
        cpu, mem, sto = np.zeros(self.K), np.zeros(self.K), np.zeros(self.K)
        heaviest: dict[int, list[int]] = {}
        for s in range(self.S):
            qs = self.s_acc[s]
            if qs:
                f = max(qs, key=lambda q: c.acc[q][2])
                heaviest.setdefault(c.acc[f][0], []).append(s)
        for f in (c.topo if order is None else order):
            sc = self.f_scores(f, pf, ps, counts, weight)
            ok = (cpu + c.cpu_dem[f] <= c.cap_cpu * (1 + 1e-9)) & (mem + c.mem[f] <= c.cap_mem * (1 + 1e-9))
            if fit:
                left = np.minimum((c.cap_cpu - cpu - c.cpu_dem[f]) / np.maximum(c.cap_cpu, 1e-12),
                                  (c.cap_mem - mem - c.mem[f]) / np.maximum(c.cap_mem, 1e-12))
                fin = np.isfinite(sc)
                span = float(np.ptp(sc[fin])) if fin.any() else 0.0
                sc = left + 1e-3 * (sc - (sc[fin].min() if fin.any() else 0.0)) / (span + 1e-12)
            sc = np.where(ok, sc, np.inf)
            k = int(np.argmin(sc))
            if not math.isfinite(sc[k]):
                if not force:
                    return None
                over = np.maximum((cpu + c.cpu_dem[f]) / np.maximum(c.cap_cpu, 1e-12),
                                  (mem + c.mem[f]) / np.maximum(c.cap_mem, 1e-12))
                k = int(np.argmin(over))
            pf[f] = k
            cpu[k] += c.cpu_dem[f, k]
            mem[k] += c.mem[f]
            for g in c.f_groups[f]:
                counts[g, k] += 1
            for s in heaviest.get(f, []):
                sc = self.s_scores(s, pf, weight)
                sc = np.where(sto + c.size[s] <= c.cap_sto * (1 + 1e-9), sc, np.inf)
                kk = int(np.argmin(sc))
                if not math.isfinite(sc[kk]):
                    if not force:
                        return None
                    kk = int(np.argmin((sto + c.size[s]) / np.maximum(c.cap_sto, 1e-12)))
                ps[s] = kk
                sto[kk] += c.size[s]
        for s in range(self.S):
            if ps[s] < 0:
                sc = self.s_scores(s, pf, weight)
                sc = np.where(sto + c.size[s] <= c.cap_sto * (1 + 1e-9), sc, np.inf)
                kk = int(np.argmin(sc))
                if not math.isfinite(sc[kk]):
                    if not force:
                        return None
                    kk = int(np.argmin((sto + c.size[s]) / np.maximum(c.cap_sto, 1e-12)))
                ps[s] = kk
                sto[kk] += c.size[s]
        return pf, ps

    def _over(self, cpu, mem, sto) -> np.ndarray:
        """Per-node overload: the shares by which CPU, memory and state storage exceed capacity."""
        c = self.c
        return (np.maximum(cpu - c.cap_cpu, 0.0) / np.maximum(c.cap_cpu, 1e-12)
                + np.maximum(mem - c.cap_mem, 0.0) / np.maximum(c.cap_mem, 1e-12)
                + np.where(np.isfinite(c.cap_sto),
                           np.maximum(sto - c.cap_sto, 0.0) / np.maximum(c.cap_sto, 1e-12), 0.0))

    def repair(self, pf, ps, weight: float):
        """Make an over-capacity assignment feasible, or None when stuck.

        Each round takes, among moving one function (or state) off an overloaded node and swapping a
        function on an overloaded node with one elsewhere, the change that lowers the total overload
        most (ties by the cheaper objective estimate). Swaps matter when every node with room is too
        small for the function that must leave: a smaller one makes way."""
        c = self.c
        pf, ps = pf.copy(), ps.copy()
        counts = np.zeros((len(c.groups), self.K))
        for g, members in enumerate(c.groups):
            for f in members:
                counts[g, pf[f]] += 1
        for _ in range(4 * (self.F + self.S) + 8):
            cpu, mem, sto = self.loads(pf, ps)
            node_over = self._over(cpu, mem, sto)
            total = float(node_over.sum())
            if total <= 1e-9:
                return pf, ps
            best = None  # (overload change, cost estimate, action)
            for k0 in np.nonzero(node_over > 1e-12)[0]:
                k0 = int(k0)
                for f in np.nonzero(pf == k0)[0]:
                    f = int(f)
                    left0 = self._node_over(k0, cpu[k0] - c.cpu_dem[f, k0], mem[k0] - c.mem[f], sto[k0])
                    gain = self._over(cpu + c.cpu_dem[f], mem + c.mem[f], sto) - node_over
                    delta = gain + (left0 - node_over[k0])
                    delta[k0] = np.inf
                    sc = self.f_scores(f, pf, ps, counts, weight)
                    k = int(np.lexsort((sc, np.round(delta, 12)))[0])
                    if delta[k] < -1e-12 and (best is None or (delta[k], sc[k]) < best[:2]):
                        best = (float(delta[k]), float(sc[k]), ("move", f, k))
                    for g in range(self.F):  # swap f with g elsewhere
                        k = int(pf[g])
                        if k == k0:
                            continue
                        o = (self._node_over(k0, cpu[k0] - c.cpu_dem[f, k0] + c.cpu_dem[g, k0],
                                             mem[k0] - c.mem[f] + c.mem[g], sto[k0])
                             + self._node_over(k, cpu[k] - c.cpu_dem[g, k] + c.cpu_dem[f, k],
                                               mem[k] - c.mem[g] + c.mem[f], sto[k]))
                        delta = o - node_over[k0] - node_over[k]
                        if delta < -1e-12 and (best is None or delta < best[0] - 1e-12):
                            best = (float(delta), 0.0, ("swap", f, g))
                for s_ in np.nonzero(ps == k0)[0]:
                    s_ = int(s_)
                    if not (sto[k0] > c.cap_sto[k0]):
                        break
                    delta = (self._over(cpu, mem, sto + c.size[s_]) - node_over
                             + self._node_over(k0, cpu[k0], mem[k0], sto[k0] - c.size[s_]) - node_over[k0])
                    delta[k0] = np.inf
                    sc = self.s_scores(s_, pf, weight)
                    k = int(np.lexsort((sc, np.round(delta, 12)))[0])
                    if delta[k] < -1e-12 and (best is None or (delta[k], sc[k]) < best[:2]):
                        best = (float(delta[k]), float(sc[k]), ("state", s_, k))
            if best is None:
                return None
            kind, a, b = best[2]
            if kind == "state":
                ps[a] = b
                continue
            moves = [(a, b)] if kind == "move" else [(a, int(pf[b])), (b, int(pf[a]))]
            for f, k in moves:
                for g in c.f_groups[f]:
                    counts[g, pf[f]] -= 1
                    counts[g, k] += 1
            for f, k in moves:
                pf[f] = k
        return None

    def _node_over(self, k: int, cpu: float, mem: float, sto: float) -> float:
        c = self.c
        o = (max(cpu - c.cap_cpu[k], 0.0) / max(c.cap_cpu[k], 1e-12)
             + max(mem - c.cap_mem[k], 0.0) / max(c.cap_mem[k], 1e-12))
        if math.isfinite(c.cap_sto[k]):
            o += max(sto - c.cap_sto[k], 0.0) / max(c.cap_sto[k], 1e-12)
        return o

    def colocated(self):
        """Everything on one candidate (the best that fits), the lowest-delay start when it exists."""
        c = self.c
        best = None
        fits = [k for k in range(self.K) if c.cpu_dem[:, k].sum() <= c.cap_cpu[k] and c.mem.sum() <= c.cap_mem[k]
                and c.size.sum() <= c.cap_sto[k]]
        for k in fits[:64]:
            pf, ps = np.full(self.F, k), np.full(self.S, k)
            o = self.obj(pf, ps)
            if best is None or o < best[0]:
                best = (o, pf, ps)
        return None if best is None else (best[1], best[2])

    def local_search(self, pf, ps, deadline: float, weight: float, top: int = 3, groups: bool = True):
        """Improve (pf, ps) by single moves until none helps or ``deadline``; returns (pf, ps, objective).

        Cost changes are exact and incremental (:meth:`f_parts`); the delay term, when the objective has
        one, is recomputed for the ``top`` moves ranked by cost + weight * estimated delay.
        """
        c = self.c
        cost = c.cost(pf, ps)
        dterm = c.delay_term(pf, ps, self.penalty)[0]
        cur = cost + dterm
        cpu, mem, sto = self.loads(pf, ps)
        counts = np.zeros((len(c.groups), self.K))
        for g, members in enumerate(c.groups):
            for f in members:
                counts[g, pf[f]] += 1
        exact_needed = c.needs_delay and len(c.users) > 0

        def eps(x):
            return 1e-9 * (1 + abs(x))

        # Large applications (> 40 functions) converge to a coarser tolerance with fewer exact delay
        # evaluations, so planning 100 functions stays within seconds of CPU without a time limit.
        fast = self.F > 40
        converged = 1e-4 if fast else 1e-5

        def try_moves(cv, dv, k0, ok, setter):
            rank = np.where(ok, cv + weight * dv, np.inf)
            order = [int(k) for k in np.argsort(rank, kind="stable")[:top + 1] if k != k0 and math.isfinite(rank[k])]
            best = (cur, None, None)
            for n, k in enumerate(order[:top]):
                ncost = cost + cv[k] - cv[k0]
                if ncost >= best[0] - eps(best[0]):
                    continue  # the delay term is >= 0: a cost this high cannot win, skip its delay
                if fast and n and rank[k] >= rank[k0]:
                    continue  # large application: beyond the best-ranked move, only estimated gains
                if exact_needed:
                    setter(k)
                    nd = c.delay_term(pf, ps, self.penalty)[0]
                    setter(k0)
                else:
                    nd = 0.0
                if ncost + nd < best[0] - eps(best[0]):
                    best = (ncost + nd, k, (ncost, nd))
                if not exact_needed:
                    break
            return best

        improved = True
        while improved and time.perf_counter() < deadline:
            improved = False
            sweep_start = cur
            for f in c.topo:
                k0 = int(pf[f])
                cv, dv = self.f_parts(f, pf, ps, counts)
                ok = (cpu + c.cpu_dem[f] <= c.cap_cpu * (1 + 1e-9)) & (mem + c.mem[f] <= c.cap_mem * (1 + 1e-9))
                ok[k0] = True
                best = try_moves(cv, dv, k0, ok, lambda k, f=f: pf.__setitem__(f, k))
                if best[1] is not None:
                    k = best[1]
                    cpu[k0] -= c.cpu_dem[f, k0]
                    mem[k0] -= c.mem[f]
                    cpu[k] += c.cpu_dem[f, k]
                    mem[k] += c.mem[f]
                    for g in c.f_groups[f]:
                        counts[g, k0] -= 1
                        counts[g, k] += 1
                    pf[f], cur, improved = k, best[0], True
                    cost, dterm = best[2]
            for s in range(self.S):
                k0 = int(ps[s])
                cv, dv = self.s_parts(s, pf)
                ok = sto + c.size[s] <= c.cap_sto * (1 + 1e-9)
                ok[k0] = True
                best = try_moves(cv, dv, k0, ok, lambda k, s=s: ps.__setitem__(s, k))
                if best[1] is not None:
                    sto[k0] -= c.size[s]
                    sto[best[1]] += c.size[s]
                    ps[s], cur, improved = best[1], best[0], True
                    cost, dterm = best[2]
            # A function with the states only it uses, moved together (escapes the co-location trap).
            for f in c.topo:
                own = [c.acc[q][1] for q in c.f_acc[f] if all(c.acc[q2][0] == f for q2 in self.s_acc[c.acc[q][1]])]
                if not own or time.perf_counter() > deadline:
                    continue
                k0 = int(pf[f])
                cv, dv = self.f_parts(f, pf, ps, counts)
                rank = cv + weight * dv + sum(c.lin_s[s] for s in own)
                order = [int(k) for k in np.argsort(rank, kind="stable")[:top + 1] if k != k0]
                best = (cur, None, None)
                saved = {s: int(ps[s]) for s in own}
                for k in order[:top]:
                    if cpu[k] + c.cpu_dem[f, k] > c.cap_cpu[k] or mem[k] + c.mem[f] > c.cap_mem[k]:
                        continue
                    add = sum(c.size[s] for s in own if saved[s] != k)
                    if sto[k] + add > c.cap_sto[k]:
                        continue
                    pf[f] = k
                    for s in own:
                        ps[s] = k
                    nc = c.cost(pf, ps)
                    if nc >= best[0] - eps(best[0]):
                        continue
                    nd = c.delay_term(pf, ps, self.penalty)[0]
                    if nc + nd < best[0] - eps(best[0]):
                        best = (nc + nd, k, (nc, nd))
                pf[f] = k0
                for s in own:
                    ps[s] = saved[s]
                if best[1] is not None:
                    k = best[1]
                    cpu[k0] -= c.cpu_dem[f, k0]
                    mem[k0] -= c.mem[f]
                    cpu[k] += c.cpu_dem[f, k]
                    mem[k] += c.mem[f]
                    for g in c.f_groups[f]:
                        counts[g, k0] -= 1
                        counts[g, k] += 1
                    for s in own:
                        sto[ps[s]] -= c.size[s]
                        sto[k] += c.size[s]
                        ps[s] = k
                    pf[f], cur, improved = k, best[0], True
                    cost, dterm = best[2]
            # Swap two functions' nodes: what a full node needs when neither function fits alone.
            # The sum of the two single-move cost changes (f_parts, each with the other function left in
            # place) never exceeds the swap's true cost change: the only terms it misjudges (an edge
            # between the two, an image group they share) it counts as savings. So a swap whose estimate
            # already loses is skipped without evaluating it (the delay term is never negative).
            dem = c.cpu_dem
            parts: dict[int, np.ndarray] = {}

            def part(f, parts=parts):
                if f not in parts:
                    parts[f] = self.f_parts(f, pf, ps, counts)[0]
                return parts[f]

            for f1 in range(self.F):
                if time.perf_counter() > deadline:
                    break
                for f2 in (range(f1 + 1, self.F) if self.F <= 40 else self.nbrs[f1]):
                    k1, k2 = int(pf[f1]), int(pf[f2])
                    if k1 == k2:
                        continue
                    p1, p2 = part(f1), part(f2)
                    if cost + (p1[k2] - p1[k1]) + (p2[k1] - p2[k2]) >= cur:
                        continue
                    c1 = cpu[k1] - dem[f1, k1] + dem[f2, k1]
                    c2 = cpu[k2] - dem[f2, k2] + dem[f1, k2]
                    m1 = mem[k1] - c.mem[f1] + c.mem[f2]
                    m2 = mem[k2] - c.mem[f2] + c.mem[f1]
                    if (c1 > c.cap_cpu[k1] * (1 + 1e-9) or c2 > c.cap_cpu[k2] * (1 + 1e-9)
                            or m1 > c.cap_mem[k1] * (1 + 1e-9) or m2 > c.cap_mem[k2] * (1 + 1e-9)):
                        continue
                    pf[f1], pf[f2] = k2, k1
                    nc = c.cost(pf, ps)
                    nd = c.delay_term(pf, ps, self.penalty)[0] if exact_needed and nc < cur - eps(cur) else 0.0
                    if nc + nd < cur - eps(cur):
                        cpu[k1], cpu[k2], mem[k1], mem[k2] = c1, c2, m1, m2
                        for g in c.f_groups[f1]:
                            counts[g, k1] -= 1
                            counts[g, k2] += 1
                        for g in c.f_groups[f2]:
                            counts[g, k2] -= 1
                            counts[g, k1] += 1
                        cost, dterm, cur, improved = nc, nd, nc + nd, True
                        parts.clear()
                    else:
                        pf[f1], pf[f2] = k1, k2
            # Exchange the whole contents of two nodes (a used one and any candidate): a cluster of
            # functions and states that belongs elsewhere moves at once, no single move would start it.
            used = sorted(set(pf.tolist()) | set(ps.tolist()))
            for k1 in used:
                for k2 in range(self.K):
                    if k2 == k1 or time.perf_counter() > deadline:
                        continue
                    a = pf == k1
                    b = pf == k2
                    sa, sb = ps == k1, ps == k2
                    cpu1 = c.cpu_dem[b, k1].sum()
                    cpu2 = c.cpu_dem[a, k2].sum()
                    if (cpu1 > c.cap_cpu[k1] * (1 + 1e-9) or cpu2 > c.cap_cpu[k2] * (1 + 1e-9)
                            or c.mem[b].sum() > c.cap_mem[k1] * (1 + 1e-9)
                            or c.mem[a].sum() > c.cap_mem[k2] * (1 + 1e-9)
                            or c.size[sb].sum() > c.cap_sto[k1] * (1 + 1e-9)
                            or c.size[sa].sum() > c.cap_sto[k2] * (1 + 1e-9)):
                        continue
                    pf[a], pf[b], ps[sa], ps[sb] = k2, k1, k2, k1
                    nc = c.cost(pf, ps)
                    nd = c.delay_term(pf, ps, self.penalty)[0] if exact_needed and nc < cur - eps(cur) else 0.0
                    if nc + nd < cur - eps(cur):
                        cost, dterm, cur, improved = nc, nd, nc + nd, True
                        cpu, mem, sto = self.loads(pf, ps)
                        counts[:] = 0
                        for g, members in enumerate(c.groups):
                            for f in members:
                                counts[g, pf[f]] += 1
                        break
                    pf[a], pf[b], ps[sa], ps[sb] = k1, k2, k1, k2
            if groups and time.perf_counter() < deadline:
                moved = self.group_moves(pf, ps, weight, cur, counts, cpu, mem, sto, exact_needed)
                if moved is not None:
                    pf[:], ps[:] = moved[0], moved[1]
                    cost, dterm, cur, improved = moved[2], moved[3], moved[2] + moved[3], True
                    cpu, mem, sto = self.loads(pf, ps)
                    counts[:] = 0
                    for g, members in enumerate(c.groups):
                        for f in members:
                            counts[g, pf[f]] += 1
            if sweep_start - cur < converged * abs(sweep_start):
                break  # converged for practical purposes: another sweep buys < 0.001 % (0.01 % if fast)
        return pf, ps, cur

    def _links(self) -> list[dict[int, float]]:
        """Per function, its DAG neighbours and the functions sharing a state with it, weighted by the
        bytes per request they exchange (directly, or through the shared state)."""
        if getattr(self, "_link_w", None) is None:
            c = self.c
            w: list[dict[int, float]] = [{} for _ in range(self.F)]
            for g, f, b in c.edges:
                w[g][f] = w[g].get(f, 0.0) + b + 1.0
                w[f][g] = w[f].get(g, 0.0) + b + 1.0
            for qs in self.s_acc:
                for q1 in qs:
                    for q2 in qs:
                        f1, f2 = c.acc[q1][0], c.acc[q2][0]
                        if f1 != f2:
                            w[f1][f2] = w[f1].get(f2, 0.0) + min(c.acc[q1][2], c.acc[q2][2]) + 1.0
            self._link_w = w
        return self._link_w

    def group_moves(self, pf, ps, weight, cur, counts, cpu, mem, sto, exact_needed, seeds: int = 3,
                    maxlen: int = 16):
        """Pull a connected segment of the application onto one candidate (first improvement).

        For every target candidate k and each of the ``seeds`` functions whose single move to k looks
        best, grow a group from that seed, always adding the outside function most connected to the
        group (bytes per request over DAG edges and shared states) that still fits on k, up to
        max(``maxlen``, F/2) functions; states only used by functions on k follow them. The exact cost
        change of every prefix is accumulated move by move (:meth:`f_parts` is exact given the moves
        before it), the delay change estimated; the best
        prefix is then judged by the exact objective. This is the neighbourhood single moves and swaps
        cannot reach: a cluster spread over several small nodes that belongs together on an empty big
        one, where moving any one function alone only adds transfers. Returns (pf, ps, cost, delay
        term) of the first improving group move, or None."""
        c = self.c
        links = self._links()
        tol = 1 + 1e-9
        single = np.empty((self.F, self.K))
        for f in range(self.F):
            cv, dv = self.f_parts(f, pf, ps, counts)
            k0 = int(pf[f])
            single[f] = (cv - cv[k0]) + weight * (dv - dv[k0])
        state_users = [[c.acc[q][0] for q in self.s_acc[s]] for s in range(self.S)]
        eps = 1e-9 * (1 + abs(cur))
        for k in range(self.K):
            outside = np.nonzero(pf != k)[0]
            if not len(outside):
                continue
            order = outside[np.argsort(single[outside, k], kind="stable")][:seeds]
            for seed in order:
                pf2, ps2, counts2 = pf.copy(), ps.copy(), counts.copy()
                ck, mk, sk = cpu[k], mem[k], sto[k]
                dcost = dd = 0.0
                best_val, best_len = -eps, 0
                steps: list[tuple[int, list[int]]] = []
                conn: dict[int, float] = {}
                nxt = int(seed)
                while nxt >= 0 and len(steps) < max(maxlen, self.F // 2):
                    f = nxt
                    conn.pop(f, None)
                    k0 = int(pf2[f])
                    if ck + c.cpu_dem[f, k] <= c.cap_cpu[k] * tol and mk + c.mem[f] <= c.cap_mem[k] * tol:
                        cv, dv = self.f_parts(f, pf2, ps2, counts2)
                        dcost += cv[k] - cv[k0]
                        dd += dv[k] - dv[k0]
                        for g in c.f_groups[f]:
                            counts2[g, k0] -= 1
                            counts2[g, k] += 1
                        pf2[f] = k
                        ck += c.cpu_dem[f, k]
                        mk += c.mem[f]
                        followed = []
                        for q in c.f_acc[f]:
                            st = c.acc[q][1]
                            if (ps2[st] != k and sk + c.size[st] <= c.cap_sto[k] * tol
                                    and all(pf2[u] == k for u in state_users[st])):
                                sv, sd = self.s_parts(st, pf2)
                                dcost += sv[k] - sv[ps2[st]]
                                dd += sd[k] - sd[ps2[st]]
                                ps2[st] = k
                                sk += c.size[st]
                                followed.append(st)
                        steps.append((f, followed))
                        val = dcost + weight * dd
                        if val < best_val:
                            best_val, best_len = val, len(steps)
                        for h, wt in links[f].items():
                            if pf2[h] != k:
                                conn[h] = conn.get(h, 0.0) + wt
                    nxt = -1
                    for h in sorted(conn, key=lambda h: -conn[h]):
                        if ck + c.cpu_dem[h, k] <= c.cap_cpu[k] * tol and mk + c.mem[h] <= c.cap_mem[k] * tol:
                            nxt = h
                            break
                if not best_len:
                    continue
                pf3, ps3 = pf.copy(), ps.copy()
                for f, followed in steps[:best_len]:
                    pf3[f] = k
                    for st in followed:
                        ps3[st] = k
                nc = c.cost(pf3, ps3)
                nd = c.delay_term(pf3, ps3, self.penalty)[0] if exact_needed and nc < cur - eps else 0.0
                if nc + nd < cur - eps and self.c.capacity_ok(pf3, ps3):
                    return pf3, ps3, nc, nd
        return None

    def perturb(self, pf, ps, rng: np.random.Generator, moves: int = 3):
        """A random kick for iterated local search: a few functions (with their private states) moved
        to random candidates that have room."""
        c = self.c
        pf, ps = pf.copy(), ps.copy()
        cpu, mem, sto = self.loads(pf, ps)
        for f in rng.choice(self.F, size=min(moves, self.F), replace=False):
            k0 = pf[f]
            room = np.nonzero((cpu + c.cpu_dem[f] <= c.cap_cpu) & (mem + c.mem[f] <= c.cap_mem))[0]
            room = room[room != k0]
            if not len(room):
                continue
            k = int(rng.choice(room))
            cpu[k0] -= c.cpu_dem[f, k0]
            mem[k0] -= c.mem[f]
            cpu[k] += c.cpu_dem[f, k]
            mem[k] += c.mem[f]
            pf[f] = k
            for q in c.f_acc[f]:
                s = c.acc[q][1]
                if rng.random() < 0.5 and sto[k] + c.size[s] <= c.cap_sto[k]:
                    sto[ps[s]] -= c.size[s]
                    sto[k] += c.size[s]
                    ps[s] = k
        return pf, ps


def solve(problem: Problem, time_budget: float = 8.0, candidate_nodes: list[str] | None = None,
          seed: int = 0) -> Placement:
    """A good capacity-feasible placement quickly (see the module doc); ``seed`` drives the kicks."""
    start, cpu0 = time.perf_counter(), time.process_time()
    cand = candidate_nodes or candidates(problem)
    result = _solve_on(problem, cand, start, time_budget, seed)
    if result is None and len(cand) < len(problem.network.nodes):
        result = _solve_on(problem, [n.name for n in problem.network.nodes], start, time_budget, seed)
    if result is None:
        raise Infeasible("heuristic: no placement fits the nodes' CPU, memory and storage capacities")
    comp, pf, ps, feasible = result
    wall = time.perf_counter() - start
    # budget_exhausted: the (wall-clock) budget cut the search short; normally it converges first
    return comp.placement(pf, ps, "heuristic", seconds=wall, cpu_seconds=time.process_time() - cpu0,
                          budget_exhausted=wall >= time_budget, candidates=comp.K, delay_feasible=feasible)


def _solve_on(problem: Problem, cand: list[str], start: float, budget: float, seed: int = 0):
    comp = Compiled(problem, cand)
    base = _scale(comp)
    penalty = 1e3 * (1.0 + base) / max(comp.delay_bound or 1.0, 1e-6)
    search = _Search(comp, penalty)
    w0 = comp.delay_weight
    wd = w0 + (base / comp.delay_bound if comp.delay_bound else 0.0)
    starts = []
    weights = {w0}
    if comp.delay_bound is not None:  # delay-led starts, to meet the bound when cost pulls away from it
        weights |= {wd, w0 + 10 * base / max(comp.delay_bound, 1e-6)}
    for w in sorted(weights):
        g = search.greedy(w)
        if g is not None:
            starts.append((g, w))
    # Feasibility-first starts: largest functions first (cost-led among nodes with room), and a pure
    # best-fit-decreasing packing. The topological greedy can fill the one big node with early small
    # functions so that a large later one fits nowhere; these cannot strand a large function that way.
    by_size = search.size_order()
    for g in (search.greedy(w0, by_size), search.greedy(w0, by_size, fit=True)):
        if g is not None and not any(np.array_equal(g[0], s0[0][0]) and np.array_equal(g[1], s0[0][1])
                                     for s0 in starts):
            starts.append((g, w0))
    co = search.colocated()
    if co is not None:
        starts.append((co, w0))
    if not starts:  # nothing packs constructively: overfill, then repair by moves and swaps
        for order in (by_size, None):
            forced = search.greedy(w0, order, force=True)
            fixed = search.repair(*forced, w0) if forced is not None else None
            if fixed is not None:
                starts.append((fixed, w0))
                break
    if not starts:
        return None
    deadline = start + budget
    best = None
    results = []
    if len(comp.fnames) > 40 and len(starts) > 2:
        # Large applications: a local search costs seconds here, so only the two most promising starts
        # (by their penalised objective as built) are searched.
        starts = sorted(starts, key=lambda st: search.obj(*st[0]))[:LARGE_STARTS]
    for (pf, ps), w in starts:
        pf, ps, o = search.local_search(pf.copy(), ps.copy(), deadline, w0 if w == w0 else w)
        if w != w0:  # polish a delay-led start under the true objective
            pf, ps, o = search.local_search(pf, ps, deadline, w0)
        if comp.capacity_ok(pf, ps):
            results.append((o, pf.copy(), ps.copy()))
    if not results:
        return None
    best = min(results, key=lambda r: r[0])
    best = iterated_local_search(search, best, seed, deadline)
    ok = comp.objective(best[1], best[2])[1]
    return comp, best[1], best[2], ok


def iterated_local_search(search: _Search, best, seed: int, deadline: float, kicks: int | None = None,
                          patience: int | None = None):
    """Kick the best plan (a few functions, with their states half the time, moved to random candidates
    with room), search again, keep improvements. Stops after ``kicks`` kicks or ``patience`` kicks in a
    row without improvement (defaults shrink as the application grows, since each local search then
    costs more), so the work done does not depend on the machine's load; ``deadline`` is only a safety
    net. Returns (objective, pf, ps)."""
    comp = search.c
    F = len(comp.fnames)
    if kicks is None:
        kicks = 60 if F <= 20 else (20 if F <= 40 else 3)
    if patience is None:
        patience = (30 if F <= 20 else 8) if F <= 40 else 2
    rng = np.random.default_rng(seed)
    w0 = comp.delay_weight
    stale = 0
    for _ in range(kicks):
        if stale >= patience or time.perf_counter() >= deadline:
            break
        pf, ps = search.perturb(best[1], best[2], rng, moves=int(rng.integers(2, 5)))
        pf, ps, o = search.local_search(pf, ps, deadline, w0)
        if comp.capacity_ok(pf, ps) and o < best[0] - 1e-9 * (1 + abs(best[0])):
            best = (o, pf.copy(), ps.copy())
            stale = 0
        else:
            stale += 1
    return best


def _scale(comp: Compiled) -> float:
    """A typical cost magnitude, to size the delay-bound penalty and the delay-led greedy weight."""
    return float(np.abs(comp.lin_f).mean() * max(1, len(comp.fnames))
                 + comp.e_cost.sum() * max(np.nanmax(np.where(np.isfinite(comp.C), comp.C, 0)), 1e-9)
                 + comp.g_cost.sum() / max(comp.K, 1)) + 1e-9
