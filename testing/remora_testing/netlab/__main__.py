"""``python -m remora_testing.netlab cleanup [--prefix P] [--force]``: remove labs left by killed runs."""
from __future__ import annotations

import argparse
import sys

from remora.errors import RemoraError
from remora_testing.netlab.namespaces import DEFAULT_PREFIX, cleanup_stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m remora_testing.netlab",
        description="Maintenance of remora's network lab (namespaces, veths, blackhole routes).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m remora_testing.netlab cleanup            labs whose owner process is gone\n"
               "  python -m remora_testing.netlab cleanup --force    every lab with the prefix, even live ones",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cleanup", help="remove stale lab namespaces, blackhole routes and state files")
    c.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"namespace name prefix (default {DEFAULT_PREFIX})")
    c.add_argument("--force", action="store_true", help="also remove labs whose owner is still running")
    args = p.parse_args(argv)
    try:
        removed = cleanup_stale(args.prefix, force=args.force)
    except RemoraError as exc:
        print(f"netlab cleanup: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for item in removed:
        print(f"removed {item}")
    if not removed:
        print("nothing to clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
