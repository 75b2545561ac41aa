"""``remora peer status``: what a running peer is doing, from its ``/_remora/status`` endpoint."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

from remora.errors import RegistryError


def fetch_status(address: str, timeout: float = 5.0) -> dict:
    url = address if address.startswith("http") else f"http://{address}"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/_remora/status", timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RegistryError(f"cannot get the status of the peer at {url}: {exc} (is `remora peer` running "
                            "there? use --address HOST:PORT of its mirror listener)") from exc


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(status: dict, console=None) -> None:
    """Print the status as rich tables: the peer, its counters, one row per blob."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    head = Table(title=f"remora peer {status['peer_id']}", show_header=False, box=None)
    head.add_column(style="bold")
    head.add_column()
    mesh = status.get("mesh")
    if mesh:
        head.add_row("mesh", f"[green]{mesh}[/]" if status.get("mesh_tls") else f"[bold red]{mesh}[/]: any host that "
                     "reaches the upload port gets any piece (--insecure-plain-mesh)")
    for key in ("host_id", "mirror", "upload", "schedulers", "upstream", "registries", "labels", "data_dir"):
        value = status.get(key)
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(value) or "- (registry only)"
        head.add_row(key, str(value or "-"))
    schedulers = status.get("schedulers") or []
    registered = status.get("registered") or []
    if not schedulers:
        head.add_row("registered", "- (no scheduler)")
    elif not [a for a in schedulers if a not in registered]:
        head.add_row("registered", "[green]yes[/] (" + ", ".join(registered) + ")")
    else:
        missing = [a for a in schedulers if a not in registered]
        head.add_row("registered", f"[red]NO[/] with {', '.join(missing)}" +
                     (f" (yes with {', '.join(registered)})" if registered else "") +
                     ": this peer gets no parents and serves nobody from there")
    if status.get("schedulers_source"):
        head.add_row("schedulers from", status["schedulers_source"])
    mgr = status.get("manager")
    if mgr:
        state = "[green]reachable[/]" if mgr.get("reachable") else \
            f"[red]UNREACHABLE[/] ({mgr.get('error') or 'no answer yet'})"
        head.add_row("manager", f"{mgr['url']} {state}, member {mgr.get('member_id')}, "
                     f"cluster {mgr.get('cluster') or '-'}"
                     + (", using the last known lists" if mgr.get("stale") else ""))
        conf = mgr.get("config") or {}
        eff = conf.get("effective") or {}
        bl, pieces, gc = eff.get("blocklist") or {}, eff.get("piece_size") or {}, eff.get("gc") or {}
        head.add_row("dynamic config", f"v{conf.get('version', 0)}" + ("" if conf.get("version") else " (flags only)")
                     + f": upload slots {eff.get('upload_concurrency_limit')}, upload rate "
                     f"{eff.get('upload_rate_limit') or 'unlimited'}, piece size "
                     f"{_size(pieces.get('min', 0))}-{_size(pieces.get('max', 0))}, "
                     f"gc {gc.get('high')}/{gc.get('low')}, "
                     f"blocklist {len(bl.get('repositories', []))} repos {len(bl.get('tags', []))} tags "
                     f"{len(bl.get('digests', []))} digests")
    fallbacks = status.get("fallbacks") or {}
    head.add_row("registry fallbacks", ", ".join(f"{k}: {v}" for k, v in fallbacks.items()) or "none")
    head.add_row("uptime", f"{status.get('uptime', 0):.0f} s")
    head.add_row("store", _size(status.get("store_bytes", 0)))
    c = status.get("counters", {})
    from_peers = c.get("remora_peer_download_bytes_total{source=peer}", 0)
    from_reg = c.get("remora_peer_download_bytes_total{source=registry}", 0)
    total = from_peers + from_reg
    head.add_row("downloaded", f"{_size(total)} ({100 * from_peers / total:.0f}% from peers)" if total else "0 B")
    head.add_row("uploaded", _size(c.get("remora_peer_upload_bytes_total", 0)))
    blocklist = sum(v for k, v in c.items() if k.startswith("remora_peer_blocklist_total"))
    failures = sum(v for k, v in c.items() if k.startswith("remora_peer_piece_failures_total"))
    head.add_row("piece failures", f"{failures:.0f} ({blocklist:.0f} parents blocklisted)")
    console.print(head)

    table = Table(title="blobs")
    for col, kw in (("digest", {"no_wrap": True, "min_width": 12}), ("state", {}), ("size", {"justify": "right"}),
                    ("pieces", {"justify": "right"}), ("from peers", {"justify": "right"}),
                    ("from registry", {"justify": "right"}), ("notes", {})):
        table.add_column(col, **kw)
    style = {"done": "green", "mesh": "cyan", "source": "yellow", "failed": "red", "partial": "magenta"}
    for t in sorted(status.get("tasks", []), key=lambda t: t["digest"]):
        notes = []
        if t.get("back_to_source"):
            notes.append(f"registry: {t['back_to_source']}")
        if t.get("blocklist"):
            notes.append("blocklisted: " + ", ".join(f"{p} ({r})" for p, r in t["blocklist"].items()))
        if t.get("error"):
            notes.append(t["error"][:80])
        table.add_row(t["digest"][7:19], f"[{style.get(t['state'], 'white')}]{t['state']}[/]", _size(t["size"]),
                      f"{t['have']}/{t['pieces']}", _size(t["from_peers"]), _size(t["from_registry"]),
                      "; ".join(notes))
    console.print(table)
