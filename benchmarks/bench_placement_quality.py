#!/usr/bin/env python3
"""Placement quality on small instances: heuristic and approximation objective / MIP optimum.

    python benchmarks/bench_placement_quality.py                      # 50 instances, MIP limit 8 s (~5 min)
    python benchmarks/bench_placement_quality.py --seeds 10 --mip-time 10    # quick look

Each instance (``remora.placement.generators.random_problem``) draws 10-30 nodes and 5-15 functions
from its seed, alternating Waxman and transit-stub topologies, with user rates scaled so the
application needs ``--load`` times the largest node's CPU (default 1.2: no single node can host it
all, so the answer is not simply "everything on the biggest cheap node", which every algorithm finds).
Instances no algorithm can place (a function bigger than every node) are skipped and counted; seeds
continue until ``--seeds`` instances are solved.

The ratio is objective(algorithm) / objective(MIP optimum), all judged by ``model.evaluate`` (cost +
delay weight x mean delay). When HiGHS stops at the time limit (counted as ``mip not optimal``) the
optimum is unknown: the reference is then the best placement any of the three found (so the ratio is a
lower bound on the true one) and ``p95 vs bound`` uses HiGHS's dual bound instead (an upper bound).
Writes JSON and a PNG beside this script (``--out`` to change the stem).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remora.placement import model as m
from remora.placement.generators import random_problem
from remora.placement.mip import Infeasible
from remora.placement.solve import solve

ALGS = ("heuristic", "approx")


def instance(seed: int, load: float):
    rng = np.random.default_rng([seed, 12])
    n = int(rng.integers(10, 31))
    f = int(rng.integers(5, 16))
    kind = "waxman" if seed % 2 else "transit-stub"
    return kind, n, f, random_problem(n, f, seed, topology=kind, load=load)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--mip-time", type=float, default=8.0)
    ap.add_argument("--load", type=float, default=1.2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("bench_placement_quality")))
    args = ap.parse_args()

    rows, skipped, seed = [], 0, 0
    t0 = time.perf_counter()
    while len(rows) < args.seeds:
        kind, n, f, p = instance(seed, args.load)
        seed += 1
        try:
            mip = solve(p, "mip", time_limit=args.mip_time)
        except Infeasible:
            skipped += 1
            continue
        mip_obj = m.objective(p, mip)
        row = {"seed": seed - 1, "kind": kind, "nodes": n, "functions": f, "mip": mip_obj,
               "mip_optimal": bool(mip.meta.get("optimal")), "mip_bound": float(mip.meta.get("bound", mip_obj)),
               "mip_s": mip.meta["seconds"]}
        for alg in ALGS:
            try:
                pl = solve(p, alg)
                row[alg] = m.objective(p, pl)
            except Infeasible:
                row[alg] = math.inf
                pl = None
            row[f"{alg}_s"] = pl.meta["seconds"] if pl else math.nan
        # the reference: the MIP optimum, or when HiGHS stopped early the best placement anyone found
        opt = row["opt"] = min([mip_obj] + [row[a] for a in ALGS])
        row["mip_ratio"] = mip_obj / opt
        for alg in ALGS:
            row[f"{alg}_ratio"] = row[alg] / opt
        rows.append(row)
        print(f"  seed {seed - 1:3d} {kind:12s} {n:2d}x{f:2d}  mip {mip_obj:9.3f}{'' if row['mip_optimal'] else '*'}"
              f" ({row['mip_s']:5.1f}s)  " + "  ".join(f"{a} {row[a + '_ratio']:.3f}" for a in ALGS), flush=True)
    wall = time.perf_counter() - t0

    summary = {}
    print(f"\n{len(rows)} instances ({skipped} infeasible skipped), load {args.load}, "
          f"MIP limit {args.mip_time:g}s, {sum(not r['mip_optimal'] for r in rows)} mip not optimal, "
          f"wall {wall:.0f}s\n")
    hdr = f"{'algorithm':10s} {'median':>7s} {'p95':>7s} {'max':>7s} {'<=1.10':>7s} {'=opt':>6s} " \
          f"{'mean s':>7s} {'p95 vs bound':>12s}  target (median<=1.10, p95<=1.25)"
    print(hdr)
    print("-" * len(hdr))
    for alg in ALGS + ("mip",):
        r = np.array([x[f"{alg}_ratio"] for x in rows])
        vb = np.array([x[alg] / x["mip_bound"] if x["mip_bound"] > 0 else x[f"{alg}_ratio"] for x in rows])
        secs = np.array([x[f"{alg}_s"] for x in rows])
        # "higher": an actual instance's ratio (inf when an algorithm found nothing feasible there),
        # where linear interpolation would turn inf into nan
        med, p95 = float(np.median(r)), float(np.percentile(r, 95, method="higher"))
        ok = med <= 1.10 and p95 <= 1.25
        summary[alg] = {"median": med, "p95": p95, "max": float(r.max()),
                        "share_within_1.10": float((r <= 1.10).mean()),
                        "share_optimal": float((r <= 1 + 1e-6).mean()), "mean_seconds": float(np.nanmean(secs)),
                        "p95_vs_bound": float(np.percentile(vb, 95, method="higher")), "meets_target": ok}
        print(f"{alg:10s} {med:7.3f} {p95:7.3f} {r.max():7.3f} {(r <= 1.10).mean():7.0%} {(r <= 1 + 1e-6).mean():6.0%} "
              f"{np.nanmean(secs):7.2f} {np.percentile(vb, 95, method='higher'):12.3f}  "
              f"{'' if alg == 'mip' else ('MET' if ok else 'NOT MET')}")
    fails = {a: sum(not math.isfinite(x[a]) for x in rows) for a in ALGS}
    print("found no feasible placement where the MIP did: " + ", ".join(f"{a} {k}" for a, k in fails.items()))
    summary["no_feasible_placement"] = fails

    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "skipped": skipped, "wall_s": wall,
                                                     "summary": summary, "rows": rows}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for alg in ALGS:
        r = np.sort([x[f"{alg}_ratio"] for x in rows])
        label = alg + (f" ({fails[alg]} with no feasible placement: off the chart)" if fails[alg] else "")
        ax[0].step(r, np.arange(1, len(r) + 1) / len(r), where="post", label=label)
    for x, lab in ((1.10, "1.10 (median target)"), (1.25, "1.25 (p95 target)")):
        ax[0].axvline(x, ls="--", lw=0.8, color="grey")
        ax[0].text(x, 0.05, lab, rotation=90, fontsize=7, va="bottom")
    ax[0].axhline(0.5, lw=0.5, color="grey")
    ax[0].axhline(0.95, lw=0.5, color="grey")
    ax[0].set_xlabel("objective / MIP optimum (best known where the MIP timed out)")
    ax[0].set_ylabel("share of instances (ECDF)")
    ax[0].set_title(f"{len(rows)} instances, 10-30 nodes x 5-15 functions")
    ax[0].legend()
    for alg, mk in zip(ALGS, "ox"):
        ax[1].scatter([x["functions"] for x in rows], [x[f"{alg}_ratio"] for x in rows], marker=mk, label=alg, s=18)
    ax[1].set_xlabel("functions")
    ax[1].set_ylabel("objective / MIP")
    ax[1].set_title("ratio by application size")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
