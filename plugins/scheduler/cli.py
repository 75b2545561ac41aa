"""``remora scheduler``: run the P2P scheduler (parsing only; the service is imported in ``run``)."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Run the P2P scheduler: peers register with it, announce the pieces of each blob they hold (or are
fetching), and ask it for parents. The first peer of a blob is told to fetch it from the registry (the
seed); the others get the best few parents, filtered (blocklisted, same host, no data, slow) and
scored (free upload slots, measured bandwidth, probe RTT, locality labels, pieces held).

Run several schedulers for availability: peers spread blobs over them by consistent hashing of the blob
digest (give every peer the same --scheduler list) and fail over to the next one when one is down.
Scheduler state is soft: a restarted scheduler is refilled by the peers' keepalives and announcements.

Only cluster members may use it: with --tls-dir the gRPC port speaks mutual TLS and accepts peers,
schedulers and the manager holding a certificate of the cluster CA (`remora certs`, docs/pki.md); a peer
may only register and act for the host id its certificate names. Without TLS the scheduler starts only
with --insecure-plain-mesh, and says so (log WARNING, metric remora_scheduler_mesh_tls 0).
"""

EPILOG = """\
examples:
  remora scheduler --tls-dir /etc/remora/tls --listen 10.0.0.5:8002    peers dial 10.0.0.5 (in its cert)
  remora scheduler --tls-dir DIR                    gRPC on 127.0.0.1:8002, metrics on 127.0.0.1:8003
  remora scheduler --insecure-plain-mesh --listen 127.0.0.1:9000 --metrics-listen ''   plain, no metrics
  remora scheduler --scorer bandit                  learn parent speed from piece times (UCB)
  remora scheduler --peer-ttl 30 --parent-limit 6   forget silent peers sooner, hand out more parents

metrics: GET http://HOST:8003/metrics (Prometheus), GET /healthz

Listeners default to loopback: give the node's address explicitly (--listen 10.0.0.5:8002); the
scheduler's certificate must name that address (remora certs issue --role scheduler --ip 10.0.0.5).
"""


def register_scheduler(subparsers) -> None:
    p = subparsers.add_parser("scheduler", help="run the P2P scheduler (gRPC)", description=DESCRIPTION,
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="127.0.0.1:8002", metavar="HOST:PORT",
                   help="gRPC address; use the node's address for a cluster (default: %(default)s)")
    p.add_argument("--metrics-listen", default="127.0.0.1:8003", metavar="HOST:PORT",
                   help="Prometheus /metrics address (plain HTTP), '' to disable (default: %(default)s)")
    sec = p.add_mutually_exclusive_group()
    sec.add_argument("--tls-dir", default=None, metavar="DIR",
                     help="mutual TLS: DIR/ca.pem (cluster CA), DIR/cert.pem + DIR/key.pem (role scheduler); "
                          "re-read when they change (rotation without restart)")
    sec.add_argument("--insecure-plain-mesh", action="store_true",
                     help="serve gRPC without TLS: any host that reaches the port can register, announce and "
                          "ask who holds which blob (labs only)")
    p.add_argument("--scorer", choices=("weighted", "bandit", "learned", "random"), default="weighted",
                   help="parent scorer: fixed weighted sum, UCB bandit on observed piece times, a cost model "
                        "trained by 'remora trainer' (--model-dir), or random (default: %(default)s)")
    p.add_argument("--model-dir", default=None, metavar="DIR",
                   help="learned scorer: directory 'remora trainer' publishes models to (newest is loaded "
                        "without restart)")
    p.add_argument("--model-max-age", type=float, default=7 * 24 * 3600.0, metavar="SECONDS",
                   help="learned scorer: an older model is not used, weighted instead (default: %(default)s)")
    p.add_argument("--model-max-error", type=float, default=0.5, metavar="REL",
                   help="learned scorer: a model whose validation median relative error is larger is not "
                        "used (default: %(default)s)")
    p.add_argument("--model-min-advantage", type=float, default=0.2, metavar="FRACTION",
                   help="learned scorer: use a model only if its held-out log error is at least this much below "
                        "the naive predictor's (default: %(default)s)")
    p.add_argument("--model-separation", type=float, default=2.0, metavar="X",
                   help="learned scorer: leave a decision to the weighted scorer when the model's predictions "
                        "for its candidates spread less than X times its own error; 0 always trusts the model "
                        "(default: %(default)s)")
    p.add_argument("--history-dir", default=None, metavar="DIR",
                   help="write download history (features of chosen parents, piece costs) for the trainer; "
                        "rotating, at most ~1 M rows (~300 MB)")
    p.add_argument("--peer-ttl", type=float, default=60.0, metavar="SECONDS",
                   help="forget a peer that sent nothing for this long (default: %(default)s)")
    p.add_argument("--parent-limit", type=int, default=4, metavar="N",
                   help="parents returned per request (default: %(default)s)")
    p.add_argument("--candidate-limit", type=int, default=40, metavar="N",
                   help="peers sampled per decision (default: %(default)s)")
    p.add_argument("--retry-after-ms", type=int, default=200, metavar="MS",
                   help="delay told to a peer when no parent has data yet (default: %(default)s)")
    p.add_argument("--max-schedule-failures", type=int, default=25, metavar="N",
                   help="parentless answers in a row before the peer is sent to the registry "
                        "(default: %(default)s)")
    p.add_argument("--max-piece-failures", type=int, default=3, metavar="N",
                   help="failed pieces in a row before a parent is blocklisted for that child and blob; "
                        "a corrupt piece blocklists at once (default: %(default)s)")
    p.add_argument("--probe-interval", type=float, default=30.0, metavar="SECONDS",
                   help="how often peers measure RTTs to each other (default: %(default)s)")
    p.add_argument("--bandit-c", type=float, default=0.05, metavar="C",
                   help="UCB exploration weight (rewards are in [0,1]) (default: %(default)s)")
    p.add_argument("--bandit-prior-weight", type=float, default=8.0, metavar="N",
                   help="how many pieces' worth of evidence the weighted score counts as for an "
                        "untried parent (default: %(default)s)")
    p.add_argument("--bandit-gamma", type=float, default=0.99, metavar="G",
                   help="UCB discount per observation, 1 = never forget (default: %(default)s)")
    m = p.add_argument_group("manager (membership and dynamic config from `remora manager`)")
    m.add_argument("--manager", default="", metavar="URL",
                   help="manager URL: register, keep alive (peers get this scheduler from it) and apply its dynamic "
                        "config without restart (https:// with --tls-dir: mutual TLS; http:// only with "
                        "--insecure-plain-mesh)")
    m.add_argument("--manager-token-file", default=None, metavar="FILE", help="join token for the manager")
    m.add_argument("--cluster", default=None, metavar="NAME", help="scheduler cluster to join (default: the join "
                   "token's, else the default cluster)")
    m.add_argument("--advertise", default="", metavar="IP", help="address peers dial (default: the --listen host)")
    m.add_argument("--idc", default="", help="IDC of this scheduler (shown by the manager)")
    m.add_argument("--location", default="", help="location of this scheduler (shown by the manager)")
    m.add_argument("--manager-state", default="/var/lib/remora/scheduler/manager-state.json", metavar="FILE",
                   help="last answers of the manager, used when it is down (default: %(default)s)")
    p.set_defaults(func=run)


def config_from_args(args):
    from remora.errors import UsageError

    from .selection import SelectionConfig
    from .server import SchedulerConfig

    if args.parent_limit < 1 or args.candidate_limit < 1:
        raise UsageError("--parent-limit and --candidate-limit must be >= 1")
    if args.retry_after_ms < 1:
        raise UsageError("--retry-after-ms must be >= 1")
    if args.probe_interval <= 0:
        raise UsageError("--probe-interval must be > 0")
    if args.bandit_c < 0 or not 0 < args.bandit_gamma <= 1 or args.bandit_prior_weight <= 0:
        raise UsageError("--bandit-c must be >= 0, --bandit-gamma in (0, 1], --bandit-prior-weight > 0")
    return SchedulerConfig(
        peer_ttl=args.peer_ttl, probe_interval=args.probe_interval, retry_after_ms=args.retry_after_ms,
        max_schedule_failures=args.max_schedule_failures, max_piece_failures=args.max_piece_failures,
        scorer=args.scorer, bandit_c=args.bandit_c, bandit_gamma=args.bandit_gamma,
        bandit_prior_weight=args.bandit_prior_weight, model_dir=args.model_dir,
        model_max_age=args.model_max_age, model_max_error=args.model_max_error,
        model_min_advantage=args.model_min_advantage, model_separation=args.model_separation,
        history_dir=args.history_dir,
        selection=SelectionConfig(candidate_limit=args.candidate_limit, parent_limit=args.parent_limit))


def managed_from_args(args, tls):
    """A factory of the server's manager agent, the flags checked now (usage errors before any start)."""
    import re
    from pathlib import Path

    from remora.errors import UsageError

    from .managed import ManagedScheduler

    url = args.manager
    if not re.match(r"^https?://[^/\s]+/?$", url):
        raise UsageError(f"--manager {url!r}: expected https://HOST:PORT")
    if url.startswith("https://") and not args.tls_dir:
        raise UsageError("an https:// manager needs --tls-dir (this scheduler's member certificate)")
    if url.startswith("http://") and args.tls_dir:
        raise UsageError("with --tls-dir the manager is reached over mutual TLS: use an https:// URL")
    if not args.manager_token_file:
        raise UsageError("--manager needs --manager-token-file (a join token: 'remora cluster join-token')")
    try:
        token = Path(args.manager_token_file).read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read --manager-token-file: {exc.strerror or exc}") from None
    if not token or any(c.isspace() for c in token):
        raise UsageError(f"--manager-token-file {args.manager_token_file}: no join token in it")
    hostname = tls.identity.host_id if tls is not None else ""
    return lambda server: ManagedScheduler(server, url, token, cluster=args.cluster, state_file=args.manager_state,
                                           tls_dir=args.tls_dir, advertise=args.advertise, idc=args.idc,
                                           location=args.location, hostname=hostname or "")


def run(args) -> int:
    import asyncio
    import signal

    from .server import SchedulerServer

    config = config_from_args(args)
    tls = None
    if args.tls_dir:
        from remora.pki.tls import Reloader, TLSFiles

        tls = Reloader(TLSFiles.in_dir(args.tls_dir))

    manager = None
    if args.manager:
        manager = managed_from_args(args, tls)

    async def main() -> None:
        server = SchedulerServer(config, args.listen, args.metrics_listen or None, tls=tls,
                                 insecure_plain=args.insecure_plain_mesh)
        if manager is not None:
            server.manager = manager(server)
        await server.start()
        print(f"remora scheduler: listening on {server.address} (mesh: {server.mesh})"
              + (f", metrics on http://{server.metrics_address}/metrics" if server.metrics_address else ""),
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(main())
    return 0
