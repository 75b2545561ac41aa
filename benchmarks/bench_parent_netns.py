#!/usr/bin/env python3
"""Parent scorers on real processes in network namespaces: learned vs weighted vs bandit vs random (issue 14).

The simulator (bench_parent_selection.py, bench_parent_learning.py) compares the scheduler's scorers on a
model of a network; this runs them with the real ``remora peer`` and ``remora scheduler`` processes in a
lab of namespaces (remora_testing.netlab), links shaped with tc tbf:

* ``--nodes`` nodes (default 8), each a namespace with its own peer (mutual TLS, as in production), a
  registry behind a limited uplink (``--registry-rate``), a scheduler in its own namespace;
* settings: ``het`` — node uplinks cycling over ``--het-rates`` (default 5/20/80 Mbit/s, in a fixed
  shuffled order so uplink speed is not the node index), and ``homog`` — every uplink ``--homog-rate``;
  every downlink ``--down-rate``;
* workload of one run: ``--blobs`` fresh blobs of ``--blob-mib`` MiB; blob b is released ``b x --gap``
  seconds after "go", and the nodes ask for it one after another, ``--stagger`` seconds apart, in an order
  drawn per blob from a fixed seed (the same in every arm, so the seed node of each blob is the same). A
  completion time is from a node's own request to its last verified byte (each client hashes the blob and
  checks the digest and the length);
* arms: one run per scorer; before each run the scheduler is restarted with ``--scorer ARM`` and every
  peer is restarted with an empty store (the same blobs are reused, so all arms move the same bytes);
* ``learned``: before the repeats, ``--warmup-runs`` runs with the weighted scorer write download history
  (``--history-dir``), ``remora trainer`` fits a model on it and the learned arm runs with ``--model-dir``.
  Whether the model's gates let it act is read from the scheduler's metrics
  (``remora_scheduler_scorer_fallbacks_total{reason}``: ``no_advantage`` = the model did not beat the naive
  predictor on held-out history, so every decision went to the weighted scorer; ``no_separation`` = the
  model could not tell that decision's candidates apart) and from the predicted-cost histogram (parents the
  model ranked). A learned arm that fell back is reported as such: that is a finding, not a failure; it
  then plays the weighted scorer again, a same-run noise floor. ``learned-open`` runs the same model with
  its gates opened (``--model-max-error 1000 --model-min-advantage 0 --model-separation 0``: the model ranks
  every decision), to show what the model itself would have done.

Repeats alternate the arm order (forward, then reversed) so the machine's other load falls on every arm
alike; per repeat the mean and p95 completion time of each arm are divided by the weighted arm's of the
same repeat, and the table gives the medians of those ratios over the repeats. The machine's load average
(before/after every run) and the CPU count are in the JSON: on a shared 2-core machine they say how much
the figures can be trusted.

No user-space delay proxy is used: the links differ in rate, not latency (the probes' RTTs are equal).

    python benchmarks/bench_parent_netns.py --smoke                       # 4 nodes, 1 MiB, 1 repeat (~45 s)
    python benchmarks/bench_parent_netns.py --json benchmarks/bench_parent_netns.json   # 8 nodes, both settings
    python benchmarks/bench_parent_netns.py --settings het --repeats 5 --nodes 10

Needs root (namespaces, tc) and scikit-learn (the trainer). Cleans up its labs, processes and work
directory, also on Ctrl-C (the logs of the last lab are kept with ``--keep-logs``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from remora_testing.netlab import Lab, cleanup_stale, content
from remora_testing.netlab.mesh import PY, REMORA, SCHEDULER_METRICS_PORT, Mesh, MeshOptions, metric, parse_metrics
from remora_testing.netlab.namespaces import nsenter_argv

PREFIX = "rpn-"
REPO = "bench/parents"
ARMS = ("weighted", "bandit", "random", "learned", "learned-open")
#: scheduler flags of each arm beyond ``--scorer``; "learned-open" is the same model with its gates opened
#: (any validation error, no advantage needed, every decision ranked by the model): what the model itself does
OPEN_GATES = ["--model-max-error", "1000", "--model-min-advantage", "0", "--model-separation", "0"]
FALLBACK_REASONS = ("no_model", "stale", "error_too_high", "no_advantage", "no_separation")

#: One client per node: prints "ready", waits for "go", then fetches every blob of its schedule at its
#: offset (one thread each), hashing it; one JSON line per blob. Standard library only.
CLIENT = """import hashlib, json, sys, threading, time
plan = json.loads(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
go = time.time()
lock = threading.Lock()
def fetch(item):
    offset, url = item["offset"], item["url"]
    time.sleep(max(0.0, go + offset - time.time()))
    start = time.time()
    h, n, status, error = hashlib.sha256(), 0, 0, ""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    try:
        import urllib.request
        with urllib.request.urlopen(url, timeout=300) as resp:
            status = resp.status
            while (got := resp.readinto(buf)):
                h.update(view[:got])
                n += got
    except Exception as exc:
        error = str(exc)[:300]
    end = time.time()
    with lock:
        print(json.dumps({"blob": item["blob"], "status": status, "bytes": n, "sha256": "sha256:" + h.hexdigest(),
                          "offset": offset, "seconds": end - start, "end": end - go, "error": error}), flush=True)
threads = [threading.Thread(target=fetch, args=(it,)) for it in plan]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    v = sorted(values)
    return (v[len(v) // 2] + v[(len(v) - 1) // 2]) / 2 if v else float("nan")


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile (the value at least 95 % of the samples do not exceed)."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = max(0, -(-95 * len(v) // 100) - 1)
    return v[k]


def uplinks(setting: str, n: int, args) -> list[str]:
    if setting == "homog":
        return [args.homog_rate] * n
    rates = [r.strip() for r in args.het_rates.split(",") if r.strip()]
    cycle = [rates[i % len(rates)] for i in range(n)]
    random.Random(7).shuffle(cycle)      # uplink speed unrelated to the node index (and the start order)
    return cycle


def schedule(n_nodes: int, n_blobs: int, gap: float, stagger: float, seed: int) -> dict[int, list[tuple[int, float]]]:
    """node -> [(blob, offset s)]: blob b from b x gap, nodes in a per-blob order drawn from ``seed``."""
    rng = random.Random(seed)
    plan: dict[int, list[tuple[int, float]]] = {i: [] for i in range(n_nodes)}
    for b in range(n_blobs):
        order = list(range(n_nodes))
        rng.shuffle(order)
        for k, node in enumerate(order):
            plan[node].append((b, round(b * gap + k * stagger, 3)))
    return plan


class Bench:
    """One lab (one link setting): restarts the scheduler and the peers per arm, runs the workload."""

    def __init__(self, lab: Lab, args, setting: str, blobs: list[tuple[Path, str]], size: int):
        self.args, self.setting, self.blobs, self.size = args, setting, blobs, size
        self.rates = uplinks(setting, args.nodes, args)
        peer_rates = {i: (r, args.down_rate) for i, r in enumerate(self.rates)}
        self.mesh = Mesh(lab, MeshOptions(peers=args.nodes, registry_rate=args.registry_rate, peer_rates=peer_rates,
                                          containerd=False, tls=not args.plain_mesh))
        self.history_dir = lab.workdir / "history"
        self.model_dir = lab.workdir / "models"
        self.model_dir.mkdir(parents=True, exist_ok=True)
        with self.mesh.registry.loopback() as loop:
            for path, digest in blobs:
                content.push_blob(loop.url, REPO, path=path, digest=digest)
        self.mesh.registry.start()

    # ------------------------------------------------------------------------------------ processes
    def restart(self, scorer: str, extra: list[str]) -> None:
        """Stop every peer and the scheduler, empty the peers' stores, start the scheduler with ``scorer``
        and the peers again: each run starts from nothing (no pieces, no estimates, no bandit arms)."""
        mesh = self.mesh
        live = [p.daemon for p in mesh.peers if p.daemon is not None] + ([mesh.scheduler] if mesh.scheduler else [])
        for d in live:   # SIGTERM all first, then wait for each: one grace period, not N
            if d.alive():
                try:
                    os.killpg(d.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for d in live:
            d.stop(grace=10)
        for p in mesh.peers:
            shutil.rmtree(p.data_dir, ignore_errors=True)
        mesh.opts.scorer = scorer
        mesh.opts.scheduler_args = extra
        mesh.start_scheduler()
        for p in mesh.peers:
            mesh.start_peer(p, wait=False)
        for p in mesh.peers:
            mesh.wait_peer(p)

    def scheduler_metrics(self) -> dict[str, float]:
        node = self.mesh.sched_node
        code = ("import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
                f"'http://{node.ip}:{SCHEDULER_METRICS_PORT}/metrics',timeout=10).read().decode())")
        return parse_metrics(node.run([PY, "-c", code], check=False, timeout=30).stdout)

    # ------------------------------------------------------------------------------------- workload
    def workload(self, seed: int) -> list[dict]:
        """Every node runs its schedule; one result per (node, blob), checked against the blob's digest."""
        plan = schedule(self.args.nodes, len(self.blobs), self.args.gap, self.args.stagger, seed)
        procs = []
        for i, p in enumerate(self.mesh.peers):
            items = [{"blob": b, "offset": off, "url": self.mesh.blob_url(p, REPO, self.blobs[b][1])}
                     for b, off in plan[i]]
            procs.append(subprocess.Popen(nsenter_argv(p.node.ns) + [PY, "-c", CLIENT, json.dumps(items)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        try:
            for proc in procs:
                if proc.stdout.readline().strip() != "ready":
                    raise SystemExit("a fetch client did not start")
            for proc in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            results = []
            for i, proc in enumerate(procs):
                out, _ = proc.communicate(timeout=self.args.run_timeout)
                for line in out.strip().splitlines():
                    r = json.loads(line)
                    r["node"] = i
                    r["uplink"] = self.rates[i]
                    results.append(r)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        want = {(i, b) for i in range(self.args.nodes) for b in range(len(self.blobs))}
        got = {(r["node"], r["blob"]) for r in results}
        bad = [r for r in results if r["status"] != 200 or r["bytes"] != self.size
               or r["sha256"] != self.blobs[r["blob"]][1]]
        if bad or got != want:
            raise SystemExit(f"{self.setting}: {len(bad)} fetch(es) got the wrong bytes, {len(want - got)} missing: "
                             f"{bad[:2]}\n{self.mesh.log_tails(8)}")
        return results

    def run(self, arm: str, seed: int, extra: list[str], label: str) -> dict:
        scorer = "learned" if arm.startswith("learned") else arm
        self.restart(scorer, extra)
        load0 = os.getloadavg()
        t0 = time.monotonic()
        results = self.workload(seed)
        wall = time.monotonic() - t0
        m = self.scheduler_metrics()
        times = [r["seconds"] for r in results]
        run = {"arm": arm, "scorer": scorer, "label": label, "wall_s": round(wall, 2),
               "mean_s": sum(times) / len(times),
               "p95_s": p95(times), "max_s": max(times), "fetches": len(results),
               "verified": len(results),   # workload() raises unless every fetch matched its digest and length
               "by_uplink_mean_s": {u: round(sum(r["seconds"] for r in results if r["uplink"] == u)
                                             / max(1, sum(1 for r in results if r["uplink"] == u)), 3)
                                    for u in sorted(set(self.rates))},
               "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()],
               "parents_returned": metric(m, "remora_scheduler_parents_returned_total"),
               "history_rows": metric(m, "remora_scheduler_history_rows_total")}
        if scorer == "learned":
            ranked = metric(m, "remora_scheduler_predicted_cost_seconds_per_mib_count")
            run["model_version"] = metric(m, "remora_scheduler_model_version")
            run["parents_ranked_by_model"] = ranked
            run["fallbacks"] = {r: metric(m, "remora_scheduler_scorer_fallbacks_total", reason=r)
                                for r in FALLBACK_REASONS}
            run["model_share"] = ranked / run["parents_returned"] if run["parents_returned"] else 0.0
        log(f"{self.setting} {label} {arm:12s}: mean {run['mean_s']:.2f}s p95 {run['p95_s']:.2f}s "
            f"(wall {wall:.1f}s, load {load0[0]:.1f}->{run['load_after'][0]:.1f})"
            + (f", model ranked {run['model_share'] * 100:.0f}% of parents, fallbacks "
               f"{ {k: int(v) for k, v in run['fallbacks'].items() if v} }" if scorer == "learned" else ""))
        return run

    # --------------------------------------------------------------------------------------- learned
    def collect_and_train(self) -> dict:
        """Weighted runs with --history-dir, then ``remora trainer``; the model file's gates, or its error."""
        out: dict = {"warmup_runs": []}
        for w in range(self.args.warmup_runs):
            out["warmup_runs"].append(self.run("weighted", 1000 + w, ["--history-dir", str(self.history_dir)],
                                               f"warmup{w}"))
        self.mesh.stop_scheduler()        # flushes the history buffer
        rows = sum(1 for f in self.history_dir.glob("history-*.ndjson") for _ in f.open())
        out["history_rows"] = rows
        argv = [*REMORA, "trainer", "--history-dir", str(self.history_dir), "--model-dir", str(self.model_dir),
                "--threads", "1", "--min-rows", str(self.args.min_rows)]
        t0 = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        out["train_s"] = round(time.monotonic() - t0, 2)
        out["trainer_rc"] = proc.returncode
        models = sorted(self.model_dir.glob("model-*.json"))
        if proc.returncode != 0 or not models:
            out["trainer_error"] = (proc.stderr or proc.stdout).strip()[-500:]
            log(f"{self.setting}: trainer failed ({out['trainer_error']}); the learned arm runs without a model")
            return out
        doc = json.loads(models[-1].read_text())
        val = doc["validation"]
        naive = val["naive"]["median_abs_log_error"]
        out["model"] = {"file": models[-1].name, "training_rows": doc["training_rows"],
                        "median_rel_error": val["median_rel_error"],
                        "median_abs_log_error": val["median_abs_log_error"], "naive_median_abs_log_error": naive,
                        "advantage": 1 - val["median_abs_log_error"] / naive if naive > 0 else None}
        log(f"{self.setting}: trained on {doc['training_rows']} of {rows} rows in {out['train_s']}s: held-out log "
            f"error {val['median_abs_log_error']:.3f} vs naive {naive:.3f} (advantage "
            f"{out['model']['advantage'] if out['model']['advantage'] is None else round(out['model']['advantage'], 3)}"
            f", gate needs >= 0.2), median rel error {val['median_rel_error']:.3f} (gate <= 0.5)")
        return out


def changed_since(t: float) -> list[str]:
    """The peer's, the scheduler's, the trainer's and the core's source files modified after ``t``."""
    root = Path(__file__).resolve().parent.parent
    return sorted(str(f.relative_to(root)) for d in ("plugins/peer", "plugins/scheduler", "plugins/trainer", "remora")
                  for f in (root / d).rglob("*.py") if f.stat().st_mtime > t)


def summarize(runs: list[dict]) -> dict:
    """Per arm: medians over repeats of mean/p95 and of their ratios to the weighted arm of the same repeat."""
    out = {}
    by_rep: dict[str, dict[str, dict]] = {}
    for r in runs:
        by_rep.setdefault(r["label"], {})[r["arm"]] = r
    for arm in ARMS:
        rs = [rep[arm] for rep in by_rep.values() if arm in rep]
        if not rs:
            continue
        pairs = [(rep[arm], rep["weighted"]) for rep in by_rep.values() if arm in rep and "weighted" in rep]
        s = {"repeats": len(rs), "mean_s_median": median([r["mean_s"] for r in rs]),
             "p95_s_median": median([r["p95_s"] for r in rs]),
             "mean_ratio_median": median([a["mean_s"] / w["mean_s"] for a, w in pairs]),
             "p95_ratio_median": median([a["p95_s"] / w["p95_s"] for a, w in pairs]),
             "p95_ratio_range": [min(a["p95_s"] / w["p95_s"] for a, w in pairs),
                                 max(a["p95_s"] / w["p95_s"] for a, w in pairs)] if pairs else None,
             "verified": sum(r["verified"] for r in rs), "fetches": sum(r["fetches"] for r in rs)}
        if arm.startswith("learned"):
            s["model_share_median"] = median([r["model_share"] for r in rs])
            fb = {k: sum(r["fallbacks"][k] for r in rs) for k in FALLBACK_REASONS}
            s["fallbacks"] = fb
            if s["model_share_median"] > 0:
                s["status"] = f"model ranked {s['model_share_median'] * 100:.0f}% of parents"
            else:
                top = max(fb, key=lambda k: fb[k]) if any(fb.values()) else "none"
                s["status"] = f"FELL BACK to weighted ({top})"
        out[arm] = s
    return out


def report(res: dict) -> str:
    lines = [f"parent scorers in namespaces: {res['config']['nodes']} nodes, {res['config']['blobs']} blobs x "
             f"{res['config']['blob_mib']} MiB, registry uplink {res['config']['registry_rate']}, downlinks "
             f"{res['config']['down_rate']}, {'mutual TLS' if res['config']['tls'] else 'plain'}, "
             f"{res['cpus']} CPUs, load avg at start {res['load_start'][0]:.2f}"]
    lines.append("| setting | arm | repeats | mean s | p95 s | mean / weighted | p95 / weighted [min-max] | "
                 "verified | learned: gates |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for setting, s in res["settings"].items():
        for arm, a in s["summary"].items():
            rng = a["p95_ratio_range"]
            lines.append(f"| {setting} ({'/'.join(sorted(set(s['uplinks']), key=lambda x: float(x[:-4])))}) | {arm} | "
                         f"{a['repeats']} | {a['mean_s_median']:.2f} | {a['p95_s_median']:.2f} | "
                         f"{a['mean_ratio_median']:.2f} | {a['p95_ratio_median']:.2f} "
                         f"[{rng[0]:.2f}-{rng[1]:.2f}] | {a['verified']}/{a['fetches']} | {a.get('status', '')} |")
    for setting, s in res["settings"].items():
        t = s["training"]
        if "model" in t:
            m = t["model"]
            lines.append(f"{setting}: model from {t['history_rows']} history rows ({m['training_rows']} trained), "
                         f"held-out log error {m['median_abs_log_error']:.3f} vs naive "
                         f"{m['naive_median_abs_log_error']:.3f} -> advantage "
                         f"{m['advantage'] if m['advantage'] is None else round(m['advantage'], 3)} (gate 0.2), "
                         f"median rel error {m['median_rel_error']:.3f} (gate 0.5), trained in {t['train_s']}s")
        else:
            lines.append(f"{setting}: no model ({t.get('trainer_error', '?')})")
    return "\n".join(lines)


def run_setting(args, setting: str, blobs: list[tuple[Path, str]], size: int, workdir: Path) -> dict:
    out: dict = {}
    with Lab(prefix=PREFIX, workdir=workdir / setting, offload=True) as lab:
        bench = Bench(lab, args, setting, blobs, size)
        out["uplinks"] = bench.rates
        log(f"lab {lab.name} ({setting}): uplinks {bench.rates}")
        out["training"] = bench.collect_and_train()
        runs = []
        for rep in range(args.repeats):
            order = list(ARMS) if rep % 2 == 0 else list(reversed(ARMS))
            for arm in order:
                extra = ["--model-dir", str(bench.model_dir)] if arm.startswith("learned") else []
                extra += OPEN_GATES if arm == "learned-open" else []
                runs.append(bench.run(arm, 2000 + rep, extra, f"rep{rep}"))
            if args.deadline and time.time() > args.deadline:
                log(f"deadline reached after {rep + 1} repeat(s)")
                break
        out["runs"] = runs
        out["summary"] = summarize(runs)
        if args.keep_logs:
            shutil.copytree(lab.workdir / "logs", Path(args.keep_logs) / setting, dirs_exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--settings", default="het,homog", help="comma list of het, homog")
    p.add_argument("--het-rates", default="5mbit,20mbit,80mbit", help="uplinks of the het setting (cycled)")
    p.add_argument("--homog-rate", default="20mbit", help="every uplink of the homog setting")
    p.add_argument("--down-rate", default="100mbit", help="every node's downlink")
    p.add_argument("--registry-rate", default="20mbit", help="the registry's uplink")
    p.add_argument("--blobs", type=int, default=3)
    p.add_argument("--blob-mib", type=int, default=8)
    p.add_argument("--gap", type=float, default=4.0, help="seconds between blob releases")
    p.add_argument("--stagger", type=float, default=0.5, help="seconds between the nodes' requests of a blob")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup-runs", type=int, default=3, help="weighted runs that write history for the trainer")
    p.add_argument("--min-rows", type=int, default=200, help="the trainer's --min-rows")
    p.add_argument("--run-timeout", type=float, default=600)
    p.add_argument("--deadline", type=float, default=0,
                   help="unix time: no new repeat starts after it (shared out equally over the settings)")
    p.add_argument("--plain-mesh", action="store_true", help="no TLS between peers (default: mutual TLS)")
    p.add_argument("--smoke", action="store_true", help="4 nodes, 2 blobs of 1 MiB, 1 repeat, het only (CI)")
    p.add_argument("--cache", default="/var/cache/remora-test", help="where the test blobs are kept")
    p.add_argument("--workdir", default="", help="lab state and logs (default: a temp dir, removed at the end)")
    p.add_argument("--keep-logs", default="", metavar="DIR", help="copy every lab's logs here")
    p.add_argument("--json", help="also write the raw figures here")
    args = p.parse_args(argv)
    if args.smoke:
        args.nodes, args.blobs, args.blob_mib, args.repeats, args.settings = 4, 2, 1, 1, "het"
        args.warmup_runs, args.min_rows, args.gap, args.stagger = 1, 10, 0.5, 0.2
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not settings or set(settings) - {"het", "homog"} or args.nodes < 2 or args.blobs < 1 or args.repeats < 1:
        p.error("--settings: het and/or homog; --nodes >= 2, --blobs >= 1, --repeats >= 1")
    cleanup_stale(PREFIX)   # a previous run killed with -9
    size = args.blob_mib << 20
    cache = Path(args.cache) / "netlab"
    blobs = []
    for b in range(args.blobs):
        path = cache / f"parents-{args.blob_mib}mib-{b}.bin"
        blobs.append((path, content.random_blob(path, size, seed=3000 + b)))
    own_workdir = not args.workdir
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="remora-bench-parents-"))
    res: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "cache", "workdir", "keep_logs")},
                 "cpus": os.cpu_count(), "load_start": list(os.getloadavg()), "started": time.time(), "settings": {}}
    res["config"]["tls"] = not args.plain_mesh
    try:
        deadline = args.deadline
        for n, setting in enumerate(settings):
            if deadline:   # each setting gets its share of the time left, so the last is not starved
                args.deadline = time.time() + (deadline - time.time()) / (len(settings) - n)
            res["settings"][setting] = run_setting(args, setting, blobs, size, workdir)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    res["load_end"] = list(os.getloadavg())
    # Every run starts new processes from the working tree: an edit made meanwhile changes the code measured.
    res["code_changed_during_run"] = changed_since(res["started"])
    if res["code_changed_during_run"]:
        log(f"WARNING: code changed while the benchmark ran: {res['code_changed_during_run']}")
    res["seconds"] = round(time.time() - res["started"], 1)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
