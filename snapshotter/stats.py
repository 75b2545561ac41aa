"""Show what the lazy mounts of a snapshotter are doing, as a table (or JSON).

Reads the same files the Prometheus endpoint (``remora snapshotter --metrics-address``) exports: each
mount's published counters under ``<root>/lazy/mounts/`` and the shared chunk cache's index. It never
talks to an fs process, so a hung mount cannot hang it; liveness is probed with a short timeout.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """\
examples:
  remora stats                                  the default snapshotter root
  remora stats --root /var/lib/remora/snapshotter --json
  curl -s 127.0.0.1:9128/metrics                the same numbers, for Prometheus
                                                (remora snapshotter --metrics-address 127.0.0.1:9128)
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("stats", help="show the lazy mounts, fetch and cache counters of a snapshotter",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/var/lib/remora/snapshotter", metavar="DIR",
                   help="the snapshotter's --root (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def collect(root: Path) -> dict:
    from remora.cache import ChunkCache
    from remora.snapshotter.mount import MountManager

    mounts = MountManager(root / "lazy", root / "cache")
    out = {"mounts": [], "cache": None}
    limit = None
    for mount_id in mounts.ids():
        spec = mounts.spec(mount_id)
        limit = spec.cache_limit
        health = mounts.check(mount_id, timeout=1.0)
        data = mounts.stats(mount_id) or {}
        out["mounts"].append({"id": mount_id, "state": health.state, "detail": health.detail,
                              "mountpoint": spec.mountpoint, "fetch": data.get("fetch", {}),
                              "cache": data.get("cache", {})})
    if (root / "cache").exists():
        cache = ChunkCache(root / "cache", limit) if limit else ChunkCache(root / "cache")
        try:
            out["cache"] = cache.info()
        finally:
            cache.close()
    return out


def run(args) -> int:
    from remora.errors import NotFound

    root = Path(args.root)
    if not root.is_dir():
        raise NotFound(f"no snapshotter state at {root} (give the snapshotter's --root)")
    data = collect(root)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"remora lazy mounts ({root})")
    for col in ("mount", "state", "fetched", "requests", "merged", "cache hit/miss", "prefetch", "failures"):
        t.add_column(col, justify="left" if col in ("mount", "state") else "right")
    for m in data["mounts"]:
        f, c = m["fetch"], m["cache"]
        prefetch = f"{f.get('prefetch_files_done', 0)}/{f.get('prefetch_files_total', 0)}" + \
                   (" done" if f.get("prefetch_done") else "")
        t.add_row(m["id"], m["state"], f"{f.get('bytes_fetched', 0) / 1e6:.1f} MB", str(f.get("requests", 0)),
                  str(f.get("merged_requests", 0)), f"{c.get('cache_hits', f.get('cache_hits', 0))}/"
                  f"{c.get('cache_misses', f.get('cache_misses', 0))}", prefetch,
                  str(f.get("fetch_failures", 0) + f.get("verify_failures", 0)))
    console = Console()
    console.print(t)
    if data["cache"]:
        ci = data["cache"]
        console.print(f"chunk cache: {ci['bytes'] / 1e6:.1f} MB in {ci['chunks']} chunks "
                      f"({ci['pinned_chunks']} pinned), limit {ci['limit'] / 1e9:.1f} GB")
    return 0
