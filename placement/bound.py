"""A lower bound on the optimum over the *whole* network, small enough for 1,000 nodes (docs/placement.md §7.5).

The LP relaxation of §5/§7 has a flow variable per commodity and node pair (K² each), so on a large
network it only runs on candidate nodes, and a value on a subset of the nodes bounds nothing. This LP
keeps every node and is linear in the node count, at the price of a weaker (but still valid) bound:

* x[f,k], y[s,k] in [0,1] (each row sums to 1), node capacities, image groups w[G,k] >= x[f,k];
  the node-linear costs (processing, user traffic, storage) are exact;
* a DAG edge or a state access whose two ends are apart pays at least the cheapest link leaving the
  sender's node (every route from k starts with one of k's links; link costs and delays are >= 0, and
  the bottleneck bandwidth is at most that of the widest link at k). Separation is measured by
  d[e,k] >= x[g,k] - x[f,k] (>= 0): for an integral placement sum_k d[e,k] is 1 when apart, else 0;
* the delay recursion of §5 with those per-node minimum transfer and access times:
  T[u,f] >= T[u,g] + M[e] + P[f], entries T[u,e] >= sum_k t_req[u,k] x[e,k] + P[e],
  L[u] >= T[u,h] + sum_k t_resp[u,k] x[h,k], where P[f] (processing + minimum state-access time) and
  M[e] (minimum transfer time) are shared by all users.

Every integral placement satisfies these rows with a value at most its true objective, so the LP value
is <= the optimum. Tests compare it with the exact MIP on small instances.
"""
from __future__ import annotations

import math
import time

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from .arrays import deployment_groups
from .model import GB, Problem


def lower_bound(problem: Problem, cost_weight: float = 1.0, delay_weight: float | None = None,
                cost_cap: float | None = None) -> dict:
    """{'bound': LP value, 'seconds', 'nodes', 'status', ...}: a lower bound on the least
    ``cost_weight * cost + delay_weight * mean delay`` any capacity-feasible placement achieves (by default
    the application's own objective; (1, 0) bounds the cost alone, (0, 1) the mean delay alone).
    ``cost_cap`` adds "the cost's lower-bound terms <= cost_cap": with (0, 1) the result bounds the mean
    delay of every placement costing at most ``cost_cap`` (infeasible, bound = inf, if none can)."""
    start = time.perf_counter()
    net, app = problem.network, problem.app
    N = len(net.nodes)
    pt = problem.paths
    R, H = problem.requests, app.horizon
    users = [u for u, r in problem.users.items() if r > 0]
    U = len(users)
    rate = np.array([problem.users[u] for u in users], dtype=float)
    wu = rate / rate.sum() if U else rate
    urows = [pt.row(net.index[u]) for u in users]
    Du = np.array([r[0] for r in urows]).reshape(U, N)
    Bu = np.array([r[1] for r in urows]).reshape(U, N)
    Cu = np.array([r[2] for r in urows]).reshape(U, N)
    # Per node: the cheapest, quickest and widest link leaving it (lower bounds on any route's first hop).
    cmin, dmin, bmax = np.full(N, np.inf), np.full(N, np.inf), np.zeros(N)
    for link in net.links:
        for a in (net.index[link.a], net.index[link.b]):
            cmin[a] = min(cmin[a], link.cost_per_gb)
            dmin[a] = min(dmin[a], link.delay)
            bmax[a] = max(bmax[a], link.bandwidth)
    cmin = np.where(np.isfinite(cmin), cmin, 0.0)
    dmin = np.where(np.isfinite(dmin), dmin, 0.0)

    fnames = [f.name for f in app.functions]
    fi = {n: i for i, n in enumerate(fnames)}
    si = {s.name: i for i, s in enumerate(app.states)}
    F, S = len(fnames), len(app.states)
    nodes = net.nodes
    speed = np.array([n.speed for n in nodes])
    cpu_cost = np.array([n.cpu_cost for n in nodes])
    lin_f = np.array([R * f.cpu * cpu_cost for f in app.functions]).reshape(F, N)
    users_req = (H * rate[:, None] * Cu).sum(axis=0) if U else np.zeros(N)
    entries = [fi[n] for n in app.entries]
    exits = [fi[n] for n in app.exits]
    for f in entries:
        lin_f[f] = lin_f[f] + users_req * app.request_bytes / GB
    for h in exits:
        lin_f[h] = lin_f[h] + users_req * app.response_bytes / GB
    lin_s = np.array([s.size / GB * np.array([n.storage_cost for n in nodes]) * H / 3600.0
                      for s in app.states]).reshape(S, N)
    cpu_dem = np.array([[problem.cpu_demand(f, n) for n in nodes] for f in app.functions]).reshape(F, N)
    proc = np.array([f.cpu / speed for f in app.functions]).reshape(F, N)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_req = Du + np.where(app.request_bytes > 0, app.request_bytes / Bu, 0.0)
        t_resp = Du + np.where(app.response_bytes > 0, app.response_bytes / Bu, 0.0)
    edges = [(fi[e.src], fi[e.dst], e.bytes) for e in app.edges]
    acc = [(fi[a.function], si[a.state], a.read + a.write) for a in app.accesses]
    with np.errstate(divide="ignore"):
        inv_b = np.where(bmax > 0, 1.0 / bmax, np.inf)
    glist, g_cost = deployment_groups(app, nodes)
    E, Q, G = len(edges), len(acc), len(glist)
    wd = app.delay_weight if delay_weight is None else delay_weight
    with_delay = (wd > 0 or app.delay_bound is not None) and U > 0

    # Variable layout.
    n = 0
    x0 = n
    n += F * N
    y0 = n
    n += S * N
    w0 = n
    n += G * N
    e0 = n
    n += E * N
    a0 = n
    n += Q * N
    p0 = m0 = t0 = l0 = n
    if with_delay:
        p0 = n
        n += F
        m0 = n
        n += E
        t0 = n
        n += U * F
        l0 = n
        n += U
    c = np.zeros(n)
    ub = np.ones(n)
    c[x0:x0 + F * N] = np.where(np.isfinite(lin_f), lin_f, 0.0).ravel()
    ub[x0:x0 + F * N] = np.where(np.isfinite(lin_f), 1.0, 0.0).ravel()
    if with_delay:  # an entry/exit function cannot go where a user cannot reach
        bad = ~np.isfinite(t_req).all(axis=0) | ~np.isfinite(t_resp).all(axis=0)
        for f in set(entries) | set(exits):
            ub[x0 + f * N:x0 + (f + 1) * N][bad] = 0.0
    c[y0:y0 + S * N] = lin_s.ravel()
    c[w0:w0 + G * N] = g_cost.ravel()
    for ei, (_g, _f, _b) in enumerate(edges):
        c[e0 + ei * N:e0 + (ei + 1) * N] = R * _b / GB * cmin
    for qi, (_f, _s, rw) in enumerate(acc):
        c[a0 + qi * N:a0 + (qi + 1) * N] = R * rw / GB * cmin
    if with_delay:
        ub[p0:] = np.inf
        c[l0:l0 + U] = wd * wu
        if app.delay_bound is not None:
            ub[l0:l0 + U] = app.delay_bound

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    r = 0
    lo: list[np.ndarray] = []
    hi: list[np.ndarray] = []

    def block(rr, cc, vv, low, high, nrows):
        nonlocal r
        rows.append(np.asarray(rr) + r)
        cols.append(np.asarray(cc))
        vals.append(np.asarray(vv, dtype=float))
        lo.append(np.broadcast_to(np.asarray(low, dtype=float), (nrows,)))
        hi.append(np.broadcast_to(np.asarray(high, dtype=float), (nrows,)))
        r += nrows

    kk = np.arange(N)
    for base, cnt in ((x0, F), (y0, S)):  # each object on one node
        if cnt:
            block(np.repeat(np.arange(cnt), N), base + np.arange(cnt * N), np.ones(cnt * N), 1.0, 1.0, cnt)
    # Capacities (rows per node).
    block(np.tile(kk, F), x0 + np.arange(F * N), cpu_dem.ravel(), -np.inf, np.array([x.cpu for x in nodes]), N)
    block(np.tile(kk, F), x0 + np.arange(F * N), np.repeat([f.memory for f in app.functions], N), -np.inf,
          np.array([x.memory for x in nodes]), N)
    sto = np.array([x.storage for x in nodes])
    if S:
        fin = np.isfinite(sto)
        block(np.tile(kk, S), y0 + np.arange(S * N), np.repeat([s.size for s in app.states], N), -np.inf,
              np.where(fin, sto, np.inf), N)
    # x[f,k] - w[G,k] <= 0
    for gi, members in enumerate(glist):
        for f in members:
            block(np.concatenate([kk, kk]), np.concatenate([x0 + f * N + kk, w0 + gi * N + kk]),
                  np.concatenate([np.ones(N), -np.ones(N)]), -np.inf, 0.0, N)
    # Separation: x[g,k] - x[f,k] - d[e,k] <= 0 ; x[f,k] - y[s,k] - d[q,k] <= 0
    for ei, (g, f, _) in enumerate(edges):
        block(np.tile(kk, 3), np.concatenate([x0 + g * N + kk, x0 + f * N + kk, e0 + ei * N + kk]),
              np.concatenate([np.ones(N), -np.ones(N), -np.ones(N)]), -np.inf, 0.0, N)
    for qi, (f, s, _) in enumerate(acc):
        block(np.tile(kk, 3), np.concatenate([x0 + f * N + kk, y0 + s * N + kk, a0 + qi * N + kk]),
              np.concatenate([np.ones(N), -np.ones(N), -np.ones(N)]), -np.inf, 0.0, N)
    if with_delay:
        preds: list[list[int]] = [[] for _ in range(F)]
        for ei, (_g, f, _) in enumerate(edges):
            preds[f].append(ei)
        # P[f] - sum_k proc x - sum_q sum_k amin d[q,k] >= 0   (own time of f, a lower bound)
        for f in range(F):
            cc = [np.array([p0 + f]), x0 + f * N + kk]
            vv = [np.ones(1), -proc[f]]
            for qi, (f2, _s, rw) in enumerate(acc):
                if f2 == f:
                    cc.append(a0 + qi * N + kk)
                    vv.append(-(2 * dmin + rw * inv_b))
            cc_a, vv_a = np.concatenate(cc), np.concatenate(vv)
            vv_a = np.where(np.isfinite(vv_a), vv_a, 0.0)
            block(np.zeros(len(cc_a), int), cc_a, vv_a, 0.0, np.inf, 1)
        # M[e] - sum_k tmin d[e,k] >= 0
        for ei, (_g, _f, b) in enumerate(edges):
            tm = dmin + (b * inv_b if b > 0 else 0.0)
            tm = np.where(np.isfinite(tm), tm, 0.0)
            block(np.zeros(N + 1, int), np.concatenate([[m0 + ei], e0 + ei * N + kk]),
                  np.concatenate([[1.0], -tm]), 0.0, np.inf, 1)
        for u in range(U):
            for f in range(F):
                tf = t0 + u * F + f
                for ei in preds[f]:  # T[u,f] - T[u,g] - M[e] - P[f] >= 0
                    g = edges[ei][0]
                    block(np.zeros(4, int), [tf, t0 + u * F + g, m0 + ei, p0 + f], [1.0, -1.0, -1.0, -1.0],
                          0.0, np.inf, 1)
                if not preds[f]:  # T[u,f] - sum_k t_req x[f,k] - P[f] >= 0
                    tr = np.where(np.isfinite(t_req[u]), t_req[u], 0.0)
                    block(np.zeros(N + 2, int), np.concatenate([[tf, p0 + f], x0 + f * N + kk]),
                          np.concatenate([[1.0, -1.0], -tr]), 0.0, np.inf, 1)
            for h in exits:  # L[u] - T[u,h] - sum_k t_resp x[h,k] >= 0
                tr = np.where(np.isfinite(t_resp[u]), t_resp[u], 0.0)
                block(np.zeros(N + 2, int), np.concatenate([[l0 + u, t0 + u * F + h], x0 + h * N + kk]),
                      np.concatenate([[1.0, -1.0], -tr]), 0.0, np.inf, 1)
    if cost_cap is not None:  # the cost terms (every column before the delay variables) <= cap
        nz = np.nonzero(c[:p0])[0]
        block(np.zeros(len(nz), int), nz, c[nz], -np.inf, cost_cap, 1)
    c[:p0] *= cost_weight
    A = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, n)).tocsr()
    lo_a, hi_a = np.concatenate(lo), np.concatenate(hi)
    # linprog wants A_ub x <= b_ub and A_eq x = b_eq: split the two-sided rows.
    eq = lo_a == hi_a
    up = ~eq & np.isfinite(hi_a)
    dn = ~eq & np.isfinite(lo_a)
    from scipy.sparse import vstack
    A_ub = vstack([A[up], -A[dn]]).tocsr()
    b_ub = np.concatenate([hi_a[up], -lo_a[dn]])
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A[eq], b_eq=lo_a[eq],
                  bounds=np.stack([np.zeros(n), ub], axis=1), method="highs")
    value = float(res.fun) if res.status == 0 else (math.inf if res.status == 2 else math.nan)
    return {"bound": value, "seconds": time.perf_counter() - start, "nodes": N, "status": res.message,
            "variables": n, "rows": r}
