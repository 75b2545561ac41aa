"""The exact mixed-integer program (docs/placement.md §5), solved by HiGHS through scipy.optimize.milp.

Variables over candidate nodes k (all nodes by default):
  x[f,k] in {0,1}  function f runs on k;       y[s,k] in {0,1}  state s is stored on k;
  z[e,i,j] >= 0    edge e=(g,f) carries its data from i to j (the commodity of e routed i -> j);
  a[q,i,j] >= 0    access q=(f,s) between a function on i and a state on j;
  w[G,k] in [0,1]  the image parts of group G are pulled onto k;
  T[u,f] >= 0      finish time of f for requests entering at user node u;  L[u] >= 0 their delay.
The flow (transport) constraints  sum_j z[e,i,j] = x[g,i],  sum_i z[e,i,j] = x[f,j]  make z the product
x[g,i] x[f,j] for integral x (and are the LP's multicommodity-flow view); w[G,k] >= x[f,k] for every
f whose image holds G. Delay constraints are the critical-path recursion with the z/a terms. The delay
bound is a hard constraint L[u] <= bound; delay_weight adds weight * sum_u rate_u/Lambda * L[u].
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from remora.errors import RemoraError, UsageError

from .arrays import Compiled
from .model import Placement, Problem


class Infeasible(RemoraError):
    """No placement satisfies the capacities / delay bound (or the solver proved so)."""

    exit_code = 8


@dataclass
class Formulation:
    c: np.ndarray
    A: object
    lb: np.ndarray
    ub: np.ndarray
    vlb: np.ndarray
    vub: np.ndarray
    integrality: np.ndarray
    x0: int  # offset of x[f,k]: x0 + f*K + k
    y0: int
    z0: list[int]  # per edge offset, then i*K + j
    a0: list[int]
    nvars: int


def build(comp: Compiled, integral: bool = True) -> Formulation:
    K, F, S = comp.K, len(comp.fnames), len(comp.snames)
    E, Q, G, U = len(comp.edges), len(comp.acc), len(comp.groups), len(comp.users)
    with_delay = comp.needs_delay and U > 0
    n = 0
    x0 = n
    n += F * K
    y0 = n
    n += S * K
    z0 = []
    for _ in range(E):
        z0.append(n)
        n += K * K
    a0 = []
    for _ in range(Q):
        a0.append(n)
        n += K * K
    w0 = n
    n += G * K
    t0 = n
    if with_delay:
        n += U * F
    l0 = n
    if with_delay:
        n += U
    c = np.zeros(n)
    vlb, vub = np.zeros(n), np.ones(n)
    integ = np.zeros(n)
    if integral:
        integ[x0:y0 + S * K] = 1
    c[x0:x0 + F * K] = comp.lin_f.ravel()
    c[y0:y0 + S * K] = comp.lin_s.ravel()
    for ei in range(E):
        cm = comp.e_cost[ei] * comp.C
        bad = ~np.isfinite(comp.e_time[ei]) | ~np.isfinite(cm)
        c[z0[ei]:z0[ei] + K * K] = np.where(bad, 0.0, cm).ravel()
        vub[z0[ei]:z0[ei] + K * K] = np.where(bad, 0.0, 1.0).ravel()
    for qi in range(Q):
        cm = comp.a_cost[qi] * comp.C
        bad = ~np.isfinite(comp.a_time[qi]) | ~np.isfinite(cm)
        c[a0[qi]:a0[qi] + K * K] = np.where(bad, 0.0, cm).ravel()
        vub[a0[qi]:a0[qi] + K * K] = np.where(bad, 0.0, 1.0).ravel()
    c[w0:w0 + G * K] = comp.g_cost.ravel()
    if with_delay:
        vub[t0:] = np.inf
        c[l0:l0 + U] = comp.delay_weight * comp.wu
        if comp.delay_bound is not None:
            vub[l0:l0 + U] = comp.delay_bound
    # Unreachable user/candidate pairs: an entry/exit function cannot go there.
    for f in set(comp.entries) | set(comp.exits):
        bad = ~np.isfinite(comp.t_req).all(axis=0) if U else np.zeros(K, bool)
        vub[x0 + f * K:x0 + (f + 1) * K][bad] = 0.0

    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(cs, vs, low, high):
        nonlocal r
        rows.extend([r] * len(cs))
        cols.extend(cs)
        vals.extend(vs)
        lo.append(low)
        hi.append(high)
        r += 1

    kk = np.arange(K)
    for f in range(F):
        add(list(x0 + f * K + kk), [1.0] * K, 1.0, 1.0)
    for s in range(S):
        add(list(y0 + s * K + kk), [1.0] * K, 1.0, 1.0)
    for k in range(K):
        add([x0 + f * K + k for f in range(F)], list(comp.cpu_dem[:, k]), -np.inf, comp.cap_cpu[k])
        add([x0 + f * K + k for f in range(F)], list(comp.mem), -np.inf, comp.cap_mem[k])
        if S and math.isfinite(comp.cap_sto[k]):
            add([y0 + s * K + k for s in range(S)], list(comp.size), -np.inf, comp.cap_sto[k])
    for ei, (g, f, _) in enumerate(comp.edges):
        for i in range(K):  # sum_j z[e,i,j] - x[g,i] = 0
            add(list(z0[ei] + i * K + kk) + [x0 + g * K + i], [1.0] * K + [-1.0], 0.0, 0.0)
        for j in range(K):  # sum_i z[e,i,j] - x[f,j] = 0
            add(list(z0[ei] + kk * K + j) + [x0 + f * K + j], [1.0] * K + [-1.0], 0.0, 0.0)
    for qi, (f, s, _) in enumerate(comp.acc):
        for i in range(K):
            add(list(a0[qi] + i * K + kk) + [x0 + f * K + i], [1.0] * K + [-1.0], 0.0, 0.0)
        for j in range(K):
            add(list(a0[qi] + kk * K + j) + [y0 + s * K + j], [1.0] * K + [-1.0], 0.0, 0.0)
    for gi, members in enumerate(comp.groups):
        for k in range(K):
            if comp.g_cost[gi, k] > 0:
                for f in members:  # x[f,k] - w[G,k] <= 0
                    add([x0 + f * K + k, w0 + gi * K + k], [1.0, -1.0], -np.inf, 0.0)
    if with_delay:
        for u in range(U):
            for f in range(F):
                # own time of f: sum_k x[f,k] proc[f,k] + sum_q sum_ij a[q,i,j] time_q[i,j]
                own_c = list(x0 + f * K + kk)
                own_v = list(comp.proc_delay[f])
                for qi in comp.f_acc[f]:
                    tm = np.where(np.isfinite(comp.a_time[qi]), comp.a_time[qi], 0.0).ravel()
                    own_c += list(a0[qi] + np.arange(K * K))
                    own_v += list(tm)
                tf = t0 + u * F + f
                if comp.preds[f]:
                    for ei in comp.preds[f]:  # T[u,f] >= T[u,g] + sum z*t + own
                        g = comp.edges[ei][0]
                        tm = np.where(np.isfinite(comp.e_time[ei]), comp.e_time[ei], 0.0).ravel()
                        add([tf, t0 + u * F + g] + list(z0[ei] + np.arange(K * K)) + own_c,
                            [1.0, -1.0] + list(-tm) + [-v for v in own_v], 0.0, np.inf)
                else:  # T[u,f] >= sum_k x[f,k] t_req[u,k] + own
                    treq = np.where(np.isfinite(comp.t_req[u]), comp.t_req[u], 0.0)
                    add([tf] + list(x0 + f * K + kk) + own_c, [1.0] + list(-treq) + [-v for v in own_v], 0.0, np.inf)
            for h in comp.exits:  # L[u] >= T[u,h] + sum_k x[h,k] t_resp[u,k]
                tresp = np.where(np.isfinite(comp.t_resp[u]), comp.t_resp[u], 0.0)
                add([l0 + u, t0 + u * F + h] + list(x0 + h * K + kk), [1.0, -1.0] + list(-tresp), 0.0, np.inf)
    A = coo_matrix((vals, (rows, cols)), shape=(r, n)).tocsr()
    return Formulation(c, A, np.array(lo), np.array(hi), vlb, vub, integ, x0, y0, z0, a0, n)


def solve_formulation(form: Formulation, time_limit: float | None, gap: float = 1e-7):
    options = {"disp": False, "mip_rel_gap": gap}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    with _stdout_to_stderr():  # HiGHS prints some diagnostics to fd 1, which must stay clean for --json
        return milp(form.c, constraints=LinearConstraint(form.A, form.lb, form.ub),
                    bounds=Bounds(form.vlb, form.vub), integrality=form.integrality, options=options)


@contextlib.contextmanager
def _stdout_to_stderr():
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


MAX_NONZEROS = 20_000_000  # ~1 GB while building: beyond this the MIP is refused, not attempted
FULL_BELOW = 60  # networks larger than this are restricted to the heuristic's candidate nodes


def size_estimate(comp: Compiled, users: int | None = None) -> tuple[int, int]:
    """(variables, constraint nonzeros) of :func:`build` for ``comp``, computed before building it."""
    K, F, S = comp.K, len(comp.fnames), len(comp.snames)
    E, Q, G = len(comp.edges), len(comp.acc), len(comp.groups)
    U = len(comp.users) if users is None else users
    pair = (E + Q) * K * K
    nvars = F * K + S * K + pair + G * K
    nnz = 2 * (F + S) * K + 2 * pair + 2 * (E + Q) * K + 2 * G * K * F
    if comp.needs_delay and U:
        nvars += U * (F + 1)
        nnz += U * (sum(len(comp.preds[f]) or 1 for f in range(F)) * (K + (E + Q) * K * K // max(E + Q, 1) + 2)
                    + len(comp.exits) * (K + 2))
    return nvars, int(nnz * 1.25)  # the estimate runs ~20 % low on the delay rows; err on the safe side


def check_size(comp: Compiled, what: str, users: int | None = None) -> None:
    nvars, nnz = size_estimate(comp, users)
    if nnz > MAX_NONZEROS:
        raise UsageError(f"{what}: this instance needs ~{nvars:,} variables and ~{nnz:,} nonzeros "
                         f"({comp.K} candidate nodes, {len(comp.fnames)} functions, {len(comp.users)} user nodes); "
                         f"the limit is {MAX_NONZEROS:,}: use --algorithm heuristic")


def solve(problem: Problem, time_limit: float | None = 60.0, candidates: list[str] | None = None,
          gap: float = 1e-7) -> Placement:
    """The optimum (or the best found within ``time_limit``, marked ``meta['optimal'] = False``).

    On networks of more than 60 nodes the MIP runs on the heuristic's candidate nodes (optimal over
    those, ``meta['candidates_restricted'] = True``); an instance whose model would exceed
    :data:`MAX_NONZEROS` is refused with a UsageError rather than exhausting memory.
    """
    start = time.perf_counter()
    restricted = False
    if candidates is None and len(problem.network.nodes) > FULL_BELOW:
        from .heuristic import candidates as pick

        candidates, restricted = pick(problem), True
    comp = Compiled(problem, candidates)
    check_size(comp, "MIP")
    form = build(comp, integral=True)
    res = solve_formulation(form, time_limit, gap)
    if res.x is None:
        if res.status == 1:  # time limit before any integral solution: the heuristic's plan, marked as such
            from . import heuristic

            plan = heuristic.solve(problem, candidate_nodes=candidates)
            plan.algorithm = "mip"
            plan.meta.update(optimal=False, fallback="heuristic", message=str(res.message),
                             seconds=time.perf_counter() - start)
            return plan
        raise Infeasible(f"MIP: no feasible placement ({res.message})")
    K, F, S = comp.K, len(comp.fnames), len(comp.snames)
    xs = res.x[form.x0:form.x0 + F * K].reshape(F, K)
    ys = res.x[form.y0:form.y0 + S * K].reshape(S, K)
    pf, ps = xs.argmax(axis=1), ys.argmax(axis=1) if S else np.zeros(0, int)
    return comp.placement(pf, ps, "mip", optimal=bool(res.status == 0) and not restricted,
                          candidates_restricted=restricted,
                          bound=float(getattr(res, "mip_dual_bound", res.fun) or res.fun),
                          objective=float(res.fun), seconds=time.perf_counter() - start, variables=form.nvars)
