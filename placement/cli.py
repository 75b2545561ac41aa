"""``remora place``: plan where a stateful serverless application's functions and state run.

Registering the parsers imports nothing heavy: numpy, scipy (HiGHS), networkx, matplotlib and PyYAML
come with the ``place`` extra and are imported when a sub-command runs, which reports a missing extra
as one clear line instead of breaking every other ``remora`` command.

Preheating: ``plan --preheat`` hands every (node, image) pair of the plan's ``deploy`` list to that
node's peer (placement/preheat.py, the peer's task API) and shows per-node progress. See
docs/placement.md §9.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from remora.errors import UsageError

EXTRA_MODULES = ("numpy", "scipy", "networkx", "matplotlib", "yaml")

EPILOG = """\
inputs:
  A remora placement spec (YAML or JSON, "version: 1": network, application, users; see
  docs/placement.md and examples/placement/app.yaml), or Kubernetes objects: one AppGroup
  (the workloads), one NetworkTopology (costs and bandwidth between regions/zones) and the
  Node objects (e.g. 'kubectl get nodes -o yaml'), in one or several files.

examples:
  remora place plan examples/placement/app.yaml
      plan with the default heuristic and print a table per function and state
  remora place plan examples/placement/app.yaml --algorithm mip --json
      the exact optimum (small instances), as JSON
  remora place plan app.yaml --algorithm approx --picture plan.png --manifests k8s/
      LP rounding; draw the placement; write one Deployment per function pinned to its node
  remora place plan examples/placement/appgroup.yaml examples/placement/networktopology.yaml \\
      examples/placement/nodes.yaml --users edge-1=20,edge-3=5
      plan an AppGroup on a NetworkTopology, with request rates per user-facing node
  remora place plan app.yaml --preheat --preheat-token-file /etc/remora/preheat-token
      plan, then have each node's peer (network.nodes[].peer, or --peer NODE=URL) fetch the
      images the plan puts there, with a progress bar per node
  remora place plan app.yaml --preheat --pull --preheat-token-file /etc/remora/preheat-token
      ... and have each node's snapshotter pull its remora images into containerd (peers run
      with --runtime-pull-api): a kubelet with imagePullPolicy IfNotPresent then pulls nothing
  remora place plan app.yaml --from-scheduler 10.0.0.5:8002 --tls-dir /etc/remora/place-tls \\
      --preheat --peer-port 65001
      plan on the live cluster: hosts, probe RTTs, measured bandwidth and the blobs each host
      holds, as the scheduler sees them (app.yaml: application and users; network.nodes only
      to give hosts their CPU, memory and prices), then preheat through each host's peer
  remora place compare examples/placement/app.yaml
      every algorithm side by side (cost, delay, planning time)
  remora place validate app.yaml       check an input and summarise it
  remora place algorithms              list the algorithms

exit codes: 0 ok, 1 a preheat failed, 2 usage, 3 invalid input, 4 scheduler refused the read,
5 file not found, 6 scheduler unreachable, 8 no feasible placement.
"""


def _need_extra() -> None:
    missing = []
    for mod in EXTRA_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise UsageError(f"remora place needs the 'place' extra (missing: {', '.join(missing)}): "
                         "pip install 'remora[place]'")


def register(sub) -> None:
    p = sub.add_parser("place", help="place a stateful serverless application on edge nodes",
                       description="Plan where the functions and state of an application run on edge nodes, "
                                   "minimising processing + transmission + storage + deployment cost "
                                   "(and request delay), under CPU/memory/storage capacities.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: p.print_help() or 2)
    ps = p.add_subparsers(dest="place_command", metavar="SUBCOMMAND")

    def inputs(q):
        q.add_argument("inputs", nargs="+", metavar="FILE",
                       help="spec file, or AppGroup + NetworkTopology + Node files")
        q.add_argument("--users", metavar="NODE=RATE,...", help="requests/s entering at each node (overrides the file)")
        q.add_argument("--k8s-rate", type=float, default=1.0, metavar="RPS",
                       help="Kubernetes input without --users: requests/s at every node (default 1)")
        q.add_argument("--ms-per-cost", type=float, default=1.0, metavar="MS",
                       help="Kubernetes input: milliseconds of delay per unit of networkCost (default 1)")
        q.add_argument("--delay-weight", metavar="COST_PER_S",
                       help="override the application's delay_weight (cost per second of mean delay)")
        q.add_argument("--delay-bound", metavar="DURATION", help="override the delay bound per request, e.g. 50ms")
        live = q.add_argument_group("live cluster (the network as a running remora scheduler sees it)")
        live.add_argument("--from-scheduler", metavar="HOST:PORT",
                          help="read hosts, probe RTTs, measured bandwidth and held blobs from this scheduler; the "
                               "one spec file gives the application and users (docs/placement.md 4.3)")
        sec = live.add_mutually_exclusive_group()
        sec.add_argument("--tls-dir", metavar="DIR",
                         help="member certificate of the cluster (ca.pem, cert.pem, key.pem; role manager, peer "
                              "or scheduler) for the scheduler's mutual TLS")
        sec.add_argument("--insecure-plain-mesh", action="store_true",
                         help="the scheduler runs --insecure-plain-mesh (labs only)")
        live.add_argument("--node-cpu", default="4", metavar="CPU",
                          help="CPU of a host the spec does not describe (default: %(default)s)")
        live.add_argument("--node-memory", default="8Gi", metavar="BYTES",
                          help="memory of a host the spec does not describe (default: %(default)s)")
        live.add_argument("--default-bandwidth", default="1Gbps", metavar="RATE",
                          help="link bandwidth when neither goodput nor upload capacity is known "
                               "(default: %(default)s)")
        live.add_argument("--peer-port", type=int, metavar="PORT",
                          help="--preheat: each host's peer task API is http://HOST_IP:PORT (its mirror listener)")

    plan = ps.add_parser("plan", help="compute a placement and show it",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    inputs(plan)
    plan.add_argument("--algorithm", "-a", default="heuristic",
                      help="heuristic (default), mip, approx, random, nearest, stateless")
    plan.add_argument("--json", action="store_true", help="print the plan and its evaluation as JSON")
    plan.add_argument("--picture", metavar="FILE.png|FILE.svg", help="draw the placement on the topology")
    plan.add_argument("--manifests", metavar="DIR", help="write Kubernetes manifests (node affinity per function)")
    plan.add_argument("--namespace", default="default", help="namespace for --manifests (default: default)")
    plan.add_argument("--time-limit", type=float, default=None, metavar="S", help="solver time limit (mip)")
    plan.add_argument("--seed", type=int, default=None, help="random seed (heuristic, approx, random)")
    pre = plan.add_argument_group("preheat (the nodes' peers fetch the images the plan puts on them)")
    pre.add_argument("--preheat", action="store_true",
                     help="after planning, have every node's peer fetch its images (exit 1 if any pair fails)")
    pre.add_argument("--peer", action="append", default=[], metavar="NODE=URL",
                     help="a node's peer (its mirror listener, e.g. http://10.0.1.17:65001); overrides the "
                          "spec's network.nodes[].peer; repeatable or comma-separated")
    pre.add_argument("--preheat-token-file", metavar="FILE",
                     help="the peers' preheat token (default $REMORA_PREHEAT_TOKEN)")
    pre.add_argument("--pull", action="store_true",
                     help="remora images: once a node holds the blobs, its snapshotter also pulls the image into "
                          "containerd (peers run with --runtime-pull-api), so the first start pulls nothing "
                          "(an OCI image is preheated and its pull skipped, said per pair)")
    pre.add_argument("--preheat-hot-only", action="store_true",
                     help="remora images: only the bootstrap and the hot blob (default: every blob)")
    pre.add_argument("--preheat-timeout", type=float, default=3600.0, metavar="S",
                     help="give up (and cancel) after this long (default 3600)")
    plan.set_defaults(func=_plan)

    cmp_ = ps.add_parser("compare", help="run several algorithms on one input and compare them")
    inputs(cmp_)
    cmp_.add_argument("--algorithms", default="heuristic,approx,mip,nearest,stateless,random",
                      help="comma-separated list (default: all)")
    cmp_.add_argument("--json", action="store_true")
    cmp_.set_defaults(func=_compare)

    val = ps.add_parser("validate", help="check an input file and summarise it")
    inputs(val)
    val.set_defaults(func=_validate)

    alg = ps.add_parser("algorithms", help="list the placement algorithms")
    alg.set_defaults(func=_algorithms)


def _load(args):
    _need_extra()
    from . import io

    users = io.parse_users(args.users) if args.users else None
    if getattr(args, "from_scheduler", None):
        problem = _load_live(args, users)
    else:
        if any(getattr(args, a, None) for a in ("tls_dir", "insecure_plain_mesh", "peer_port")):
            raise UsageError("--tls-dir, --insecure-plain-mesh and --peer-port go with --from-scheduler")
        problem = io.load(args.inputs, users=users, rate=args.k8s_rate, ms_per_cost=args.ms_per_cost)
    changes = {}
    if args.delay_weight is not None:
        changes["delay_weight"] = io.quantity("--delay-weight", args.delay_weight)
    if args.delay_bound is not None:
        changes["delay_bound"] = io.duration("--delay-bound", args.delay_bound)
    if changes:
        import dataclasses

        from .model import Problem
        problem = Problem(problem.network, dataclasses.replace(problem.app, **changes), problem.users)
    return problem


def _load_live(args, users):
    """The network from ``--from-scheduler``, the application and users from the one spec file."""
    from remora.meshapi import read_topology

    from . import io
    from .live import LiveDefaults, load_live

    defaults = LiveDefaults(cpu=io.cpu_millicores("--node-cpu", args.node_cpu),
                            memory=io.quantity("--node-memory", args.node_memory),
                            bandwidth=io.bandwidth("--default-bandwidth", args.default_bandwidth))
    if defaults.bandwidth <= 0:
        raise UsageError("--default-bandwidth must be > 0")
    if args.peer_port is not None and not 0 < args.peer_port < 65536:
        raise UsageError("--peer-port must be a TCP port (1-65535)")

    def fetch(digests):
        return read_topology(args.from_scheduler, tls_dir=args.tls_dir, insecure_plain=args.insecure_plain_mesh,
                             digests=digests)

    problem, topology = load_live(args.inputs, fetch, defaults, users)
    args.live_topology = topology
    return problem


def _options(args, algorithm: str) -> dict:
    opts = {}
    if algorithm == "mip" and args.time_limit is not None:
        opts["time_limit"] = args.time_limit
    if algorithm in ("random", "approx", "heuristic") and args.seed is not None:
        opts["seed"] = args.seed
    return opts


def _plan(args) -> int:
    if args.pull and not args.preheat:
        raise UsageError("--pull is a step of the preheat: add --preheat")
    problem = _load(args)
    from .model import evaluate
    from .output import manifests, picture, render_table, to_json
    from .solve import solve

    plan = solve(problem, args.algorithm, **_options(args, args.algorithm))
    ev = evaluate(problem, plan)
    if args.picture:
        picture(problem, plan, ev, args.picture)
    written = manifests(problem, plan, args.manifests, args.namespace) if args.manifests else []
    preheated = _preheat(args, problem, plan) if args.preheat else None
    if args.json:
        out = to_json(problem, plan, ev)
        if preheated is not None:
            out["preheat"] = preheated
        json.dump(out, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        render_table(problem, plan, ev)
        if args.picture:
            print(f"picture: {args.picture}")
        if written:
            print(f"manifests: {len(written)} files in {args.manifests}")
        if preheated is not None:
            from .preheat import summary
            print(summary(preheated))
    if not ev.feasible:
        return 8
    return 1 if preheated is not None and any(r["state"] != "succeeded" for r in preheated) else 0


def _preheat(args, problem, plan) -> list[dict]:
    from remora.taskapi import read_token

    from .output import deploy_list
    from .preheat import parse_peer_overrides, peers_from_inputs, preheat

    live = {}
    if getattr(args, "live_topology", None) is not None and args.peer_port:
        from .live import peer_urls
        live = peer_urls(args.live_topology, args.peer_port)
    peers = {**live, **peers_from_inputs(args.inputs), **parse_peer_overrides(args.peer)}
    token = read_token(args.preheat_token_file)
    return preheat(deploy_list(problem, plan), peers, token, want_all=not args.preheat_hot_only,
                   timeout=args.preheat_timeout, pull=args.pull)


def _compare(args) -> int:
    problem = _load(args)
    from rich.console import Console
    from rich.table import Table

    from remora.errors import RemoraError

    from .model import evaluate
    from .solve import ALGORITHMS, solve

    names = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    for name in names:
        if name not in ALGORITHMS:
            raise UsageError(f"unknown algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
    rows = []
    for name in names:
        try:
            plan = solve(problem, name)
        except RemoraError as exc:  # e.g. too large for the MIP, or infeasible: report and go on
            rows.append({"algorithm": name, "error": str(exc)})
            continue
        ev = evaluate(problem, plan)
        rows.append({"algorithm": name, "cost": ev.cost.total, "mean_delay": ev.mean_delay,
                     "max_delay": ev.max_delay, "objective": ev.objective, "feasible": ev.feasible,
                     "seconds": plan.meta.get("seconds")})
    if args.json:
        from .output import _finite
        json.dump(_finite(rows), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    t = Table(title=f"{problem.app.name}: {len(problem.network.nodes)} nodes, {len(problem.app.functions)} functions")
    for col in ("algorithm", "total cost", "mean delay ms", "max delay ms", "objective", "feasible", "seconds"):
        t.add_column(col, justify="left" if col == "algorithm" else "right")
    for r in rows:
        if "error" in r:
            t.add_row(r["algorithm"], r["error"], "", "", "", "no", "")
        else:
            t.add_row(r["algorithm"], f"{r['cost']:,.4f}", f"{r['mean_delay'] * 1000:,.2f}",
                      f"{r['max_delay'] * 1000:,.2f}",
                      f"{r['objective']:,.4f}", "yes" if r["feasible"] else "no", f"{r['seconds']:.2f}")
    Console().print(t)
    return 0


def _validate(args) -> int:
    problem = _load(args)
    app, net = problem.app, problem.network
    print(f"ok: application {app.name!r}: {len(app.functions)} functions, {len(app.edges)} edges, "
          f"{len(app.states)} states, {len(app.images)} images; network: {len(net.nodes)} nodes, "
          f"{len(net.links)} links; {len([u for u, r in problem.users.items() if r > 0])} user nodes, "
          f"{problem.total_rate:g} requests/s")
    return 0


def _algorithms(args) -> int:
    _need_extra()
    from .solve import ALGORITHMS

    for name, (_, desc) in ALGORITHMS.items():
        print(f"{name:10s} {desc}")
    return 0
