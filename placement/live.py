"""The live cluster as a placement network: what a running ``remora scheduler`` knows, mapped to the model.

Why: on an edge cluster the network a plan should use is the one the mesh measures — which hosts run a
peer, the RTTs their probes see, the goodput their piece transfers showed, which image blobs each
already holds — not a hand-written file that drifts. The scheduler serves that view read-only
(plugins/scheduler/topology.py, read with :func:`remora.meshapi.read_topology`); this module turns the
document into a :class:`~remora.placement.model.Network` (the mapping is docs/placement.md §4.3):

* a node per host (``host_id``), with labels; CPU, memory and prices are not known to the mesh: they come
  from the spec's ``network.nodes[]`` entry of the same name when there is one, else ``defaults``;
* a link per host pair with a reachable RTT sample in either direction: ``delay`` = mean RTT / 2 (the
  probes time a TCP connect, one round trip); ``bandwidth`` = the larger measured pair goodput (either
  direction), else the smaller known upload capacity of the two hosts (measured, else declared), else
  ``defaults.bandwidth``; a spec link between the same nodes replaces the measured one;
* ``cached``: the application's image parts whose digest some peer of the host holds whole.

Pure functions over the document, so they are tested without a scheduler as well as with one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remora.errors import InvalidInput

from .model import Link, Network, Node, Problem


@dataclass(frozen=True)
class LiveDefaults:
    """What the mesh does not know about a host (overridden per node by the spec)."""

    cpu: float = 4000.0             # millicores
    memory: float = 8 * 2**30       # bytes
    bandwidth: float = 125e6        # bytes/s when nothing is measured or declared (1 Gbit/s)
    cost_per_gb: float = 0.0


def wanted_digests(app) -> set[str]:
    """The blob digests worth asking the scheduler about: every image part named by a digest."""
    return {d for img in app.images.values() for d, _ in img.parts if d.startswith("sha256:")}


def network_from_topology(doc: dict, app, spec_net: Network | None = None,
                          defaults: LiveDefaults = LiveDefaults()) -> Network:
    """The placement network of a topology document (``remora.meshapi.read_topology``)."""
    hosts = doc.get("hosts")
    if not isinstance(hosts, list) or not hosts:
        raise InvalidInput("the scheduler knows no peer: nothing to place on (are the peers registered?)")
    spec_nodes = {n.name: n for n in spec_net.nodes} if spec_net is not None else {}
    parts = {d for img in app.images.values() for d, _ in img.parts}
    nodes, known = [], {}
    for h in hosts:
        name = h["host_id"]
        holds = frozenset(d for d in h.get("holds", ()) if d in parts)
        labels = {str(k): str(v) for k, v in (h.get("labels") or {}).items()}
        base = spec_nodes.get(name)
        if base is None:
            node = Node(name, defaults.cpu, defaults.memory, cached=holds, labels=labels)
        else:
            node = dataclasses.replace(base, cached=base.cached | holds, labels={**labels, **base.labels})
        nodes.append(node)
        known[name] = h
    missing = sorted(set(spec_nodes) - set(known))
    if missing:
        raise InvalidInput(f"network.nodes: {', '.join(missing)} not registered with the scheduler (its hosts: "
                           f"{', '.join(sorted(known)[:10])}{' ...' if len(known) > 10 else ''})")

    def capacity(h: dict) -> float | None:
        m = h.get("measured_upload_bandwidth")
        if m:
            return float(m)
        d = h.get("declared_upload_bandwidth")
        return float(d) if d else None

    rtt: dict[frozenset, list[float]] = {}
    for r in doc.get("rtts", ()):
        a, b = r["from"], r["to"]
        if a in known and b in known and a != b and r.get("reachable", True) and r["rtt_s"] > 0:
            rtt.setdefault(frozenset((a, b)), []).append(float(r["rtt_s"]))
    goodput: dict[frozenset, float] = {}
    for g in doc.get("goodput", ()):
        key = frozenset((g["from"], g["to"]))
        if len(key) == 2 and key <= known.keys() and g["bytes_per_s"] > 0:
            goodput[key] = max(goodput.get(key, 0.0), float(g["bytes_per_s"]))
    links: dict[frozenset, Link] = {}
    for key, samples in sorted(rtt.items(), key=lambda kv: sorted(kv[0])):
        a, b = sorted(key)
        bw = goodput.get(key)
        if bw is None:
            caps = [c for c in (capacity(known[a]), capacity(known[b])) if c]
            bw = min(caps) if caps else defaults.bandwidth
        links[key] = Link(a, b, bw, sum(samples) / len(samples) / 2, defaults.cost_per_gb)
    for link in (spec_net.links if spec_net is not None else ()):
        links[frozenset((link.a, link.b))] = link
    net = Network(tuple(nodes), tuple(links.values()))
    _check_connected(net)
    return net


def _check_connected(net: Network) -> None:
    """Every host must be reachable: a plan over an unmeasured gap would be priced as infinite."""
    adj: dict[str, set[str]] = {n.name: set() for n in net.nodes}
    for link in net.links:
        adj[link.a].add(link.b)
        adj[link.b].add(link.a)
    start = net.nodes[0].name
    seen, todo = {start}, [start]
    while todo:
        for m in adj[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    cut = sorted(set(adj) - seen)
    if cut:
        raise InvalidInput(f"no RTT measured between {start} and {', '.join(cut[:10])}: wait for the peers' probes "
                           "(the scheduler's --probe-interval) or give network.links for those nodes in the spec")


def peer_urls(doc: dict, port: int, scheme: str = "http") -> dict[str, str]:
    """node -> ``scheme://IP:port``: each host's task API when its peers' mirror listens on ``port``."""
    out = {}
    for h in doc.get("hosts", ()):
        if h.get("ip"):
            host = f"[{h['ip']}]" if ":" in h["ip"] else h["ip"]
            out[h["host_id"]] = f"{scheme}://{host}:{port}"
    return out


def load_live(paths, fetch, defaults: LiveDefaults = LiveDefaults(), users: dict[str, float] | None = None
              ) -> tuple[Problem, dict]:
    """(problem, topology document) from ONE remora spec (application, users, optional node/link overrides)
    and ``fetch(digests) -> document`` (the scheduler read)."""
    from . import io

    docs = io._read_docs(paths)
    if len(docs) != 1 or not isinstance(docs[0][1], dict) or "kind" in docs[0][1]:
        raise InvalidInput("--from-scheduler reads the network from the scheduler: give exactly one remora spec "
                           "file (application, users; network.nodes/links only to override hosts)")
    path, doc = docs[0]
    where = str(path)
    top = io._Obj(where, doc)
    version = top.req("version")
    if version != io.SPEC_VERSION:
        raise InvalidInput(f"{where}: spec version {version!r}, this remora reads version {io.SPEC_VERSION}")
    app = io._application(io._Obj(f"{where}: application", top.req("application")), Path(path).parent)
    net_doc = top.opt("network")
    spec_net = io._network(io._Obj(f"{where}: network", net_doc), app) if net_doc is not None else None
    users_doc: Any = top.opt("users", {})
    top.done()
    topology = fetch(sorted(wanted_digests(app)))
    net = network_from_topology(topology, app, spec_net, defaults)
    if not isinstance(users_doc, dict):
        raise InvalidInput(f"{where}: users: expected a mapping node -> requests/s")
    rates = {}
    for u, rate in (users if users is not None else users_doc).items():
        if u not in net.index:
            raise InvalidInput(f"{where}: users: {u!r} is not a host the scheduler knows")
        rates[u] = io.quantity(f"{where}: users.{u}", rate)
    return Problem(net, app, rates), topology
