"""LP relaxation of the multicommodity-flow formulation + threshold rounding + repair (docs/placement.md §7).

1. Solve the LP relaxation of :mod:`.mip`'s formulation (x, y in [0, 1]; every DAG edge and state
   access is a commodity whose flow z[e, i, j] from node i to node j is routed on the least-delay path).
   Its value is a lower bound on the optimum (``meta['lower_bound']``) when every user node is kept.
2. Round with the Kleinberg–Tardos threshold rule (shared randomness across all functions and states):
   repeat "draw a candidate k uniformly and alpha in (0, 1]; every unassigned object o with
   x*[o, k] >= alpha goes to k". Object o lands on k with probability exactly x*[o, k]; two objects are
   separated with probability at most twice the LP's total-variation distance between them. ``samples``
   roundings (seeded) plus the argmax rounding are repaired and the best kept.
3. Repair: move objects off nodes over CPU/memory/storage capacity to the candidate with the least
   estimated objective increase; if the delay bound is still violated, run the heuristic's local search
   on the penalised objective until it holds (``meta['repaired']`` says whether repair was needed).

The bound proved in docs/placement.md §7.3 holds for the uncapacitated, delay-free case with equal
transfer cost between distinct nodes: E[cost] <= max(2, 1 + ln g + 2/K) * OPT (g: the most functions
sharing one image-part group, K: candidates). Everything else is measured, not proved.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np

from .arrays import Compiled
from .heuristic import _scale, _Search, candidates, iterated_local_search
from .mip import Infeasible, build, check_size, solve_formulation
from .model import Placement, Problem

MAX_LP_USERS = 8


def lp_relaxation(comp: Compiled):
    """(x*[F,K], y*[S,K], LP value, all users kept) for the compiled problem."""
    lp_comp, full = comp, True
    if comp.needs_delay and len(comp.users) > MAX_LP_USERS:
        # Delay rows grow with users x functions x K^2: keep the heaviest users (renormalised) in the LP.
        keep = np.argsort(-comp.rate, kind="stable")[:MAX_LP_USERS]
        lp_comp = copy.copy(comp)
        lp_comp.users = [comp.users[i] for i in keep]
        lp_comp.rate = comp.rate[keep]
        lp_comp.wu = lp_comp.rate / lp_comp.rate.sum()
        lp_comp.t_req, lp_comp.t_resp = comp.t_req[keep], comp.t_resp[keep]
        full = False
    check_size(lp_comp, "approx (LP relaxation)")
    form = build(lp_comp, integral=False)
    res = solve_formulation(form, time_limit=None)
    if res.x is None:
        raise Infeasible(f"approx: the LP relaxation is infeasible ({res.message})")
    F, S, K = len(comp.fnames), len(comp.snames), comp.K
    xs = np.clip(res.x[form.x0:form.x0 + F * K].reshape(F, K), 0, 1)
    ys = np.clip(res.x[form.y0:form.y0 + S * K].reshape(S, K), 0, 1)
    return xs, ys, float(res.fun), full


def threshold_round(frac: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Kleinberg–Tardos rounding of rows of ``frac`` (each a distribution over K columns)."""
    n, K = frac.shape
    out = np.full(n, -1)
    left = n
    guard = 0
    while left and guard < 200 * K * max(1, int(math.log(n + 1)) + 1):
        guard += 1
        k = int(rng.integers(K))
        alpha = 1.0 - rng.random()  # (0, 1]
        hit = (out < 0) & (frac[:, k] >= alpha)
        out[hit] = k
        left -= int(hit.sum())
    if left:  # vanishingly unlikely; finish deterministically
        miss = out < 0
        out[miss] = frac[miss].argmax(axis=1)
    return out


def _repair(search: _Search, pf: np.ndarray, ps: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool] | None:
    comp = search.c
    repaired = False
    cpu, mem, sto = search.loads(pf, ps)
    counts = np.zeros((len(comp.groups), comp.K))
    for g, members in enumerate(comp.groups):
        for f in members:
            counts[g, pf[f]] += 1
    tol = 1 + 1e-9
    for _ in range(4 * (len(pf) + len(ps)) + 4):
        over = np.nonzero((cpu > comp.cap_cpu * tol) | (mem > comp.cap_mem * tol))[0]
        if not len(over):
            break
        k0 = int(over[0])
        movers = [f for f in range(len(pf)) if pf[f] == k0]
        best = None
        for f in movers:
            # Options: f alone, or f with the states only it uses that sit with it (so a function leaving a
            # full node does not leave its private state behind); judged by the exact penalised objective.
            own = [comp.acc[q][1] for q in comp.f_acc[f]
                   if ps[comp.acc[q][1]] == k0 and all(comp.acc[q2][0] == f for q2 in search.s_acc[comp.acc[q][1]])]
            sc = search.f_scores(f, pf, ps, counts, comp.delay_weight)
            ok = (cpu + comp.cpu_dem[f] <= comp.cap_cpu * tol) & (mem + comp.mem[f] <= comp.cap_mem * tol)
            ok[k0] = False
            sc = np.where(ok, sc, np.inf)
            for k in [int(k) for k in np.argsort(sc, kind="stable")[:4] if math.isfinite(sc[k])]:
                for group in ([], own) if own else ([],):
                    if group and sto[k] + sum(comp.size[s] for s in group) > comp.cap_sto[k] * tol:
                        continue
                    pf[f] = k
                    for s in group:
                        ps[s] = k
                    o = comp.objective(pf, ps, search.penalty)[0]
                    pf[f] = k0
                    for s in group:
                        ps[s] = k0
                    if best is None or o < best[0]:
                        best = (o, f, k, list(group))
        if best is None:
            return None
        _, f, k, group = best
        for s in group:
            sto[k0] -= comp.size[s]
            sto[k] += comp.size[s]
            ps[s] = k
        cpu[k0] -= comp.cpu_dem[f, k0]
        mem[k0] -= comp.mem[f]
        cpu[k] += comp.cpu_dem[f, k]
        mem[k] += comp.mem[f]
        for g in comp.f_groups[f]:
            counts[g, k0] -= 1
            counts[g, k] += 1
        pf[f] = k
        repaired = True
    else:
        return None
    for _ in range(len(ps) + 1):
        over = np.nonzero(sto > comp.cap_sto * tol)[0]
        if not len(over):
            break
        k0 = int(over[0])
        best = None
        for s in [s for s in range(len(ps)) if ps[s] == k0]:
            sc = search.s_scores(s, pf, comp.delay_weight)
            ok = sto + comp.size[s] <= comp.cap_sto * tol
            ok[k0] = False
            sc = np.where(ok, sc, np.inf)
            k = int(np.argmin(sc))
            if math.isfinite(sc[k]) and (best is None or sc[k] < best[0]):
                best = (sc[k], s, k)
        if best is None:
            return None
        _, s, k = best
        sto[k0] -= comp.size[s]
        sto[k] += comp.size[s]
        ps[s] = k
        repaired = True
    if (cpu > comp.cap_cpu * tol).any() or (mem > comp.cap_mem * tol).any() or (sto > comp.cap_sto * tol).any():
        return None
    return pf, ps, repaired


def solve(problem: Problem, samples: int = 32, seed: int = 0, candidate_nodes: list[str] | None = None,
          time_budget: float = 30.0, polish: bool = True, polish_top: int = 4, kicks: int | None = None) -> Placement:
    """LP + rounding + repair; ``polish`` then runs the heuristic's local search from the ``polish_top``
    best distinct repaired roundings and an iterated local search (``kicks``, default as the heuristic's)
    from the best of them. Polishing never raises the objective, so the §7.3 bound still holds;
    ``polish=False`` is the pure rounding."""
    start = time.perf_counter()
    comp = Compiled(problem, candidate_nodes or candidates(problem))
    xs, ys, lp, full = lp_relaxation(comp)
    rng = np.random.default_rng(seed)
    base = _scale(comp)
    search = _Search(comp, 1e3 * (1.0 + base) / max(comp.delay_bound or 1.0, 1e-6))
    joint = np.vstack([xs, ys]) if len(ys) else xs
    trials = [(xs.argmax(axis=1), ys.argmax(axis=1) if len(ys) else np.zeros(0, int))]
    for _ in range(samples):
        r = threshold_round(joint, rng)
        trials.append((r[:len(xs)], r[len(xs):]))
    best = None
    n_repaired = 0
    repaired_trials = []
    for pf, ps in trials:
        fixed = _repair(search, pf.copy(), ps.copy())
        if fixed is None:  # the cheap repair got stuck: the heuristic's move-and-swap repair
            fixed = search.repair(pf, ps, comp.delay_weight)
            fixed = None if fixed is None else (fixed[0], fixed[1], True)
        if fixed is None:
            continue
        pf, ps, rep = fixed
        o, ok = comp.objective(pf, ps, search.penalty)
        if not ok:
            pf, ps, o = search.local_search(pf, ps, start + time_budget, comp.delay_weight)
            ok = comp.objective(pf, ps)[1]
            rep = True
        n_repaired += rep
        repaired_trials.append((ok, o, pf.copy(), ps.copy(), rep))
        if best is None or (ok, -o) > (best[0], -best[1]):
            best = (ok, o, pf.copy(), ps.copy(), rep)
    if best is None:
        raise Infeasible("approx: no rounding could be repaired into a capacity-feasible placement")
    ok, o, pf, ps, rep = best
    rounded = o
    polished = 0
    if polish:
        # Polish the best few distinct repaired roundings with the heuristic's local search (moves, swaps,
        # group moves), keep the best, then a short iterated local search from it. Every step only
        # accepts improvements, so the result is never worse than the best rounding (§7.3 still holds).
        deadline = start + time_budget
        seen, pool = set(), []
        for t in sorted(repaired_trials, key=lambda t: (not t[0], t[1])):
            key = (t[2].tobytes(), t[3].tobytes())
            if key not in seen:
                seen.add(key)
                pool.append(t)
            if len(pool) >= polish_top:
                break
        results = []
        for _, _, qf, qs, _ in pool:
            qf, qs, qo = search.local_search(qf.copy(), qs.copy(), deadline, comp.delay_weight)
            if comp.capacity_ok(qf, qs):
                results.append((qo, qf, qs))
            polished += 1
        if results:
            bo, bf, bs = iterated_local_search(search, min(results, key=lambda r: r[0]), seed, deadline,
                                               kicks=kicks)
            if bo <= o or not ok:
                pf, ps, o = bf, bs, bo
        ok = comp.objective(pf, ps)[1]
    return comp.placement(pf, ps, "approx", rounded_objective=float(rounded), polished=polish,
                          lower_bound=lp if full and comp.K == len(problem.network.nodes) else None, lp_value=lp,
                          lp_all_users=full, repaired=bool(rep), repaired_roundings=n_repaired,
                          roundings=len(trials), polished_roundings=polished, candidates=comp.K,
                          delay_feasible=bool(ok), seconds=time.perf_counter() - start)
