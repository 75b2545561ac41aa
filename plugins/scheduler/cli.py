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
"""

EPILOG = """\
examples:
  remora scheduler                                  listen on 0.0.0.0:8002, metrics on :8003
  remora scheduler --listen 127.0.0.1:9000 --metrics-listen ''      no metrics endpoint
  remora scheduler --scorer bandit                  learn parent speed from piece times (UCB)
  remora scheduler --peer-ttl 30 --parent-limit 6   forget silent peers sooner, hand out more parents

metrics: GET http://HOST:8003/metrics (Prometheus), GET /healthz
"""


def register_scheduler(subparsers) -> None:
    p = subparsers.add_parser("scheduler", help="run the P2P scheduler (gRPC)", description=DESCRIPTION,
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="0.0.0.0:8002", metavar="HOST:PORT",
                   help="gRPC address (default: %(default)s)")
    p.add_argument("--metrics-listen", default="0.0.0.0:8003", metavar="HOST:PORT",
                   help="Prometheus /metrics address, '' to disable (default: %(default)s)")
    p.add_argument("--scorer", choices=("weighted", "bandit"), default="weighted",
                   help="parent scorer: fixed weighted sum, or UCB bandit on observed piece times "
                        "(default: %(default)s)")
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
        bandit_prior_weight=args.bandit_prior_weight,
        selection=SelectionConfig(candidate_limit=args.candidate_limit, parent_limit=args.parent_limit))


def run(args) -> int:
    import asyncio
    import signal

    from .server import SchedulerServer

    config = config_from_args(args)

    async def main() -> None:
        server = await SchedulerServer(config, args.listen, args.metrics_listen or None).start()
        print(f"remora scheduler: listening on {server.address}"
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
