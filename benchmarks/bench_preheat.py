"""Preheat through the manager: an image onto N nodes vs onto one node (issue 13's target: ≤ 1.3×).

    sudo .venv/bin/python benchmarks/bench_preheat.py                       # 200 MB, 8 nodes, 100 Mbit/s, 3 repeats
    sudo .venv/bin/python benchmarks/bench_preheat.py --size-mb 50 --repeats 1 --json /tmp/p.json

A lab of real processes in network namespaces (tests/manager/managed_lab.py): a manager, two
schedulers, N peers on links of ``--rate`` each way and a registry whose uplink is ``--registry-rate``
(default: the same as a node's). For each repeat, two preheat jobs of a fresh image (random layers, never
seen by any peer): scope ``nodes`` with one node (the baseline, same run), then ``all_peers`` (N nodes).
Time is the job's own (created → finished, manager clock); a job counts only if it succeeded on every
node (the manager checks that each node holds every byte, verified). Also reported: registry egress
(blob bytes its access log shows served during the job) as a multiple of the image size, the other
target (≤ 1.05×); per job, each node's finish time, the blobs each node seeded (fetched from the
registry), the MB each node uploaded to other peers, CPU seconds by role, the schedulers' RPCs by method
and the peers' piece counters. Medians of ``--repeats``; the table and a JSON file with every run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "manager"))

from managed_lab import ManagedLab  # noqa: E402

from remora_testing.netlab import Lab, content  # noqa: E402
from remora_testing.netlab.mesh import PY, SCHEDULER_METRICS_PORT, parse_metrics  # noqa: E402


def make_image(work: Path, name: str, size: int, layers: int, seed: int) -> content.Image:
    """An image of ``layers`` random blobs totalling ``size`` bytes (preheat reads blobs, not tars)."""
    per = size // layers
    built = []
    for i in range(layers):
        path = work / f"{name}-layer{i}.bin"
        digest = content.random_blob(path, per, seed=seed * 100 + i)
        built.append(content.Layer(path=path, digest=digest, diff_id=digest, size=per))
    return content.build_image(f"bench/{name}", "v1", built)


ROLES = (("manager", " manager "), ("scheduler", " scheduler "), ("peer", " peer "), ("registry", "registry"))


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system, all threads) the lab's live processes have used, by role."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = " " + open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = next((name for name, needle in ROLES if needle in cmd), None)
        if role is not None:
            out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def scheduler_rpcs(ml: ManagedLab) -> dict[str, float]:
    """The RPCs both schedulers handled so far, by method (each read inside its namespace)."""
    prefix = 'remora_scheduler_rpc_duration_seconds_count{method="'
    total: dict[str, float] = {}
    for node in (ml.mesh.sched_node, ml.sched2_node):
        code = ("import urllib.request,sys;o=urllib.request.build_opener(urllib.request.ProxyHandler({}));"
                f"sys.stdout.write(o.open('http://{node.ip}:{SCHEDULER_METRICS_PORT}/metrics',timeout=10)"
                ".read().decode())")
        out = node.run([PY, "-c", code], check=False, timeout=30)
        for k, v in parse_metrics(out.stdout).items():
            if k.startswith(prefix):
                total[k[len(prefix):-2]] = total.get(k[len(prefix):-2], 0.0) + v
    return total


def run_job(ml: ManagedLab, image: content.Image, scope: dict, timeout: float) -> dict:
    ref = f"{ml.mesh.registry.host}/{image.repo}:{image.tag}"
    served0 = sum(ml.mesh.registry.blob_bytes_served().values())
    before = [ml.metrics(p) for p in ml.mesh.peers]
    rpcs0 = scheduler_rpcs(ml)
    job = ml.api("POST", "/api/v1/jobs", {"type": "preheat", "image": ref, "scope": scope, "timeout": timeout,
                                          "max_attempts": 1})
    cpu0 = cpu_by_role()
    view, samples = ml.watch_job(job["id"], timeout + 60)
    cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu_by_role().items()}
    if view["state"] not in ("succeeded", "failed", "cancelled"):
        raise SystemExit(f"job {job['id']} still {view['state']} after {timeout}s")
    timeline: dict[str, list] = {}     # node -> [[seconds since the job was created, bytes done], ...]
    for sample in samples:
        for host, (_state, done) in sample["nodes"].items():
            timeline.setdefault(host, []).append([sample["t"], done])
    served = sum(ml.mesh.registry.blob_bytes_served().values()) - served0
    rpcs = {k: int(v - rpcs0.get(k, 0.0)) for k, v in sorted(scheduler_rpcs(ml).items()) if v > rpcs0.get(k, 0.0)}
    # what the peers' piece traffic looked like: failures by reason, pieces served and refused
    counters: dict[str, float] = {}
    seeds: list[int] = []   # blobs each node fetched from the registry as the seed
    uploaded: list[float] = []   # MB each node served to other peers
    for p, b in zip(ml.mesh.peers, before):
        after = ml.metrics(p)
        name = 'remora_peer_back_to_source_total{reason="seed"}'
        seeds.append(int(after.get(name, 0.0) - b.get(name, 0.0)))
        name = "remora_peer_upload_bytes_total"
        uploaded.append(round((after.get(name, 0.0) - b.get(name, 0.0)) / 1e6, 1))
        for name, value in after.items():
            if name.startswith(("remora_peer_piece_failures_total", "remora_peer_upload_pieces_total",
                                "remora_peer_pieces_total", "remora_peer_back_to_source_total")):
                key = name.replace("remora_peer_", "")
                counters[key] = counters.get(key, 0) + value - b.get(name, 0.0)
    return {"state": view["state"], "seconds": round(view["finished_at"] - view["created_at"], 2),
            "nodes": len(view["nodes"]), "nodes_succeeded": sum(n["state"] == "succeeded" for n in view["nodes"]),
            "registry_egress_x_image": round(served / image.size, 3),
            "errors": sorted({n["error"][:160] for n in view["nodes"] if n["error"]}),
            "node_seconds": sorted(round(n["finished_at"] - view["created_at"], 2) for n in view["nodes"]
                                   if n.get("finished_at")),
            "cpu_seconds": cpu, "scheduler_rpcs": rpcs, "seeds_by_node": seeds,
            "uploaded_mb_by_node": uploaded, "peer_counters": {k: int(v) for k, v in sorted(counters.items()) if v},
            "timeline": timeline, "loadavg": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rate", default="100mbit", help="each node's link, each way")
    ap.add_argument("--registry-rate", default=None, help="registry uplink (default: --rate)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keepalive-interval", type=float, default=10.0,
                    help="the manager's --keepalive-interval (its default; the tests' lab uses 2 s)")
    ap.add_argument("--job-poll", type=float, default=1.0,
                    help="the manager's --job-poll (its default; the tests' lab polls every 0.2 s)")
    ap.add_argument("--config", metavar="JSON", help="publish this dynamic config (the body of PUT /api/v1/config's "
                    "\"config\") before the jobs, e.g. '{\"piece_size\": {\"min\": 1048576, \"max\": 16777216}}' "
                    "(default: none, the daemons' own flags)")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "bench_preheat.json")
    args = ap.parse_args()
    size = args.size_mb << 20
    runs = []
    lab = Lab(prefix="rbp-", offload=True)
    try:
        _run(args, lab, size, runs)
    finally:
        # ~8 GB per run at the defaults (the images, the registry, every peer's store) on a shared disk:
        # only the logs stay, for a look after a failure.
        for sub in Path(lab.workdir).iterdir() if Path(lab.workdir).is_dir() else ():
            if sub.name == "logs":
                continue
            if sub.is_dir() and not sub.is_symlink():
                shutil.rmtree(sub, ignore_errors=True)
            else:
                sub.unlink(missing_ok=True)
        print(f"logs: {lab.workdir}/logs", flush=True)
    report(args, runs)


def _run(args, lab: Lab, size: int, runs: list) -> None:
    with lab:
        ml = ManagedLab(lab, interval=args.keepalive_interval, peers=args.nodes, node_rate=args.rate,
                        registry_rate=args.registry_rate or args.rate, job_poll=args.job_poll)
        images = {(r, arm): make_image(lab.workdir, f"img{r}{arm}", size, args.layers, seed=10 * r + (arm == "all"))
                  for r in range(args.repeats) for arm in ("one", "all")}
        with ml.mesh.registry.loopback() as loop:   # filled from the root namespace, on 127.0.0.1
            for image in images.values():
                content.push_image(loop.url, image)
        ml.start()
        ml.wait(lambda: len(ml.api("GET", "/api/v1/members?type=peer&state=active")) == args.nodes
                and all(ml.status(p).get("schedulers") for p in ml.mesh.peers), 120, "every peer under the manager")
        if args.config:
            version = ml.api("PUT", "/api/v1/config", {"config": json.loads(args.config)})["version"]
            ml.wait(lambda: all((ml.status(p).get("manager") or {}).get("config", {}).get("version") == version
                                for p in ml.mesh.peers), 60, "every peer applying the config")
            time.sleep(args.keepalive_interval)     # the schedulers take it on their next keepalive
        first = ml.mesh.host_id(ml.mesh.peers[0])
        for r in range(args.repeats):
            for arm in ("one", "all"):
                scope = {"kind": "nodes", "nodes": [first]} if arm == "one" else {"kind": "all_peers", "cluster": "lab"}
                out = {"repeat": r, "arm": arm, **run_job(ml, images[(r, arm)], scope, args.timeout)}
                print(json.dumps({k: v for k, v in out.items() if k != "timeline"}), flush=True)
                runs.append(out)


def report(args, runs: list) -> None:
    med = {}
    for arm in ("one", "all"):
        ok = [x for x in runs if x["arm"] == arm and x["state"] == "succeeded"]
        egress = [x["registry_egress_x_image"] for x in ok]
        med[arm] = {"seconds": statistics.median(x["seconds"] for x in ok) if ok else None,
                    "registry_egress_x_image": statistics.median(egress) if ok else None,
                    "succeeded": len(ok), "runs": len([x for x in runs if x["arm"] == arm])}
    ratio = (round(med["all"]["seconds"] / med["one"]["seconds"], 2)
             if med["one"]["seconds"] and med["all"]["seconds"] else None)
    print(f"\npreheat of a {args.size_mb} MB image ({args.layers} layers), nodes on {args.rate}, registry uplink "
          f"{args.registry_rate or args.rate}, medians of {args.repeats}")
    print("| scope | nodes | seconds | registry egress (× image) | jobs succeeded |")
    print("|---|---:|---:|---:|---:|")
    print(f"| one node | 1 | {med['one']['seconds']} | {med['one']['registry_egress_x_image']} | "
          f"{med['one']['succeeded']}/{med['one']['runs']} |")
    print(f"| all peers | {args.nodes} | {med['all']['seconds']} | {med['all']['registry_egress_x_image']} | "
          f"{med['all']['succeeded']}/{med['all']['runs']} |")
    print(f"{args.nodes} nodes / 1 node: {ratio}x (target ≤ 1.3x); registry egress target ≤ 1.05x")
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                     "medians": med, "ratio_all_over_one": ratio}, indent=1))


if __name__ == "__main__":
    main()
