"""Show what the lazy mounts of a snapshotter are doing, as a table (or JSON).

Reads the same files the Prometheus endpoint (``remora snapshotter --metrics-address``) exports: each
mount's published counters under ``<root>/lazy/mounts/`` and the shared chunk cache's index. It never
talks to an fs process, so a hung mount cannot hang it; liveness is probed with a short timeout.
Strictly read-only: it creates, cleans and starts nothing (the snapshotter's warm spare and its log
are the snapshotter's), and a directory that is not a snapshotter's root is an error (exit 5).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from remora.snapshotter.layout import StateLayout

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


def check_root(root: Path) -> None:
    """Refuse anything but a snapshotter's state directory, before reading a thing from it.

    Checked up front (and nothing created: stats only looks) so that a mistyped ``--root`` is a clear
    error, not an empty table."""
    from remora.errors import NotFound

    if not root.is_dir():
        raise NotFound(f"no snapshotter state at {root}: no such directory (give the snapshotter's --root)")
    if not StateLayout(root).is_state_dir():
        raise NotFound(f"{root} is not a snapshotter's state directory (no metadata.db in it); give the "
                       "--root that 'remora snapshotter' runs with")


def collect(root: Path) -> dict:
    """Read-only: the mount records, their published counters, a liveness probe of each (in parallel,
    so N hung mounts cost one probe timeout, not N) and the cache index."""
    from concurrent.futures import ThreadPoolExecutor

    from remora.errors import NotFound
    from remora.snapshotter.mount import MountManager

    layout = StateLayout(root)
    mounts = MountManager(layout.lazy, layout.cache, read_only=True)
    out = {"mounts": [], "cache": None}
    specs = {}
    for mount_id in mounts.ids() if mounts.state_dir.is_dir() else []:
        try:
            specs[mount_id] = mounts.spec(mount_id)
        except NotFound:  # unmounted meanwhile
            continue
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(specs)))) as pool:
        health = dict(zip(specs, pool.map(lambda m: mounts.check(m, timeout=1.0), specs)))
    for mount_id, spec in specs.items():
        data = mounts.stats(mount_id) or {}
        out["mounts"].append({"id": mount_id, "state": health[mount_id].state, "detail": health[mount_id].detail,
                              "mountpoint": spec.mountpoint, "fetch": data.get("fetch", {}),
                              "cache": data.get("cache", {})})
    limit = next((s.cache_limit for s in specs.values()), None)
    out["cache"] = cache_info(layout.cache, limit)
    return out


def cache_info(cache_dir: Path, limit: int | None) -> dict | None:
    """The chunk cache's totals from its index, opened read-only (``ChunkCache()`` would create
    directories and clean its tmp dir: not a reader's business). None if there is no cache yet."""
    import sqlite3

    index = cache_dir / "index.db"
    if not index.is_file():
        return None
    from remora.cache import index_info

    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5)
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "pusage" in tables:  # partitioned index (totals and one entry per partition)
            return index_info(db, limit or 0)
        used = db.execute("SELECT bytes FROM usage").fetchone()  # an index from before partitions
        return {"bytes": used[0] if used else 0, "limit": limit or 0,
                "chunks": db.execute("SELECT count(*) FROM chunks").fetchone()[0],
                "pinned_chunks": db.execute("SELECT count(DISTINCT digest) FROM pins").fetchone()[0],
                "partitions": {}}
    except sqlite3.Error as exc:
        from remora.errors import StorageError

        raise StorageError(f"cannot read the chunk cache index {index}: {exc}") from None
    finally:
        db.close()


def run(args) -> int:
    root = Path(args.root)
    check_root(root)
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
        limit = f", limit {ci['limit'] / 1e9:.1f} GB" if ci["limit"] else ""
        console.print(f"chunk cache: {ci['bytes'] / 1e6:.1f} MB in {ci['chunks']} chunks "
                      f"({ci['pinned_chunks']} pinned){limit}")
        for part, v in sorted(ci.get("partitions", {}).items()):
            console.print(f"  partition {part or '(shared)'}: {v['bytes'] / 1e6:.1f} MB in {v['chunks']} chunks "
                          f"({v['pinned_chunks']} pinned)")
    return 0
