"""``remora place plan --preheat``: have every node of a plan fetch the images it will run, ahead of time.

Why: the plan's ``deploy`` list (output.deploy_list) is every (node, image) pair whose image the node
must hold; the first start of a function is only fast when its node already has those bytes. Each
pair becomes one preheat task on that node's peer (plugins/peer/preheat.py: the bootstrap and the hot
blob of a remora image first, then the rest unless ``--preheat-hot-only``), all nodes at once, with a
progress bar per pair. A pair succeeds only when its peer reports every blob verified. With ``--pull``
each peer then has its node's snapshotter pull the image into containerd (the peer's
``--runtime-pull-api``), and a pair succeeds only once that pull is done: the node is ready to start
the function with no pull at all (what a kubelet with ``imagePullPolicy: IfNotPresent`` then finds).

Where a node's peer is: the spec's optional ``network.nodes[].peer`` URL (docs/placement.md §4.1), or
``--peer NODE=URL`` (which wins; the only way for Kubernetes inputs).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlparse

from remora.errors import InvalidInput, RemoraError

TERMINAL = ("succeeded", "failed", "cancelled")


def check_peer_url(where: str, value) -> str:
    """A peer URL as the spec and --peer take it: http(s)://host:port, nothing else."""
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: expected a URL like http://10.0.1.17:65001")
    u = urlparse(value if "://" in value else f"http://{value}")
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") or u.query or u.username:
        raise InvalidInput(f"{where}: {value!r} is not a peer address (http://HOST:PORT of its mirror listener)")
    try:
        _ = u.port   # raises on a bad port
    except ValueError:
        raise InvalidInput(f"{where}: {value!r} has a bad port") from None
    return f"{u.scheme}://{u.netloc}"


def peers_from_inputs(paths: list[str]) -> dict[str, str]:
    """node -> peer URL from the remora spec files among ``paths`` (Kubernetes objects carry none)."""
    import yaml

    peers: dict[str, str] = {}
    for path in paths:
        try:
            docs = list(yaml.safe_load_all(Path(path).read_text()))
        except (OSError, yaml.YAMLError):
            continue   # io.load already reported unreadable input
        for doc in docs:
            nodes = ((doc or {}).get("network") or {}).get("nodes") if isinstance(doc, dict) else None
            for n in nodes if isinstance(nodes, list) else []:
                if isinstance(n, dict) and n.get("peer") is not None and isinstance(n.get("name"), str):
                    peers[n["name"]] = check_peer_url(f"{path}: network.nodes[{n['name']}].peer", n["peer"])
    return peers


def parse_peer_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            node, eq, url = part.partition("=")
            if not eq or not node:
                raise InvalidInput(f"--peer {part!r}: expected NODE=URL")
            out[node] = check_peer_url(f"--peer {node}", url)
    return out


def preheat(deploy: list[dict], peers: dict[str, str], token: str, want_all: bool = True,
            timeout: float = 3600.0, poll: float = 0.2, console=None, client_factory=None,
            pull: bool = False) -> list[dict]:
    """Preheat every (node, image) of ``deploy`` on its node's peer; one result per pair:
    ``{"node", "image", "peer", "task", "state", "error", "verified_bytes", "total_bytes"}`` (and with
    ``pull``, ``"pulled"``: the name containerd holds the image under, once the node's snapshotter pulled
    it)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from remora.taskapi import PreheatClient, new_task_id, progress_of

    missing = sorted({d["node"] for d in deploy if d["node"] not in peers})
    if missing:
        raise InvalidInput(f"no peer address for node(s) {', '.join(missing)}: add 'peer: http://HOST:PORT' to "
                           "the node in the spec (network.nodes[]) or pass --peer NODE=URL")
    factory = client_factory or (lambda url: PreheatClient(url, token))
    clients = {node: factory(peers[node]) for node in {d["node"] for d in deploy}}
    results = []
    for d in deploy:
        r = {"node": d["node"], "image": d["image"], "peer": peers[d["node"]], "task": new_task_id("place"),
             "state": "queued", "error": "", "verified_bytes": 0, "total_bytes": 0}
        try:
            clients[d["node"]].create(r["task"], d["image"], want_all, pull=pull)
        except RemoraError as exc:
            r["state"], r["error"] = "failed", str(exc)
        results.append(r)
    console = console or Console(stderr=True)
    deadline = time.monotonic() + timeout
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[state]}"),
                  console=console) as progress:
        bars = [progress.add_task(f"{r['node']}: {r['image']}", total=None, state=r["state"]) for r in results]
        while any(r["state"] not in TERMINAL for r in results):
            if time.monotonic() > deadline:
                for r in results:
                    if r["state"] not in TERMINAL:
                        try:
                            clients[r["node"]].cancel(r["task"])
                        except RemoraError:
                            pass
                        r["state"], r["error"] = "failed", f"timed out after {timeout:g}s"
                break
            time.sleep(poll)
            for r, bar in zip(results, bars):
                if r["state"] in TERMINAL:
                    continue
                try:
                    st = clients[r["node"]].get(r["task"])
                except RemoraError as exc:
                    r["state"], r["error"] = "failed", str(exc)
                    continue
                done, total = progress_of(st)
                r["verified_bytes"], r["total_bytes"] = done, total
                r["state"], r["error"] = st.get("state", "failed"), str(st.get("error") or "")
                if r["state"] == "succeeded" and not _all_verified(st):
                    r["state"], r["error"] = "failed", "peer reported success with a blob not verified"
                if pull and r["state"] == "succeeded":
                    pulled = st.get("pull") or {}
                    if pulled.get("state") == "done":
                        r["pulled"] = pulled.get("name", "")
                    elif pulled.get("state") == "skipped":   # an OCI image: its blobs are there, nothing to pull
                        r["pulled"], r["pull_skipped"] = "", str(pulled.get("reason", ""))
                    else:
                        r["state"], r["error"] = "failed", "peer reported success without the pull it was asked for"
                progress.update(bar, completed=done, total=total or None, state=r["state"])
            for r, bar in zip(results, bars):
                progress.update(bar, state=r["state"])
    return results


def _all_verified(status: dict) -> bool:
    blobs = status.get("blobs") or []
    return bool(blobs) and all(b.get("verified") and b.get("verified_bytes") == b.get("size") for b in blobs)


def summary(results: list[dict]) -> str:
    ok = sum(r["state"] == "succeeded" for r in results)
    lines = [f"preheat: {ok} of {len(results)} (node, image) pairs done"]
    for r in results:
        if r["state"] != "succeeded":
            lines.append(f"  {r['node']} {r['image']}: {r['state']}: {r['error']}")
        elif r.get("pull_skipped"):
            lines.append(f"  {r['node']} {r['image']}: blobs preheated, not pulled ({r['pull_skipped']})")
    return "\n".join(lines)


def dumps(results: list[dict]) -> str:
    return json.dumps(results, indent=2)
