"""The placement model (docs/placement.md, model version 1): data classes and the evaluation of a placement.

Everything here is pure (no solver, no I/O) so that every algorithm, the simulator and the benchmarks
judge a placement by the same arithmetic. Units are SI throughout; the file loaders (``io.py``) turn
"512Mi", "10ms" or "100Mbps" into these.

Public API (kept stable; other modules and helpers import it):

* Infrastructure: :class:`Node` (``cpu`` millicores, ``memory`` bytes, ``speed`` relative to a reference
  core, ``cpu_cost`` per reference-core-second, ``storage_cost`` per GB-hour, ``deploy_cost`` per GB of
  image pulled, ``storage`` bytes for state, ``cached`` digests already on the node, ``pos`` and
  ``labels`` for pictures/manifests) and :class:`Link` (undirected; ``bandwidth`` bytes/s, ``delay``
  seconds (mean), ``delay_std`` seconds (for the online case), ``cost_per_gb``), both in :class:`Network`.
  ``Network.with_delays({(a, b): seconds})`` gives a copy with some link delays replaced (simulation).
* Application: :class:`Function` (``cpu`` reference-core-seconds per request, ``memory`` bytes,
  ``image`` name), :class:`Edge` (``src`` -> ``dst``, ``bytes`` per request), :class:`State` (``size``
  bytes), :class:`Access` (function reads/writes ``read``/``write`` bytes of a state per request),
  :class:`Image` (``parts``: (digest, size) chunks or layers), all in :class:`Application` together with
  ``request_bytes`` (user -> each entry function), ``response_bytes`` (each exit function -> user),
  ``delay_bound`` (seconds per request or None), ``delay_weight`` (cost per second of mean delay added to
  the objective) and ``horizon`` (seconds the plan is paid for).
* :class:`Problem` (network + application + ``users``: {node: requests/s}); ``problem.paths`` is the
  lazily computed :class:`PathTable` (routing on least-delay paths: delay ``D``, bottleneck bandwidth
  ``B`` and transfer cost per GB ``C`` between any two nodes).
* :class:`Placement` (``functions`` {function: node}, ``states`` {state: node}, ``algorithm``, ``meta``).
* Evaluation: :func:`evaluate` -> :class:`Evaluation` (``cost``: :class:`CostBreakdown`, per-function and
  per-state reports, ``delays`` {user node: seconds}, ``mean_delay``, ``max_delay``, ``objective``,
  ``violations``); :func:`request_delay` (one request entering at one node, optionally under another
  PathTable, e.g. with sampled delays); :func:`cost_breakdown`; :func:`violations` (capacity, delay
  bound, unreachable pairs, unknown names); :func:`deployment_bytes`; :func:`objective` (what every
  algorithm minimises: cost + delay_weight * mean delay, inf when infeasible).

Delay of a request entering at user node u (all transfers on least-delay paths, t(a, b, x) = 0 when
a == b else D[a,b] + x / B[a,b]):
    ready(f)  = t(u, p(f), request_bytes)              for an entry function (no predecessor)
              = max_g [finish(g) + t(p(g), p(f), bytes(g,f))]   otherwise
    finish(f) = ready(f) + cpu(f)/speed(p(f)) + sum_s access(f, s)
    access(f, s) = 0 if p(f) == p(s) else 2 D[p(f),p(s)] + (read + write) / B[p(f),p(s)]
    delay(u)  = max over exit functions h of finish(h) + t(p(h), u, response_bytes)
Cost over the horizon H (seconds), with R = H * sum_u rate(u) requests:
    processing   = R * sum_f cpu(f) * cpu_cost(p(f))
    transmission = R * sum_(g,f) bytes/1e9 * C[p(g),p(f)] + R * sum_(f,s) (read+write)/1e9 * C[p(f),p(s)]
                   + H * sum_u rate(u) * (request_bytes * sum_entry C[u,p(f)]
                                          + response_bytes * sum_exit C[p(h),u]) / 1e9
    storage      = sum_s size(s)/1e9 * storage_cost(p(s)) * H/3600
    deployment   = sum_n deploy_cost(n) * (bytes of the parts of images placed on n not in cached(n)) / 1e9
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

MODEL_VERSION = 1
GB = 1e9


# ---------------------------------------------------------------------------------------------------
# Infrastructure
@dataclass(frozen=True)
class Node:
    """An edge node. ``cpu`` in millicores, ``memory``/``storage`` in bytes, costs as in the module doc."""

    name: str
    cpu: float
    memory: float
    speed: float = 1.0
    cpu_cost: float = 0.0
    storage_cost: float = 0.0
    deploy_cost: float = 0.0
    storage: float = math.inf
    cached: frozenset = frozenset()
    pos: tuple[float, float] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Link:
    """An undirected link: ``bandwidth`` bytes/s, mean ``delay`` and ``delay_std`` in seconds."""

    a: str
    b: str
    bandwidth: float
    delay: float
    cost_per_gb: float = 0.0
    delay_std: float = 0.0


@dataclass(frozen=True)
class Network:
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]

    def node(self, name: str) -> Node:
        return self.nodes[self.index[name]]

    @property
    def index(self) -> dict[str, int]:
        try:
            return self.__dict__["_index"]
        except KeyError:
            idx = {n.name: i for i, n in enumerate(self.nodes)}
            object.__setattr__(self, "_index", idx)
            return idx

    def with_delays(self, delays: Mapping[tuple[str, str], float]) -> Network:
        """A copy whose link (a, b) (either order) has delay ``delays[(a, b)]``; other links unchanged."""
        links = []
        for link in self.links:
            d = delays.get((link.a, link.b), delays.get((link.b, link.a)))
            links.append(link if d is None else dataclasses.replace(link, delay=float(d)))
        return Network(self.nodes, tuple(links))


# ---------------------------------------------------------------------------------------------------
# Application
@dataclass(frozen=True)
class Image:
    """An image as the set of parts a node must hold to run it: remora chunks or OCI layers."""

    name: str
    parts: tuple[tuple[str, int], ...] = ()
    kind: str = "oci"  # "remora" (chunk digests + bootstrap) or "oci" (layer digests)

    @property
    def size(self) -> int:
        return sum(s for _, s in self.parts)


@dataclass(frozen=True)
class Function:
    """``cpu``: reference-core-seconds per request; ``memory`` bytes (reserved while placed)."""

    name: str
    cpu: float
    memory: float = 0.0
    image: str | None = None


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    bytes: float = 0.0


@dataclass(frozen=True)
class State:
    name: str
    size: float


@dataclass(frozen=True)
class Access:
    function: str
    state: str
    read: float = 0.0
    write: float = 0.0


@dataclass(frozen=True)
class Application:
    name: str
    functions: tuple[Function, ...]
    edges: tuple[Edge, ...] = ()
    states: tuple[State, ...] = ()
    accesses: tuple[Access, ...] = ()
    images: Mapping[str, Image] = field(default_factory=dict)
    request_bytes: float = 0.0
    response_bytes: float = 0.0
    delay_bound: float | None = None
    delay_weight: float = 0.0
    horizon: float = 3600.0

    def function(self, name: str) -> Function:
        return next(f for f in self.functions if f.name == name)

    @property
    def topo_order(self) -> list[str]:
        """Functions in a topological order (the loaders reject cycles; here a cycle raises ValueError)."""
        names = [f.name for f in self.functions]
        indeg = dict.fromkeys(names, 0)
        succ: dict[str, list[str]] = {n: [] for n in names}
        for e in self.edges:
            indeg[e.dst] += 1
            succ[e.src].append(e.dst)
        order, ready = [], [n for n in names if indeg[n] == 0]
        while ready:
            n = ready.pop(0)
            order.append(n)
            for m in succ[n]:
                indeg[m] -= 1
                if indeg[m] == 0:
                    ready.append(m)
        if len(order) != len(names):
            raise ValueError("the function graph has a cycle")
        return order

    @property
    def entries(self) -> list[str]:
        dsts = {e.dst for e in self.edges}
        return [f.name for f in self.functions if f.name not in dsts]

    @property
    def exits(self) -> list[str]:
        srcs = {e.src for e in self.edges}
        return [f.name for f in self.functions if f.name not in srcs]


# ---------------------------------------------------------------------------------------------------
# Routing
class PathTable:
    """Least-delay routing between nodes, computed one source row at a time (and cached).

    ``D[i][j]`` seconds of propagation delay, ``B[i][j]`` the bottleneck bandwidth (bytes/s) and
    ``C[i][j]`` the summed transfer cost per GB along the least-delay path; on the diagonal D = C = 0 and
    B = inf. Unreachable pairs have D = C = inf and B = 0. Only the rows asked for are computed, so an
    algorithm that looks at k candidate nodes pays for k Dijkstra runs, not for all N.
    """

    def __init__(self, network: Network):
        from scipy.sparse import csr_matrix

        self.network = network
        self.index = network.index
        n = len(network.nodes)
        best: dict[tuple[int, int], int] = {}
        for k, link in enumerate(network.links):
            i, j = self.index[link.a], self.index[link.b]
            if i == j:
                continue
            key = (min(i, j), max(i, j))
            if key not in best or link.delay < network.links[best[key]].delay:
                best[key] = k
        rows, cols, w = [], [], []
        self._bw: dict[tuple[int, int], float] = {}
        self._cost: dict[tuple[int, int], float] = {}
        #: (i, j) node indices -> index in ``network.links`` of the link a route uses between them
        #: (the least-delay one when several join the same pair).
        self.link_of: dict[tuple[int, int], int] = {}
        for (i, j), k in best.items():
            link = network.links[k]
            for a, b in ((i, j), (j, i)):
                rows.append(a)
                cols.append(b)
                w.append(link.delay + 1e-12)  # an explicit zero would mean "no edge" to csgraph
                self._bw[(a, b)] = link.bandwidth
                self._cost[(a, b)] = link.cost_per_gb
                self.link_of[(a, b)] = k
        self.graph = self._graph = csr_matrix((w, (rows, cols)), shape=(n, n))
        self._rows: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._pred: dict[int, np.ndarray] = {}
        self.n = n

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(D, B, C) arrays from node index ``i`` to every node."""
        r = self._rows.get(i)
        if r is None:
            from scipy.sparse.csgraph import dijkstra

            dist, pred = dijkstra(self._graph, indices=i, return_predecessors=True)
            D = dist.copy()  # includes 1e-12 s per hop (see __init__): negligible by design
            B = np.zeros(self.n)
            C = np.full(self.n, np.inf)
            B[i], C[i], D[i] = np.inf, 0.0, 0.0
            for v in np.argsort(dist, kind="stable"):
                if v == i or not np.isfinite(dist[v]):
                    continue
                p = pred[v]
                B[v] = min(B[p], self._bw[(p, v)])
                C[v] = C[p] + self._cost[(p, v)]
            r = self._rows[i] = (D, B, C)
            self._pred[i] = pred
        return r

    def predecessors(self, i: int) -> np.ndarray:
        """Dijkstra's predecessor array from node index ``i`` (-9999 where none): the routes behind
        ``row(i)``, so a caller needing the links of a route (the simulator) does not rerun Dijkstra."""
        if i not in self._pred:
            self.row(i)
        return self._pred[i]

    def route(self, a: str, b: str) -> list[int]:
        """Indices (into ``network.links``) of the links on the least-delay route a -> b; [] when a == b.
        Raises ValueError when b is unreachable from a."""
        if a == b:
            return []
        i, j = self.index[a], self.index[b]
        pred = self.predecessors(i)
        out, v = [], j
        while v != i:
            p = int(pred[v])
            if p < 0:
                raise ValueError(f"no path from {a} to {b}")
            out.append(self.link_of[(p, v)])
            v = p
        out.reverse()
        return out

    def d(self, a: str, b: str) -> float:
        return 0.0 if a == b else float(self.row(self.index[a])[0][self.index[b]])

    def bw(self, a: str, b: str) -> float:
        return math.inf if a == b else float(self.row(self.index[a])[1][self.index[b]])

    def c(self, a: str, b: str) -> float:
        return 0.0 if a == b else float(self.row(self.index[a])[2][self.index[b]])

    def transfer(self, a: str, b: str, nbytes: float) -> float:
        """Seconds to move ``nbytes`` from a to b: propagation plus serialisation at the bottleneck."""
        if a == b:
            return 0.0
        D, B, _ = self.row(self.index[a])
        j = self.index[b]
        return float(D[j] + (nbytes / B[j] if nbytes > 0 else 0.0)) if B[j] > 0 else math.inf

    def access(self, a: str, b: str, nbytes: float) -> float:
        """Seconds for a function on a to read/write ``nbytes`` of state on b: a round trip plus transfer."""
        if a == b:
            return 0.0
        D, B, _ = self.row(self.index[a])
        j = self.index[b]
        return float(2 * D[j] + (nbytes / B[j] if nbytes > 0 else 0.0)) if B[j] > 0 else math.inf


# ---------------------------------------------------------------------------------------------------
# Problem and placement
@dataclass(frozen=True)
class Problem:
    network: Network
    app: Application
    users: Mapping[str, float]  # node name -> requests per second entering there

    @property
    def paths(self) -> PathTable:
        try:
            return self.__dict__["_paths"]
        except KeyError:
            pt = PathTable(self.network)
            object.__setattr__(self, "_paths", pt)
            return pt

    @property
    def total_rate(self) -> float:
        return float(sum(self.users.values()))

    @property
    def requests(self) -> float:
        """R: requests over the horizon."""
        return self.total_rate * self.app.horizon

    def cpu_demand(self, f: Function, node: Node) -> float:
        """Millicores function ``f`` keeps busy on ``node`` at the total request rate."""
        return self.total_rate * f.cpu * 1000.0 / node.speed


@dataclass
class Placement:
    functions: dict[str, str]
    states: dict[str, str]
    algorithm: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"functions": dict(self.functions), "states": dict(self.states), "algorithm": self.algorithm,
                "meta": dict(self.meta)}


@dataclass
class CostBreakdown:
    processing: float = 0.0
    transmission: float = 0.0
    storage: float = 0.0
    deployment: float = 0.0

    @property
    def total(self) -> float:
        return self.processing + self.transmission + self.storage + self.deployment

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


@dataclass
class FunctionReport:
    node: str
    processing: float = 0.0
    transmission: float = 0.0  # outgoing DAG edges, its state accesses, its share of user traffic
    deployment: float = 0.0
    delay: float = 0.0  # rate-weighted mean seconds this function adds on the critical path


@dataclass
class StateReport:
    node: str
    storage: float = 0.0


@dataclass
class Evaluation:
    cost: CostBreakdown
    functions: dict[str, FunctionReport]
    states: dict[str, StateReport]
    delays: dict[str, float]
    mean_delay: float
    max_delay: float
    objective: float
    violations: list[str]

    @property
    def feasible(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {"cost": self.cost.to_dict(),
                "functions": {k: dataclasses.asdict(v) for k, v in self.functions.items()},
                "states": {k: dataclasses.asdict(v) for k, v in self.states.items()},
                "delays": dict(self.delays), "mean_delay": self.mean_delay, "max_delay": self.max_delay,
                "objective": self.objective, "violations": list(self.violations), "feasible": self.feasible}


# ---------------------------------------------------------------------------------------------------
# Evaluation
def _trace(problem: Problem, placement: Placement, user: str, paths: PathTable):
    """(delay, per-function seconds on the critical path) for one request entering at ``user``."""
    app, p = problem.app, placement.functions
    fn = {f.name: f for f in app.functions}
    preds: dict[str, list[Edge]] = {f.name: [] for f in app.functions}
    for e in app.edges:
        preds[e.dst].append(e)
    acc: dict[str, float] = {f.name: 0.0 for f in app.functions}
    for a in app.accesses:
        acc[a.function] += paths.access(p[a.function], placement.states[a.state], a.read + a.write)
    finish: dict[str, float] = {}
    via: dict[str, tuple[str | None, float]] = {}
    speed = {n.name: n.speed for n in problem.network.nodes}
    for name in app.topo_order:
        node = p[name]
        if preds[name]:
            best, arg = -math.inf, None
            for e in preds[name]:
                t = finish[e.src] + paths.transfer(p[e.src], node, e.bytes)
                if t > best:
                    best, arg = t, e.src
            ready, inbound = best, best - finish[arg]
        else:
            inbound = paths.transfer(user, node, app.request_bytes)
            ready, arg = inbound, None
        own = fn[name].cpu / speed[node] + acc[name]
        finish[name] = ready + own
        via[name] = (arg, inbound + own)
    best, last = -math.inf, None
    for h in app.exits:
        t = finish[h] + paths.transfer(p[h], user, app.response_bytes)
        if t > best:
            best, last = t, h
    contrib = {f.name: 0.0 for f in app.functions}
    cur = last
    while cur is not None:
        prev, sec = via[cur]
        contrib[cur] = sec
        cur = prev
    return best, contrib


def request_delay(problem: Problem, placement: Placement, user: str, paths: PathTable | None = None) -> float:
    """Seconds for one request entering at node ``user`` (see the module doc); ``paths`` overrides routing."""
    return _trace(problem, placement, user, paths or problem.paths)[0]


def deployment_bytes(problem: Problem, placement: Placement) -> dict[str, float]:
    """Per node, the image bytes it must pull: the union of its functions' image parts minus its cache."""
    need: dict[str, dict[str, int]] = {}
    for f in problem.app.functions:
        img = problem.app.images.get(f.image) if f.image else None
        if img is None:
            continue
        parts = need.setdefault(placement.functions[f.name], {})
        for d, s in img.parts:
            parts[d] = s
    out = {}
    for node, parts in need.items():
        cached = problem.network.node(node).cached
        out[node] = float(sum(s for d, s in parts.items() if d not in cached))
    return out


def cost_breakdown(problem: Problem, placement: Placement) -> CostBreakdown:
    return evaluate(problem, placement, with_delay=False).cost


def violations(problem: Problem, placement: Placement, delays: Mapping[str, float] | None = None) -> list[str]:
    """Human-readable reasons the placement is infeasible (empty list: feasible)."""
    out: list[str] = []
    net, app = problem.network, problem.app
    idx = net.index
    for f in app.functions:
        if f.name not in placement.functions:
            out.append(f"function {f.name!r} is not placed")
        elif placement.functions[f.name] not in idx:
            out.append(f"function {f.name!r} placed on unknown node {placement.functions[f.name]!r}")
    for s in app.states:
        if s.name not in placement.states:
            out.append(f"state {s.name!r} is not placed")
        elif placement.states[s.name] not in idx:
            out.append(f"state {s.name!r} placed on unknown node {placement.states[s.name]!r}")
    if out:
        return out
    cpu: dict[str, float] = {}
    mem: dict[str, float] = {}
    sto: dict[str, float] = {}
    for f in app.functions:
        n = placement.functions[f.name]
        cpu[n] = cpu.get(n, 0.0) + problem.cpu_demand(f, net.node(n))
        mem[n] = mem.get(n, 0.0) + f.memory
    for s in app.states:
        n = placement.states[s.name]
        sto[n] = sto.get(n, 0.0) + s.size
    tol = 1e-6
    for n, v in cpu.items():
        if v > net.node(n).cpu * (1 + tol) + tol:
            out.append(f"node {n}: CPU {v:.1f}m needed > {net.node(n).cpu:.1f}m capacity")
    for n, v in mem.items():
        if v > net.node(n).memory * (1 + tol) + tol:
            out.append(f"node {n}: memory {v:.0f} B needed > {net.node(n).memory:.0f} B capacity")
    for n, v in sto.items():
        if v > net.node(n).storage * (1 + tol) + tol:
            out.append(f"node {n}: state storage {v:.0f} B needed > {net.node(n).storage:.0f} B capacity")
    if delays is not None:
        for u, d in delays.items():
            if not math.isfinite(d):
                out.append(f"requests entering at {u} cannot reach the application (no path)")
            elif app.delay_bound is not None and d > app.delay_bound * (1 + tol) + tol:
                out.append(f"requests entering at {u}: delay {d * 1000:.2f} ms > bound {app.delay_bound * 1000:.2f} ms")
    return out


def evaluate(problem: Problem, placement: Placement, paths: PathTable | None = None,
             with_delay: bool = True) -> Evaluation:
    """Cost breakdown, per-function/state reports, per-user delays and feasibility of ``placement``."""
    pt = paths or problem.paths
    net, app = problem.network, problem.app
    pre = violations(problem, placement)
    if any("not placed" in v or "unknown node" in v for v in pre):
        return Evaluation(CostBreakdown(math.inf, math.inf, math.inf, math.inf), {}, {}, {}, math.inf, math.inf,
                          math.inf, pre)
    p, ps = placement.functions, placement.states
    R, H = problem.requests, app.horizon
    fr = {f.name: FunctionReport(p[f.name]) for f in app.functions}
    sr = {s.name: StateReport(ps[s.name]) for s in app.states}
    cost = CostBreakdown()
    for f in app.functions:
        fr[f.name].processing = R * f.cpu * net.node(p[f.name]).cpu_cost
    for e in app.edges:
        fr[e.src].transmission += R * e.bytes / GB * pt.c(p[e.src], p[e.dst])
    for a in app.accesses:
        fr[a.function].transmission += R * (a.read + a.write) / GB * pt.c(p[a.function], ps[a.state])
    for u, rate in problem.users.items():
        for f in app.entries:
            fr[f].transmission += H * rate * app.request_bytes / GB * pt.c(u, p[f])
        for h in app.exits:
            fr[h].transmission += H * rate * app.response_bytes / GB * pt.c(p[h], u)
    for s in app.states:
        sr[s.name].storage = s.size / GB * net.node(ps[s.name]).storage_cost * H / 3600.0
    # Deployment: each missing part is paid once per node, charged to the first function needing it.
    seen: dict[str, set] = {}
    for f in app.functions:
        img = app.images.get(f.image) if f.image else None
        if img is None:
            continue
        node = net.node(p[f.name])
        got = seen.setdefault(node.name, set())
        new = 0
        for d, s in img.parts:
            if d not in node.cached and d not in got:
                got.add(d)
                new += s
        fr[f.name].deployment = new / GB * node.deploy_cost
    cost.processing = sum(r.processing for r in fr.values())
    cost.transmission = sum(r.transmission for r in fr.values())
    cost.deployment = sum(r.deployment for r in fr.values())
    cost.storage = sum(r.storage for r in sr.values())
    delays: dict[str, float] = {}
    mean = mx = 0.0
    if with_delay:
        total = problem.total_rate
        for u, rate in problem.users.items():
            d, contrib = _trace(problem, placement, u, pt)
            delays[u] = d
            if total > 0:
                mean += rate / total * d
                for name, sec in contrib.items():
                    fr[name].delay += rate / total * sec
        mx = max(delays.values(), default=0.0)
        if not problem.users:
            mean = mx = 0.0
    viol = violations(problem, placement, delays if with_delay else None)
    obj = cost.total + app.delay_weight * mean
    return Evaluation(cost, fr, sr, delays, mean, mx, obj, viol)


def objective(problem: Problem, placement: Placement) -> float:
    """What every algorithm minimises: total cost + delay_weight * mean delay (inf if infeasible)."""
    ev = evaluate(problem, placement)
    return ev.objective if ev.feasible else math.inf


def node_names(problem: Problem) -> list[str]:
    return [n.name for n in problem.network.nodes]


def iter_pairs(items: Iterable[str]) -> Iterable[tuple[str, str]]:
    items = list(items)
    for i, a in enumerate(items):
        for b in items[i + 1:]:
            yield a, b
