"""Loading placement problems from files: remora's YAML/JSON spec and Kubernetes scheduler-plugins objects.

Two input kinds, both turned into one :class:`~remora.placement.model.Problem` (docs/placement.md §4):

* the **spec** (``version: 1``, keys ``network``, ``application``, ``users``), strict: unknown keys,
  missing fields, negative sizes, unknown names and cycles in the function graph are :class:`InvalidInput`
  errors that name the offending entry, so a typo never silently turns into a default;
* **Kubernetes** objects (any number of YAML documents / files, or ``kind: List``): an ``AppGroup``
  (``appgroup.diktyo.x-k8s.io``: the workloads and their dependencies), a ``NetworkTopology``
  (``networktopology.diktyo.k8s.io``: cost and bandwidth between regions/zones) and ``Node`` objects
  (capacity from ``status.allocatable``, locality from ``topology.kubernetes.io/region``/``zone``).

Quantities accept Kubernetes and human units: CPU "250m"/"2", bytes "512Mi"/"1G", durations
"5ms"/"1h", bandwidths "100Mbps" (bits) or "10MB/s" (bytes) or a bare Kubernetes quantity (bytes/s).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from remora.errors import InvalidInput, NotFound

from .model import (
    Access,
    Application,
    Edge,
    Function,
    Image,
    Link,
    Network,
    Node,
    Problem,
    State,
)

SPEC_VERSION = 1
ZONE_KEY = "topology.kubernetes.io/zone"
REGION_KEY = "topology.kubernetes.io/region"

_BIN = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_DEC = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "m": 1e-3}
_TIME = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_NUM = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def _num(where: str, value: Any) -> float | None:
    if isinstance(value, bool):
        raise InvalidInput(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    return None


def quantity(where: str, value: Any) -> float:
    """A Kubernetes quantity ("512Mi", "1.5G", "250m", "3") as a float; bytes are "B"-less."""
    v = _num(where, value)
    if v is None:
        m = re.fullmatch(_NUM + r"\s*(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P|m)?B?", str(value).strip())
        if not m:
            raise InvalidInput(f"{where}: cannot read quantity {value!r} (examples: 512Mi, 2G, 250m, 4)")
        v = float(m.group(1)) * (_BIN.get(m.group(2) or "") or _DEC[m.group(2) or ""])
    return _nonneg(where, v)


def cpu_millicores(where: str, value: Any) -> float:
    """CPU capacity: "250m" -> 250, "2" / 2 -> 2000 millicores (Kubernetes convention)."""
    return quantity(where, value) * 1000.0


def duration(where: str, value: Any) -> float:
    """Seconds from a number (seconds) or "5ms", "2.5s", "1h"."""
    v = _num(where, value)
    if v is None:
        m = re.fullmatch(_NUM + r"\s*(ns|us|µs|ms|s|min|m|h|d)", str(value).strip())
        if not m:
            raise InvalidInput(f"{where}: cannot read duration {value!r} (examples: 5ms, 0.2s, 1h)")
        v = float(m.group(1)) * _TIME[m.group(2)]
    return _nonneg(where, v)


def bandwidth(where: str, value: Any) -> float:
    """Bytes per second from "100Mbps"/"1Gbit/s" (bits), "10MB/s"/"10MiB/s" (bytes), a bare quantity or number
    (bytes/s)."""
    v = _num(where, value)
    if v is None:
        s = str(value).strip()
        m = re.fullmatch(_NUM + r"\s*(Ki|Mi|Gi|Ti|k|K|M|G|T)?(bps|bit/s|b/s)", s)
        if m:
            v = float(m.group(1)) * (_BIN.get(m.group(2) or "") or _DEC[m.group(2) or ""]) / 8.0
        else:
            m = re.fullmatch(_NUM + r"\s*(Ki|Mi|Gi|Ti|k|K|M|G|T)?(B/s)?", s)
            if not m:
                raise InvalidInput(f"{where}: cannot read bandwidth {value!r} (examples: 100Mbps, 10MB/s, 1Gi)")
            unit = m.group(2) or ""
            v = float(m.group(1)) * (_BIN.get(unit) or _DEC[unit])
    v = _nonneg(where, v)
    if v <= 0:
        raise InvalidInput(f"{where}: bandwidth must be positive, got {value!r}")
    return v


def _nonneg(where: str, v: float) -> float:
    if not math.isfinite(v) or v < 0:
        raise InvalidInput(f"{where}: must be a non-negative finite number, got {v!r}")
    return v


# ---------------------------------------------------------------------------------------------------
class _Obj:
    """A mapping read strictly: required/optional keys, and unknown keys reported on ``done()``."""

    def __init__(self, where: str, data: Any):
        if not isinstance(data, dict):
            raise InvalidInput(f"{where}: expected a mapping, got {type(data).__name__}")
        self.where, self.data, self.used = where, data, set()

    def req(self, key: str) -> Any:
        if key not in self.data:
            raise InvalidInput(f"{self.where}: missing required field {key!r}")
        self.used.add(key)
        return self.data[key]

    def opt(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.data.get(key, default)

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used, key=str)
        if extra:
            raise InvalidInput(f"{self.where}: unknown field(s) {', '.join(map(repr, extra))}")


def _list(where: str, v: Any) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise InvalidInput(f"{where}: expected a list, got {type(v).__name__}")
    return v


def _name(where: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise InvalidInput(f"{where}: name must be a non-empty string, got {v!r}")
    return v


def _unique(where: str, names: Iterable[str]) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise InvalidInput(f"{where}: duplicate name {n!r}")
        seen.add(n)


# ---------------------------------------------------------------------------------------------------
def load_image_parts(entry: _Obj, base: Path) -> tuple[tuple[tuple[str, int], ...], str]:
    """An image's parts: remora chunks from ``bootstrap`` or ``chunks``, OCI ``layers`` otherwise."""
    w = entry.where
    if entry.opt("bootstrap") is not None:
        return chunks_from_bootstrap(base / str(entry.opt("bootstrap"))), "remora"
    parts, kind = [], entry.opt("kind")
    for key, k in (("chunks", "remora"), ("layers", "oci")):
        for i, item in enumerate(_list(f"{w}.{key}", entry.opt(key))):
            o = _Obj(f"{w}.{key}[{i}]", item)
            parts.append((_name(f"{o.where}.digest", o.req("digest")), int(quantity(f"{o.where}.size", o.req("size")))))
            o.done()
            kind = kind or k
    if entry.opt("size") is not None and not parts:  # an opaque image: one part named after the image
        parts.append((f"image:{entry.data['name']}", int(quantity(f"{w}.size", entry.opt("size")))))
    return tuple(parts), kind or "oci"


def chunks_from_bootstrap(path: Path) -> tuple[tuple[str, int], ...]:
    """The (digest, size) of every distinct chunk a remora bootstrap references, plus the bootstrap itself.

    A node that already holds a chunk (from any image sharing it) needs not fetch it again, which is why
    deployment cost is counted at this level. The bootstrap file is a part too (a node needs it first).
    """
    from remora.format.bootstrap import Bootstrap

    bs = Bootstrap(path)
    try:
        seen: dict[str, int] = {}
        for c in bs.chunk_table().chunks:
            seen.setdefault("sha256:" + bytes(c.digest).hex(), int(c.size))
    finally:
        bs.close()
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    seen["bootstrap:sha256:" + h.hexdigest()] = Path(path).stat().st_size
    return tuple(seen.items())


def layers_from_manifest(manifest: dict) -> tuple[tuple[str, int], ...]:
    """Layer-level parts of an OCI image manifest (the fallback for images that are not remora images)."""
    return tuple((str(layer["digest"]), int(layer["size"])) for layer in manifest.get("layers", []))


def _read_docs(paths: Iterable[str | Path]) -> list[tuple[Path, Any]]:
    import yaml

    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise NotFound(f"{path}: no such file")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                docs = [json.loads(text)]
            else:
                docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except (ValueError, yaml.YAMLError) as exc:
            raise InvalidInput(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
        for d in docs:
            if isinstance(d, dict) and d.get("kind") == "List":
                out.extend((path, item) for item in _list(f"{path}: items", d.get("items")))
            else:
                out.append((path, d))
    return out


def load(paths: Iterable[str | Path], users: dict[str, float] | None = None, **k8s_options) -> Problem:
    """A problem from a remora spec file or from Kubernetes objects (AppGroup + NetworkTopology + Nodes)."""
    docs = _read_docs(paths)
    if not docs:
        raise InvalidInput("no documents in the input files")
    specs = [(p, d) for p, d in docs if isinstance(d, dict) and "kind" not in d]
    if specs:
        if len(docs) != 1:
            raise InvalidInput("a remora placement spec must be the only document given")
        path, doc = specs[0]
        problem = load_spec(doc, base=path.parent, where=str(path))
        if users:
            problem = with_users(problem, users)
    else:  # the users' total rate shapes the AppGroup's bytes per request, so they go in here
        problem = load_kubernetes([d for _, d in docs], users=users, **k8s_options)
    return problem


def with_users(problem: Problem, users: dict[str, float]) -> Problem:
    for u in users:
        if u not in problem.network.index:
            raise InvalidInput(f"--users: unknown node {u!r}")
    return Problem(problem.network, problem.app, dict(users))


def parse_users(text: str) -> dict[str, float]:
    """``"edge-a=10,edge-b=2.5"`` -> {"edge-a": 10.0, "edge-b": 2.5}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, rate = item.partition("=")
        if not sep:
            raise InvalidInput(f"--users: expected NODE=RATE, got {item!r}")
        try:
            out[name] = _nonneg(f"--users {name}", float(rate))
        except ValueError:
            raise InvalidInput(f"--users: {rate!r} is not a number") from None
    return out


# ---------------------------------------------------------------------------------------------------
def load_spec(doc: Any, base: Path = Path("."), where: str = "spec") -> Problem:
    """The remora placement spec (docs/placement.md §4.1) -> Problem, validated."""
    top = _Obj(where, doc)
    version = top.req("version")
    if version != SPEC_VERSION:
        raise InvalidInput(f"{where}: spec version {version!r}, this remora reads version {SPEC_VERSION}")
    app = _application(_Obj(f"{where}: application", top.req("application")), base)
    net = _network(_Obj(f"{where}: network", top.req("network")), app)
    users_doc = top.opt("users", {})
    if not isinstance(users_doc, dict):
        raise InvalidInput(f"{where}: users: expected a mapping node -> requests/s")
    users = {}
    for u, rate in users_doc.items():
        if u not in net.index:
            raise InvalidInput(f"{where}: users: unknown node {u!r}")
        users[u] = quantity(f"{where}: users.{u}", rate)
    top.done()
    return Problem(net, app, users)


def _application(o: _Obj, base: Path) -> Application:
    w = o.where
    images: dict[str, Image] = {}
    for i, item in enumerate(_list(f"{w}.images", o.opt("images"))):
        io = _Obj(f"{w}.images[{i}]", item)
        name = _name(f"{io.where}.name", io.req("name"))
        if name in images:
            raise InvalidInput(f"{io.where}: duplicate image {name!r}")
        parts, kind = load_image_parts(io, base)
        io.done()
        images[name] = Image(name, parts, kind)
    functions, edges = [], []
    for i, item in enumerate(_list(f"{w}.functions", o.req("functions"))):
        fo = _Obj(f"{w}.functions[{i}]", item)
        name = _name(f"{fo.where}.name", fo.req("name"))
        fo.where = f"{w}.functions[{name}]"
        image = fo.opt("image")
        if image is not None and image not in images:
            images[image] = Image(str(image), (), "oci")  # unknown parts: no deployment cost
        functions.append(Function(name, duration(f"{fo.where}.cpu", fo.req("cpu")),
                                  quantity(f"{fo.where}.memory", fo.opt("memory", 0)), image))
        calls = fo.opt("calls", {}) or {}
        if not isinstance(calls, dict):
            raise InvalidInput(f"{fo.where}.calls: expected a mapping successor -> bytes per request")
        for dst, nbytes in calls.items():
            edges.append(Edge(name, str(dst), quantity(f"{fo.where}.calls.{dst}", nbytes)))
        fo.done()
    if not functions:
        raise InvalidInput(f"{w}.functions: at least one function is needed")
    names = [f.name for f in functions]
    _unique(f"{w}.functions", names)
    for e in edges:
        if e.dst not in names:
            raise InvalidInput(f"{w}.functions[{e.src}].calls: unknown function {e.dst!r}")
        if e.dst == e.src:
            raise InvalidInput(f"{w}.functions[{e.src}].calls: a function cannot call itself")
    states, accesses = [], []
    for i, item in enumerate(_list(f"{w}.states", o.opt("states"))):
        so = _Obj(f"{w}.states[{i}]", item)
        name = _name(f"{so.where}.name", so.req("name"))
        so.where = f"{w}.states[{name}]"
        states.append(State(name, quantity(f"{so.where}.size", so.req("size"))))
        acc = so.opt("access", {}) or {}
        if not isinstance(acc, dict):
            raise InvalidInput(f"{so.where}.access: expected a mapping function -> {{read, write}}")
        for fn, rw in acc.items():
            if fn not in names:
                raise InvalidInput(f"{so.where}.access: unknown function {fn!r}")
            ao = _Obj(f"{so.where}.access.{fn}", rw)
            accesses.append(Access(str(fn), name, quantity(f"{ao.where}.read", ao.opt("read", 0)),
                                   quantity(f"{ao.where}.write", ao.opt("write", 0))))
            ao.done()
        so.done()
    _unique(f"{w}.states", [s.name for s in states])
    bound = o.opt("delay_bound")
    app = Application(
        name=str(o.opt("name", "app")), functions=tuple(functions), edges=tuple(edges), states=tuple(states),
        accesses=tuple(accesses), images=images,
        request_bytes=quantity(f"{w}.request_bytes", o.opt("request_bytes", 0)),
        response_bytes=quantity(f"{w}.response_bytes", o.opt("response_bytes", 0)),
        delay_bound=None if bound is None else duration(f"{w}.delay_bound", bound),
        delay_weight=quantity(f"{w}.delay_weight", o.opt("delay_weight", 0)),
        horizon=duration(f"{w}.horizon", o.opt("horizon", 3600)))
    o.done()
    check_acyclic(app, w)
    return app


def check_acyclic(app: Application, where: str) -> None:
    """Reject a cycle in the function graph, naming the functions on it."""
    succ: dict[str, list[str]] = {f.name: [] for f in app.functions}
    for e in app.edges:
        succ[e.src].append(e.dst)
    color: dict[str, int] = {}
    for start, first in succ.items():
        if color.get(start):
            continue
        stack = [(start, iter(first))]
        path = [start]
        color[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = 2
                stack.pop()
                path.pop()
            elif color.get(nxt) == 1:
                cyc = path[path.index(nxt):] + [nxt]
                raise InvalidInput(f"{where}: the function graph has a cycle: {' -> '.join(cyc)}")
            elif not color.get(nxt):
                color[nxt] = 1
                stack.append((nxt, iter(succ[nxt])))
                path.append(nxt)


def _network(o: _Obj, app: Application) -> Network:
    w = o.where
    nodes = []
    for i, item in enumerate(_list(f"{w}.nodes", o.req("nodes"))):
        no = _Obj(f"{w}.nodes[{i}]", item)
        name = _name(f"{no.where}.name", no.req("name"))
        no.where = f"{w}.nodes[{name}]"
        if no.opt("peer") is not None:  # the node's peer, for --preheat (read again by placement/preheat.py)
            from .preheat import check_peer_url
            check_peer_url(f"{no.where}.peer", no.opt("peer"))
        cached = set()
        for c in _list(f"{no.where}.cached", no.opt("cached")):
            if c in app.images:
                cached.update(d for d, _ in app.images[c].parts)
            elif isinstance(c, str) and ":" in c:
                cached.add(c)
            else:
                raise InvalidInput(f"{no.where}.cached: {c!r} is neither an image of the application nor a digest")
        pos = no.opt("pos")
        if pos is not None and (not isinstance(pos, list) or len(pos) != 2
                                or not all(isinstance(x, (int, float)) for x in pos)):
            raise InvalidInput(f"{no.where}.pos: expected [x, y]")
        labels = no.opt("labels", {}) or {}
        if not isinstance(labels, dict):
            raise InvalidInput(f"{no.where}.labels: expected a mapping")
        speed = quantity(f"{no.where}.speed", no.opt("speed", 1.0))
        if speed <= 0:
            raise InvalidInput(f"{no.where}.speed: must be positive")
        storage = no.opt("storage")
        nodes.append(Node(name, cpu_millicores(f"{no.where}.cpu", no.req("cpu")),
                          quantity(f"{no.where}.memory", no.req("memory")), speed,
                          quantity(f"{no.where}.cpu_cost", no.opt("cpu_cost", 0)),
                          quantity(f"{no.where}.storage_cost", no.opt("storage_cost", 0)),
                          quantity(f"{no.where}.deploy_cost", no.opt("deploy_cost", 0)),
                          math.inf if storage is None else quantity(f"{no.where}.storage", storage),
                          frozenset(cached), None if pos is None else (float(pos[0]), float(pos[1])),
                          {str(k): str(v) for k, v in labels.items()}))
        no.done()
    if not nodes:
        raise InvalidInput(f"{w}.nodes: at least one node is needed")
    _unique(f"{w}.nodes", [n.name for n in nodes])
    names = {n.name for n in nodes}
    links = []
    for i, item in enumerate(_list(f"{w}.links", o.opt("links"))):
        lo = _Obj(f"{w}.links[{i}]", item)
        a, b = _name(f"{lo.where}.a", lo.req("a")), _name(f"{lo.where}.b", lo.req("b"))
        for end in (a, b):
            if end not in names:
                raise InvalidInput(f"{lo.where}: unknown node {end!r}")
        links.append(Link(a, b, bandwidth(f"{lo.where}.bandwidth", lo.req("bandwidth")),
                          duration(f"{lo.where}.delay", lo.req("delay")),
                          quantity(f"{lo.where}.cost_per_gb", lo.opt("cost_per_gb", 0)),
                          duration(f"{lo.where}.delay_std", lo.opt("delay_std", 0))))
        lo.done()
    o.done()
    return Network(tuple(nodes), tuple(links))


# ---------------------------------------------------------------------------------------------------
# Kubernetes scheduler-plugins objects
def load_kubernetes(objects: list[Any], users: dict[str, float] | None = None, rate: float = 1.0,
                    cpu_per_request: float = 0.005,
                    memory: float = 128 * 2**20, ms_per_cost: float = 1.0, cost_per_gb_per_cost: float = 0.001,
                    intra_zone_delay: float = 0.0002, intra_zone_bandwidth: float = 1.25e9) -> Problem:
    """AppGroup + NetworkTopology + Node objects -> Problem (mapping in docs/placement.md §4.2).

    ``users`` (node -> requests/s) defaults to ``rate`` at every node.

    The AppGroup lists *communication* dependencies, often in both directions (frontend -> cart and
    cart -> frontend), so it is not a DAG: each dependent pair becomes one edge oriented from the
    workload discovered first by a breadth-first walk from the first workload (the entry) to the other,
    carrying ``minBandwidth / rate`` bytes per request (the larger of the two directions).
    networkCost is read as ``ms_per_cost`` milliseconds of delay and ``cost_per_gb_per_cost`` per GB.
    """
    by_kind: dict[str, list[dict]] = {}
    for i, d in enumerate(objects):
        if not isinstance(d, dict) or "kind" not in d:
            raise InvalidInput(f"document {i}: not a Kubernetes object (no 'kind')")
        by_kind.setdefault(str(d["kind"]), []).append(d)
    for kind in ("AppGroup", "NetworkTopology", "Node"):
        if kind not in by_kind:
            raise InvalidInput(f"Kubernetes input needs an AppGroup, a NetworkTopology and Node objects: no {kind}")
    if len(by_kind["AppGroup"]) != 1 or len(by_kind["NetworkTopology"]) != 1:
        raise InvalidInput("Kubernetes input: exactly one AppGroup and one NetworkTopology are expected")
    extra = set(by_kind) - {"AppGroup", "NetworkTopology", "Node"}
    if extra:
        raise InvalidInput(f"Kubernetes input: unexpected kind(s) {sorted(extra)}")
    net = _k8s_network(by_kind["NetworkTopology"][0], by_kind["Node"], ms_per_cost, cost_per_gb_per_cost,
                       intra_zone_delay, intra_zone_bandwidth)
    if users:
        for u in users:
            if u not in net.index:
                raise InvalidInput(f"--users: unknown node {u!r} (nodes: {', '.join(n.name for n in net.nodes)})")
    else:
        users = {n.name: rate for n in net.nodes}
    app = _k8s_appgroup(by_kind["AppGroup"][0], float(sum(users.values())), cpu_per_request, memory)
    return Problem(net, app, dict(users))


def _k8s_appgroup(obj: dict, total_rate: float, cpu: float, memory: float) -> Application:
    name = str((obj.get("metadata") or {}).get("name", "appgroup"))
    w = f"AppGroup {name}"
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise InvalidInput(f"{w}: missing spec")
    workloads = _list(f"{w}: spec.workloads", spec.get("workloads"))
    if not workloads:
        raise InvalidInput(f"{w}: spec.workloads is empty")

    def wname(where: str, wl: Any) -> str:
        if not isinstance(wl, dict) or not isinstance(wl.get("name"), str):
            raise InvalidInput(f"{where}: workload needs a name")
        return wl["name"]

    order: list[str] = []
    deps: dict[tuple[str, str], float] = {}
    for i, item in enumerate(workloads):
        if not isinstance(item, dict):
            raise InvalidInput(f"{w}: spec.workloads[{i}]: expected a mapping")
        src = wname(f"{w}: spec.workloads[{i}].workload", item.get("workload"))
        if src in order:
            raise InvalidInput(f"{w}: workload {src!r} listed twice")
        order.append(src)
        for j, dep in enumerate(_list(f"{w}: {src}.dependencies", item.get("dependencies"))):
            where = f"{w}: {src}.dependencies[{j}]"
            if not isinstance(dep, dict):
                raise InvalidInput(f"{where}: expected a mapping")
            dst = wname(where, dep.get("workload"))
            bw = bandwidth(f"{where}.minBandwidth", dep.get("minBandwidth", 0) or 1)
            deps[(src, dst)] = max(deps.get((src, dst), 0.0), bw)
    known = set(order)
    for (src, dst) in deps:
        if dst not in known:
            raise InvalidInput(f"{w}: {src} depends on unknown workload {dst!r}")
    # Orient every dependent pair along a BFS from the first workload (then from any unreached one).
    rank: dict[str, int] = {}
    nbrs: dict[str, list[str]] = {n: [] for n in order}
    for (a, b) in deps:
        nbrs[a].append(b)
        nbrs[b].append(a)
    for root in order:
        if root in rank:
            continue
        rank[root] = len(rank)
        queue = [root]
        while queue:
            cur = queue.pop(0)
            for nb in nbrs[cur]:
                if nb not in rank:
                    rank[nb] = len(rank)
                    queue.append(nb)
    pairs: dict[tuple[str, str], float] = {}
    for (a, b), bw in deps.items():
        if a == b:
            continue
        key = (a, b) if rank[a] < rank[b] else (b, a)
        pairs[key] = max(pairs.get(key, 0.0), bw)
    per_request = (lambda bw: bw / total_rate) if total_rate > 0 else (lambda bw: 0.0)
    functions = tuple(Function(n, cpu, memory, None) for n in order)
    edges = tuple(Edge(a, b, per_request(bw))
                  for (a, b), bw in sorted(pairs.items(), key=lambda kv: (rank[kv[0][0]], rank[kv[0][1]])))
    return Application(name, functions, edges)


def _k8s_network(obj: dict, nodes: list[dict], ms_per_cost: float, gb_per_cost: float,
                 intra_delay: float, intra_bw: float) -> Network:
    w = f"NetworkTopology {(obj.get('metadata') or {}).get('name', '')}"
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise InvalidInput(f"{w}: missing spec")
    costs: dict[str, dict[tuple[str, str], tuple[float, float]]] = {ZONE_KEY: {}, REGION_KEY: {}}
    for i, weight in enumerate(_list(f"{w}: spec.weights", spec.get("weights"))):
        for j, cl in enumerate(_list(f"{w}: spec.weights[{i}].costList", (weight or {}).get("costList"))):
            key = (cl or {}).get("topologyKey")
            if key not in costs:
                raise InvalidInput(f"{w}: costList[{j}]: topologyKey {key!r} is not {ZONE_KEY} or {REGION_KEY}")
            for oc in _list(f"{w}: {key} originCosts", cl.get("originCosts")):
                origin = (oc or {}).get("origin")
                for c in _list(f"{w}: {key} {origin} costs", (oc or {}).get("costs")):
                    where = f"{w}: {key} {origin} -> {(c or {}).get('destination')}"
                    if not isinstance(c, dict) or "destination" not in c:
                        raise InvalidInput(f"{where}: cost entry needs a destination")
                    cost = quantity(f"{where}.networkCost", c.get("networkCost", 0))
                    bw = bandwidth(f"{where}.bandwidthCapacity", c.get("bandwidthCapacity", "1Gi"))
                    costs[key][(str(origin), str(c["destination"]))] = (cost, bw)
    out_nodes = []
    for i, n in enumerate(nodes):
        md = n.get("metadata") or {}
        name = md.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"Node object {i}: metadata.name missing")
        labels = {str(k): str(v) for k, v in (md.get("labels") or {}).items()}
        alloc = ((n.get("status") or {}).get("allocatable")) or {}
        if "cpu" not in alloc or "memory" not in alloc:
            raise InvalidInput(f"Node {name}: status.allocatable needs cpu and memory")
        out_nodes.append(Node(name, cpu_millicores(f"Node {name} cpu", alloc["cpu"]),
                              quantity(f"Node {name} memory", alloc["memory"]), labels=labels))
    _unique("Node objects", [n.name for n in out_nodes])
    links = []
    for a_i, a in enumerate(out_nodes):
        for b in out_nodes[a_i + 1:]:
            za, zb = a.labels.get(ZONE_KEY), b.labels.get(ZONE_KEY)
            ra, rb = a.labels.get(REGION_KEY), b.labels.get(REGION_KEY)
            if za is not None and za == zb:
                links.append(Link(a.name, b.name, intra_bw, intra_delay, 0.0))
                continue
            entry = costs[ZONE_KEY].get((za, zb)) or costs[ZONE_KEY].get((zb, za))
            if entry is None:
                entry = costs[REGION_KEY].get((ra, rb)) or costs[REGION_KEY].get((rb, ra))
            if entry is None:
                continue  # no declared cost: the pair talks through other nodes or not at all
            cost, bw = entry
            links.append(Link(a.name, b.name, bw, cost * ms_per_cost / 1000.0 + intra_delay, cost * gb_per_cost))
    return Network(tuple(out_nodes), tuple(links))
