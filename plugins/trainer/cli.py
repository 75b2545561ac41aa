"""``remora trainer``: train the learned scorer's cost model (parsing only; numpy/sklearn load in ``run``)."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Fit the cost model of the scheduler's learned scorer (remora scheduler --scorer learned) on the download
history schedulers write (remora scheduler --history-dir): gradient-boosted trees predicting a parent's
piece cost from what the scheduler knew when it chose it (measured goodput per host pair and host,
declared bandwidth, probe RTT, load, pieces held, locality). The newest rows are held out to validate the
model; the model and its metadata (version, features, training rows, validation error, created time) are
published atomically as DIR/model-NNNNNN.json, which schedulers pick up without a restart.
"""

EPILOG = """\
examples:
  remora trainer --history-dir /var/lib/remora/history --model-dir /var/lib/remora/models
  remora trainer --history-dir H --model-dir M --max-rows 1000000 --holdout 0.1

Needs scikit-learn (and numpy). See docs/p2p.md, "Learned parent selection".
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("trainer", help="train the learned parent scorer's cost model",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--history-dir", required=True, metavar="DIR", help="download history (newline JSON files)")
    p.add_argument("--model-dir", required=True, metavar="DIR", help="where models are published")
    p.add_argument("--max-rows", type=int, default=2_000_000, metavar="N",
                   help="train on the newest N rows (default: %(default)s)")
    p.add_argument("--min-rows", type=int, default=200, metavar="N",
                   help="refuse to train on fewer usable rows (default: %(default)s)")
    p.add_argument("--holdout", type=float, default=0.2, metavar="SHARE",
                   help="newest share of rows kept out for validation (default: %(default)s)")
    p.add_argument("--max-iter", type=int, default=100, metavar="N", help="boosting rounds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="threads for the fit, 0 = every core; 1 on a machine busy with other work "
                        "(default: %(default)s)")
    p.add_argument("--keep", type=int, default=5, metavar="N", help="model versions kept (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from remora.errors import UsageError

    if args.max_rows < 1 or args.min_rows < 1 or args.max_iter < 1 or args.keep < 1 or args.threads < 0:
        raise UsageError("--max-rows, --min-rows, --max-iter and --keep must be >= 1")
    if not 0 < args.holdout < 1:
        raise UsageError("--holdout must be between 0 and 1")
    try:
        from .train import TrainConfig, summary, train_and_publish
    except ModuleNotFoundError as exc:
        raise UsageError(f"remora trainer needs scikit-learn and numpy ({exc})") from None
    config = TrainConfig(max_rows=args.max_rows, min_rows=args.min_rows, holdout=args.holdout,
                         max_iter=args.max_iter, keep=args.keep, threads=args.threads)
    path, meta = train_and_publish(args.history_dir, args.model_dir, config)
    print(f"remora trainer: published {path}")
    print(summary(meta))
    return 0
