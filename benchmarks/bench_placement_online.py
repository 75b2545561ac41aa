#!/usr/bin/env python3
"""Online placement under unknown, drifting link delays: cumulative regret of the UCB learner vs baselines.

    python benchmarks/bench_placement_online.py                    # 10,000 rounds, 3 drift kinds x 3 seeds (~2-3 min)
    python benchmarks/bench_placement_online.py --rounds 2000 --seeds 1     # quick look

Instance per seed: a 40-node transit-stub network and an 8-function stateful application
(``generators.random_problem``) with a high delay weight (a latency-sensitive application, so the
planner's choice depends on the delays it believes). The arms are the distinct placements the heuristic
picks under 12 delay scenarios (declared delays, then every link scaled by lognormal(0, 0.8)), the
application co-located on each of the 12 sites nearest the users that can hold it (at this load the
heuristic co-locates, so *which site* is the real question), and the ``nearest`` and ``stateless``
baselines (``online.candidate_placements``, ``online.colocated_placements``). The hidden true link
delays differ from the declared ones (lognormal(0, ``--mismatch`` = 0.8) per link: stale probes),
each request sees a gamma-distributed delay per link (CV 0.5), and the means drift:

* ``none``: stationary;
* ``abrupt``: at rounds T/3 and 2T/3, 30% of the links change their mean by a factor in [1/4, 4];
* ``sine``: every link's mean swings by up to 2x either way with its own phase, two periods over T.

Learners (``remora.placement.online``): ``link-ucb`` (per-link UCB feeding the arm choice
optimistically), ``link-ucb+replan`` (the same, and every 1,000 rounds the heuristic re-plans on the
optimistic link delays; a new placement becomes an arm), ``link-ucb(gamma=0.999)`` (discounted, for
drift), ``eps-greedy(0.1)`` (same per-link estimates, ε-greedy exploration), ``arm-ucb`` (UCB1 over
whole placements, request delays only) and ``static`` (the placement best at the declared delays).
Regret is against the best fixed arm in hindsight on the same realised delays (same run, same rounds
for every learner); for drift also the *dynamic* regret against the arm best at the current true
means. Writes JSON and a PNG beside this script.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remora.placement.generators import DelayProcess, random_problem
from remora.placement.online import (
    ArmUCB,
    EpsilonGreedy,
    LinkUCB,
    OnlineInstance,
    StaticPlan,
    candidate_placements,
    colocated_placements,
    run,
)
from remora.placement.simulate import Router
from remora.placement.solve import solve

DRIFTS = ("none", "abrupt", "sine")


def learners(arms, declared, seed):
    return [LinkUCB(arms, declared), LinkUCB(arms, declared, gamma=0.999),
            EpsilonGreedy(arms, declared, eps=0.1, seed=seed), ArmUCB(arms, declared), StaticPlan(arms, declared)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10_000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=40)
    ap.add_argument("--functions", type=int, default=8)
    ap.add_argument("--mismatch", type=float, default=0.8,
                    help="sigma of the lognormal factor between declared and true link means")
    ap.add_argument("--out", default=str(Path(__file__).with_name("bench_placement_online")))
    args = ap.parse_args()
    T = args.rounds
    t0 = time.perf_counter()
    checkpoints = sorted({c for c in (100, 1000, T // 2, T) if c <= T})
    results: dict[str, dict[str, list]] = {d: {} for d in DRIFTS}
    curves: dict[str, dict[str, np.ndarray]] = {d: {} for d in DRIFTS}
    meta = []
    for seed in range(args.seeds):
        p = random_problem(args.nodes, args.functions, seed, topology="transit-stub", delay_weight=500.0)
        cands = candidate_placements(p, lambda q: solve(q, "heuristic", time_budget=1.0), scenarios=12, spread=0.8,
                                     seed=seed, extra=colocated_placements(p, 12) + [solve(p, "nearest"),
                                                                                    solve(p, "stateless")])
        declared = Router(p).declared

        def planner(q, _solve=solve):
            return _solve(q, "heuristic", time_budget=1.0)

        meta.append({"seed": seed, "arms": len(cands), "links": int(declared.size), "users": len(p.users)})
        print(f"seed {seed}: {len(cands)} arms, {declared.size} links, {len(p.users)} user nodes", flush=True)
        for drift in DRIFTS:
            dp = DelayProcess(declared, [seed, 7], mismatch=args.mismatch, shape=4.0, drift=drift, horizon=T)
            inst = OnlineInstance.build(p, cands, dp, T, seed=seed)
            # the re-planning learner grows its own copy of the arm set; everyone's regret is then taken
            # against the best fixed arm of that larger set, so the figures stay comparable
            grown = inst.copy()
            rl = LinkUCB(grown.arms, declared, planner=planner, replan_every=1000)
            rres = run(grown, rl)
            dyn = grown.dynamic_best() if drift != "none" else None
            ref = grown.losses
            best_mean = float(ref.mean(axis=0).min())
            outcome = [(rl.name, rres, sum(new for _, new in rl.replans))]
            for lr in learners(inst.arms, declared, seed):
                outcome.append((lr.name, run(inst, lr, dynamic=dyn, reference=ref), None))
            for name, res, added in outcome:
                if dyn is not None and res.dynamic_regret is None:
                    res.dynamic_regret = np.cumsum(res.loss - dyn)
                s = res.summary(checkpoints)
                s["regret_pct_of_best"] = 100 * s["regret_per_round"] / best_mean
                if added is not None:
                    s["arms_added"] = added
                results[drift].setdefault(name, []).append(s)
                c = res.regret / best_mean
                curves[drift][name] = curves[drift].get(name, 0) + c / args.seeds
            print(f"  {drift:7s} done ({time.perf_counter() - t0:.0f}s)", flush=True)

    summary = {}
    for drift in DRIFTS:
        print(f"\ndrift={drift}: regret per round (ms) vs the best fixed placement in hindsight, mean of "
              f"{args.seeds} seed(s)")
        hdr = f"{'learner':22s} " + " ".join(f"{'@' + str(c):>8s}" for c in checkpoints) + \
              f" {'% of best':>9s} {'dyn/round':>9s} {'mean ms':>8s} {'switches':>8s}"
        print(hdr)
        print("-" * len(hdr))
        summary[drift] = {}
        for name, ss in results[drift].items():
            at = {c: float(np.mean([s["regret_per_round_at"][c] for s in ss])) for c in checkpoints}
            pct = float(np.mean([s["regret_pct_of_best"] for s in ss]))
            dyn = float(np.mean([s.get("dynamic_regret_per_round", np.nan) for s in ss]))
            md = float(np.mean([s["mean_delay"] for s in ss]))
            sw = float(np.mean([s["switches"] for s in ss]))
            summary[drift][name] = {"regret_per_round_at": at, "regret_pct_of_best": pct,
                                    "dynamic_regret_per_round": dyn, "mean_delay": md, "switches": sw}
            if "arms_added" in ss[0]:
                summary[drift][name]["arms_added"] = float(np.mean([s["arms_added"] for s in ss]))
            added = summary[drift][name].get("arms_added")
            print(f"{name:22s} " + " ".join(f"{at[c] * 1e3:8.3f}" for c in checkpoints) +
                  f" {pct:8.2f}% {dyn * 1e3:9.3f} {md * 1e3:8.1f} {sw:8.0f}" +
                  (f"  (+{added:.1f} arms from re-planning)" if added is not None else ""))
    ucb = summary["none"]["link-ucb"]["regret_per_round_at"]
    eps = summary["none"]["eps-greedy(0.1)"]["regret_per_round_at"]
    falling = (all(ucb[a] >= ucb[b] for a, b in itertools.pairwise(checkpoints[1:]))
               and ucb[T] < 0.25 * max(ucb[checkpoints[1]], 1e-12))
    below = all(summary[d]["link-ucb(gamma=0.999)"]["regret_pct_of_best"]
                < summary[d]["eps-greedy(0.1)"]["regret_pct_of_best"] for d in DRIFTS) and ucb[T] < eps[T]
    summary["targets"] = {"ucb_regret_per_round_falls_stationary": bool(falling), "ucb_below_eps_greedy": bool(below)}
    wall = time.perf_counter() - t0
    print(f"\ntargets: link-ucb regret/round falling toward 0 (stationary): {'MET' if falling else 'NOT MET'}; "
          f"below ε-greedy: {'MET' if below else 'NOT MET'}   (wall {wall:.0f}s)")

    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "wall_s": wall, "instances": meta,
                                                     "summary": summary, "runs": results}, indent=1, default=str))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 3, figsize=(15, 7.5))
    x = np.arange(1, T + 1)
    for j, drift in enumerate(DRIFTS):
        for name, c in curves[drift].items():
            ax[0, j].plot(x, c, label=name)
            ax[1, j].plot(x, c / x, label=name)
        ax[0, j].set_title(f"drift={drift}: cumulative regret")
        ax[0, j].set_ylabel("regret (in rounds of the best arm's mean delay)")
        ax[1, j].set_title(f"drift={drift}: regret per round / best mean delay")
        ax[1, j].set_xscale("log")
        ax[1, j].axhline(0, color="grey", lw=0.6)
        ax[1, j].set_ylim(-0.03, 0.12)   # arm-ucb starts far above (see the top row)
        ax[1, j].set_xlabel("round")
        ax[0, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
