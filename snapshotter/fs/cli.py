"""``remora mount-daemon --spec FILE``: the lazy-mount process as a (hidden) remora sub-command.

The snapshotter starts mounts with ``python -m remora.snapshotter.fs --spec FILE``; this sub-command
is the same entry point for operators who want to run one mount by hand. Call :func:`register` from
the snapshotter's cli module.
"""
from __future__ import annotations

import argparse

EPILOG = """\
examples:
  remora mount-daemon --spec /var/lib/remora/mounts/abc123.json

The spec is written by the snapshotter (remora.snapshotter.mount.MountManager); the process mounts,
serves until unmounted (umount / fusermount3 -u) or SIGTERM, and writes its counters to the spec's
stats_file every second.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("mount-daemon", description="Serve one lazy remora mount in the foreground.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, help="mount spec JSON (written by the snapshotter)")
    p.set_defaults(func=run)


def run(args) -> int:
    from remora.snapshotter.fs.daemon import run_spec

    return run_spec(args.spec)
