"""Random instances for evaluating placement algorithms: edge topologies, applications, traces, delays.

Why this module exists: the issue asks for measured, not cited, claims (cost/optimum ratios, savings
against baselines, regret of the online learner). Measurements need many instances whose shape is
controlled (size, heterogeneity, where users sit, how delays move) and reproducible from one seed.
Everything here is a pure function of its arguments and a ``seed``; nothing touches the network.

Shapes produced (plain data; :func:`to_problem` turns them into the model's dataclasses):

* :func:`waxman_topology` — Waxman random graph on the unit square (link probability
  ``beta * exp(-d / (alpha * L))``): flat, distance-dominated edge networks.
* :func:`transit_stub_topology` — GT-ITM-like two-level hierarchy: a few *transit* domains (regional
  data centres: big, cheap, far apart) and many *stub* domains hanging off each transit node (edge
  sites: small, dearer, close to users). This is where placement decisions matter most: cheap is far,
  near is dear.
* :func:`random_application` — a layered DAG of functions with one entry function (where the request
  arrives), images drawn from a pool whose chunk sets overlap (so chunk-level deployment costs differ
  from layer-level ones), and state objects read/written by 1-3 functions each.
* :func:`request_trace` — Poisson arrivals at the user-facing nodes.
* :class:`DelayProcess` — per-link delay distributions whose hidden means differ from the declared
  ones and may drift (abrupt change points or a slow sinusoid), for the online learner.

Units throughout: seconds, bytes, bytes/second, millicores, MB of memory, currency units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from remora.errors import InvalidInput

GB = 1_000_000_000
MB = 1_000_000

# Link classes: (bandwidth choices in bytes/s, base delay s, delay per unit distance s, cost per GB)
_LINK_EDGE = ((12.5 * MB, 25 * MB, 125 * MB), 0.001, 0.010, 0.02)
_LINK_STUB_UP = ((125 * MB, 250 * MB), 0.002, 0.010, 0.01)
_LINK_TRANSIT = ((1250 * MB, 2500 * MB), 0.005, 0.040, 0.005)


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check_positive(**kw) -> None:
    for name, value in kw.items():
        if not isinstance(value, (int, float)) or value <= 0:
            raise InvalidInput(f"generator parameter {name} must be positive, got {value!r}")


# --------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class GenImage:
    """An image as the generators see it: a name, its chunk digests and each chunk's size."""

    name: str
    chunks: tuple[str, ...]
    chunk_size: int

    @property
    def size(self) -> int:
        return len(self.chunks) * self.chunk_size


def image_pool(count: int, seed=0, *, chunk_size: int = 4 * MB, base_chunks: int = 20,
               own_chunks: tuple[int, int] = (5, 60)) -> list[GenImage]:
    """``count`` images sharing one of three base layers (so chunk-level dedup has something to find)."""
    _check_positive(count=count, chunk_size=chunk_size)
    rng = _rng(seed)
    bases = [tuple(f"sha256:base{b}-{i:04d}" for i in range(base_chunks * (b + 1))) for b in range(3)]
    pool = []
    for k in range(count):
        base = bases[int(rng.integers(len(bases)))]
        own = int(rng.integers(own_chunks[0], own_chunks[1] + 1))
        pool.append(GenImage(f"img{k}", base + tuple(f"sha256:img{k}-{i:04d}" for i in range(own)),
                             chunk_size))
    return pool


# ------------------------------------------------------------------------------------- topology


def _node_attrs(rng, tier: str) -> dict:
    """Capacity and prices by tier: 'edge' small and dear, 'regional' big and cheap (model.Node fields)."""
    if tier == "regional":
        return {"tier": tier, "cpu": float(rng.choice([32000, 64000])), "memory": float(rng.choice([64, 128])) * 2**30,
                "speed": 1.0,
                "cpu_cost": float(rng.uniform(0.4, 0.7)) * 1e-4,       # per reference-core-second
                "storage_cost": float(rng.uniform(0.01, 0.02)),        # per GB-hour
                "deploy_cost": float(rng.uniform(0.2, 0.4)),           # per GB pulled
                "storage": 2000.0 * GB}
    return {"tier": tier, "cpu": float(rng.choice([4000, 8000, 16000])),
            "memory": float(rng.choice([8, 16, 32])) * 2**30,
            "speed": float(rng.uniform(0.8, 1.2)),
            "cpu_cost": float(rng.uniform(1.0, 2.0)) * 1e-4,
            "storage_cost": float(rng.uniform(0.03, 0.06)),
            "deploy_cost": float(rng.uniform(0.8, 1.6)),
            "storage": float(rng.choice([50, 100, 200])) * GB}


def _link_attrs(rng, cls, distance: float) -> dict:
    bws, base, per_dist, cost = cls
    return {"bandwidth": float(rng.choice(bws)), "delay": base + per_dist * distance * float(rng.uniform(0.8, 1.2)),
            "cost_per_gb": cost * float(rng.uniform(0.8, 1.25))}


def _finish(g: nx.Graph, rng, users: int, images: list[GenImage] | None, cache_prob: float,
            total_rate: float) -> nx.Graph:
    """Mark user-facing nodes (edge tier only) with request rates summing to ``total_rate``; seed caches."""
    edge_nodes = [n for n, d in g.nodes(data=True) if d["tier"] == "edge"] or list(g.nodes)
    users = max(1, min(users, len(edge_nodes)))
    chosen = rng.choice(len(edge_nodes), size=users, replace=False).tolist()
    weights = rng.uniform(0.2, 1.0, size=users)
    weights = weights / weights.sum() * total_rate
    for n in g.nodes:
        g.nodes[n]["user_rate"] = 0.0
        g.nodes[n]["cached_images"] = tuple(im.name for im in (images or []) if rng.random() < cache_prob)
    for k, w in zip(chosen, weights):
        g.nodes[edge_nodes[k]]["user_rate"] = float(w)
    g.graph["users"] = [n for n in g.nodes if g.nodes[n]["user_rate"] > 0]
    return g


def _connect(g: nx.Graph, rng, cls) -> None:
    """Join every component to the largest one by its geometrically nearest pair (Waxman can split)."""
    comps = sorted(nx.connected_components(g), key=len, reverse=True)
    main = set(comps[0])
    for comp in comps[1:]:
        best = min(((a, b) for a in comp for b in main),
                   key=lambda ab: math.dist(g.nodes[ab[0]]["pos"], g.nodes[ab[1]]["pos"]))
        g.add_edge(*best, **_link_attrs(rng, cls, math.dist(g.nodes[best[0]]["pos"], g.nodes[best[1]]["pos"])))
        main |= comp


def waxman_topology(n: int, seed=0, *, alpha: float = 0.25, mean_degree: float = 4.0, regional_frac: float = 0.1,
                    users: int | None = None, images: list[GenImage] | None = None, cache_prob: float = 0.2,
                    total_rate: float = 50.0) -> nx.Graph:
    """A connected Waxman graph: nodes ``e0..``; ~``regional_frac`` of them big/cheap 'regional' nodes.

    Link probability ``beta * exp(-d / (alpha * L))`` (L = the square's diagonal), with ``beta`` chosen
    so the expected mean degree is ``mean_degree`` whatever ``n`` is (networkx's fixed-beta generator
    gives a dense graph at 1,000 nodes); drawn in numpy because networkx's loop is O(n^2) in Python.
    """
    _check_positive(n=n, alpha=alpha, mean_degree=mean_degree)
    rng = _rng(seed)
    pos = rng.uniform(0, 1, size=(n, 2))
    d = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))
    w = np.exp(-d / (alpha * math.sqrt(2)))
    iu = np.triu_indices(n, 1)
    beta = min(1.0, mean_degree * n / 2 / max(float(w[iu].sum()), 1e-12))
    keep = rng.random(len(iu[0])) < beta * w[iu]
    g = nx.Graph()
    regional = set(rng.choice(n, size=max(1, round(n * regional_frac)), replace=False).tolist()) if n > 1 else set()
    for i in range(n):
        g.add_node(f"e{i}", pos=(float(pos[i, 0]), float(pos[i, 1])),
                   **_node_attrs(rng, "regional" if i in regional else "edge"))
    for a, b in zip(iu[0][keep].tolist(), iu[1][keep].tolist()):
        cls = _LINK_TRANSIT if (a in regional and b in regional) else _LINK_EDGE
        g.add_edge(f"e{a}", f"e{b}", **_link_attrs(rng, cls, float(d[a, b])))
    if n > 1:
        _connect(g, rng, _LINK_EDGE)
    g.graph["kind"] = "waxman"
    return _finish(g, rng, users if users is not None else max(2, min(20, n // 10)), images, cache_prob, total_rate)


def transit_stub_topology(n: int, seed=0, *, transit_domains: int | None = None, transit_size: int = 3,
                          stubs_per_transit: int = 2, users: int | None = None,
                          images: list[GenImage] | None = None, cache_prob: float = 0.2,
                          total_rate: float = 50.0, extra_stub_edges: float = 0.3) -> nx.Graph:
    """A GT-ITM-like transit-stub graph with exactly ``n`` nodes.

    Transit nodes (``t<d>.<i>``) form rings-plus-chords inside a domain and a ring across domains; each
    transit node has ``stubs_per_transit`` stub domains (``s<d>.<i>.<k>.<j>``), each a small random tree
    plus ``extra_stub_edges`` chords, hung off the transit node by one uplink (and a second uplink to
    another transit node of the domain with probability 0.2, as multi-homed sites are).
    """
    _check_positive(n=n, transit_size=transit_size, stubs_per_transit=stubs_per_transit)
    rng = _rng(seed)
    if transit_domains is None:
        transit_domains = max(1, min(8, n // 60))
    transit_size = min(transit_size, max(1, n // (transit_domains * (1 + stubs_per_transit))))
    n_transit = transit_domains * transit_size
    if n_transit > n:
        transit_domains, transit_size, n_transit = 1, 1, 1
    g = nx.Graph()
    domain_centres = rng.uniform(0.2, 0.8, size=(transit_domains, 2))
    transit: list[list[str]] = []
    for d in range(transit_domains):
        names = []
        for i in range(transit_size):
            name = f"t{d}.{i}"
            pos = tuple(np.clip(domain_centres[d] + rng.normal(0, 0.05, 2), 0, 1))
            g.add_node(name, pos=pos, **_node_attrs(rng, "regional"))
            names.append(name)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                if j == i + 1 or (i == 0 and j == len(names) - 1) or rng.random() < 0.3:
                    g.add_edge(names[i], names[j], **_link_attrs(rng, _LINK_TRANSIT, math.dist(
                        g.nodes[names[i]]["pos"], g.nodes[names[j]]["pos"])))
        transit.append(names)
    for d in range(transit_domains):  # ring of domains, plus a chord now and then
        for e in (([d + 1] if transit_domains > 1 else [])
                  + ([int(rng.integers(transit_domains))] if transit_domains > 3 else [])):
            e %= transit_domains
            if e != d:
                a, b = transit[d][int(rng.integers(transit_size))], transit[e][int(rng.integers(transit_size))]
                g.add_edge(a, b, **_link_attrs(rng, _LINK_TRANSIT, math.dist(g.nodes[a]["pos"], g.nodes[b]["pos"])))
    stubs = [(d, i, k) for d in range(transit_domains) for i in range(transit_size) for k in range(stubs_per_transit)]
    remaining = n - n_transit
    sizes = [remaining // len(stubs) + (1 if s < remaining % len(stubs) else 0) for s in range(len(stubs))]
    for (d, i, k), size in zip(stubs, sizes):
        if size == 0:
            continue
        t_name = transit[d][i]
        centre = np.clip(np.array(g.nodes[t_name]["pos"]) + rng.normal(0, 0.08, 2), 0, 1)
        names = []
        for j in range(size):
            name = f"s{d}.{i}.{k}.{j}"
            g.add_node(name, pos=tuple(np.clip(centre + rng.normal(0, 0.03, 2), 0, 1)), **_node_attrs(rng, "edge"))
            if names:
                parent = names[int(rng.integers(len(names)))]
                g.add_edge(parent, name,
                           **_link_attrs(rng, _LINK_EDGE, math.dist(g.nodes[parent]["pos"], g.nodes[name]["pos"])))
            names.append(name)
        for _ in range(int(extra_stub_edges * size)):
            a, b = rng.choice(len(names), size=2, replace=False) if size > 1 else (0, 0)
            if a != b and not g.has_edge(names[a], names[b]):
                g.add_edge(names[a], names[b],
                           **_link_attrs(rng, _LINK_EDGE,
                                         math.dist(g.nodes[names[a]]["pos"], g.nodes[names[b]]["pos"])))
        gw = names[0]
        g.add_edge(gw, t_name, **_link_attrs(rng, _LINK_STUB_UP, math.dist(g.nodes[gw]["pos"], g.nodes[t_name]["pos"])))
        if transit_size > 1 and rng.random() < 0.2:
            other = transit[d][(i + 1) % transit_size]
            g.add_edge(names[-1], other,
                       **_link_attrs(rng, _LINK_STUB_UP, math.dist(g.nodes[names[-1]]["pos"], g.nodes[other]["pos"])))
    g.graph["kind"] = "transit-stub"
    n_edge = n - n_transit
    return _finish(g, rng, users if users is not None else max(2, min(20, n_edge // 10)), images, cache_prob,
                   total_rate)


# ---------------------------------------------------------------------------------- application


@dataclass
class GenFunction:
    name: str
    cpu: float            # reference-core-seconds of work per request
    mem: int              # bytes reserved while deployed
    image: str


@dataclass
class GenState:
    name: str
    size: int                             # bytes stored
    reads: dict[str, int] = field(default_factory=dict)    # function -> bytes read per request
    writes: dict[str, int] = field(default_factory=dict)   # function -> bytes written per request


@dataclass
class GenApp:
    name: str
    functions: list[GenFunction]
    edges: dict[tuple[str, str], int]     # (producer, consumer) -> bytes per request
    states: list[GenState]
    images: list[GenImage]
    entry: str
    delay_bound: float                    # seconds per request

    def dag(self) -> nx.DiGraph:
        d = nx.DiGraph()
        d.add_nodes_from(f.name for f in self.functions)
        d.add_edges_from(self.edges)
        return d


def random_application(n_functions: int, seed=0, *, n_states: int | None = None, images: list[GenImage] | None = None,
                       width: int = 3, edge_prob: float = 0.35, delay_bound: float = 0.5, name: str = "app") -> GenApp:
    """A layered random DAG with one entry function and state objects shared by 1-3 functions.

    Layers hold up to ``width`` functions; every non-entry function gets at least one predecessor in
    an earlier layer (so everything is reachable from the entry) and further predecessors with
    ``edge_prob``. CPU per request is log-uniform 5-80 ms of a reference core, payloads 10 kB-1 MB;
    state objects 10 MB-2 GB with per-request reads 10 kB-5 MB and writes a tenth of that on a third
    of the accessors.
    """
    _check_positive(n_functions=n_functions, width=width, delay_bound=delay_bound)
    rng = _rng(seed)
    if images is None:
        images = image_pool(max(2, n_functions // 2), rng)
    n_states = max(1, n_functions // 3) if n_states is None else n_states
    funcs = [GenFunction(f"f{i}", cpu=float(10 ** rng.uniform(math.log10(0.005), math.log10(0.08))),
                         mem=int(rng.choice([128, 256, 512, 1024])) * 2**20,
                         image=images[int(rng.integers(len(images)))].name) for i in range(n_functions)]
    layers, i = [[0]], 1
    while i < n_functions:
        w = int(rng.integers(1, width + 1))
        layers.append(list(range(i, min(n_functions, i + w))))
        i += w
    edges: dict[tuple[str, str], int] = {}
    for li in range(1, len(layers)):
        earlier = [f for layer in layers[:li] for f in layer]
        for f in layers[li]:
            preds = {int(rng.choice(layers[li - 1]))}
            preds |= {p for p in earlier if rng.random() < edge_prob / max(1, li)}
            for p in sorted(preds):
                edges[(f"f{p}", f"f{f}")] = int(10 ** rng.uniform(4, 6))
    states = []
    for s in range(n_states):
        users = rng.choice(n_functions, size=min(n_functions, int(rng.integers(1, 4))), replace=False)
        st = GenState(f"s{s}", size=int(10 ** rng.uniform(7, math.log10(2 * GB))))
        for u in sorted(users.tolist()):
            st.reads[f"f{u}"] = int(10 ** rng.uniform(4, math.log10(5 * MB)))
            if rng.random() < 1 / 3:
                st.writes[f"f{u}"] = st.reads[f"f{u}"] // 10
        states.append(st)
    used = {f.image for f in funcs}
    return GenApp(name, funcs, edges, states, [im for im in images if im.name in used], "f0", delay_bound)


# ---------------------------------------------------------------------------------------- traces


def request_trace(rates: dict[str, float], seed=0, *, duration: float | None = None,
                  count: int | None = None) -> list[tuple[float, str]]:
    """Merged Poisson arrivals ``(time, user node)``, sorted, for ``duration`` seconds or ``count`` requests."""
    if (duration is None) == (count is None):
        raise InvalidInput("request_trace needs exactly one of duration or count")
    rng = _rng(seed)
    names = [n for n, r in rates.items() if r > 0]
    if not names:
        raise InvalidInput("request_trace needs at least one node with a positive rate")
    lam = np.array([rates[n] for n in names], dtype=float)
    total = float(lam.sum())
    if count is None:
        count = int(rng.poisson(total * duration))
    times = np.cumsum(rng.exponential(1 / total, size=count))
    if duration is not None:
        times = times[times <= duration]
    who = rng.choice(len(names), size=len(times), p=lam / total)
    return [(float(t), names[int(k)]) for t, k in zip(times, who)]


# ---------------------------------------------------------------------------------------- delays


class DelayProcess:
    """Per-link delay distributions, unknown to the planner, optionally drifting over rounds.

    The planner is told each link's *declared* mean (what probes once measured). The hidden true mean
    is ``declared * m`` with ``m`` lognormal(0, ``mismatch``): probes are stale and noisy (or exactly
    ``true_means`` when given, for instances whose best placement is known by construction). Each sample
    is the current mean times a Gamma(``shape``, 1/``shape``) variate (mean 1, CV ``1/sqrt(shape)``),
    so delays stay positive and right-skewed like queueing delays.

    Drift (over rounds ``0..horizon``):
    * ``"none"`` — stationary;
    * ``"abrupt"`` — at ``changes`` evenly spaced change points a fraction ``drift_frac`` of links
      has its mean multiplied by a log-uniform factor in [1/``drift_scale``, ``drift_scale``]
      (congestion appears, a route is fixed); or at the rounds of an explicit ``schedule``;
    * ``"sine"`` — each link's mean swings by a factor up to ``drift_scale`` with its own phase,
      ``periods`` full periods over the horizon (diurnal load).
    """

    def __init__(self, declared: np.ndarray, seed=0, *, true_means: np.ndarray | None = None,
                 mismatch: float = 0.5, shape: float = 4.0,
                 drift: str = "none", horizon: int = 10_000, changes: int = 2, drift_frac: float = 0.3,
                 drift_scale: float = 4.0, periods: float = 2.0,
                 schedule: list[tuple[int, np.ndarray]] | None = None):
        if drift not in ("none", "abrupt", "sine"):
            raise InvalidInput(f"unknown drift {drift!r} (none, abrupt, sine)")
        declared = np.asarray(declared, dtype=float)
        if declared.ndim != 1 or (declared <= 0).any():
            raise InvalidInput("declared link delays must be a 1-d array of positive numbers")
        _check_positive(shape=shape, horizon=horizon, drift_scale=drift_scale)
        rng = _rng(seed)
        self.declared = declared
        self.shape = shape
        self.drift = drift
        self.horizon = horizon
        noise = np.exp(rng.normal(0.0, mismatch, size=declared.shape))
        self.base = declared * noise if true_means is None else np.asarray(true_means, dtype=float).copy()
        if self.base.shape != declared.shape or (self.base <= 0).any():
            raise InvalidInput("true_means must be positive and match the declared delays")
        self.change_points = ([int(horizon * (k + 1) / (changes + 1)) for k in range(changes)]
                              if drift == "abrupt" else [])
        self._factors = []
        for _ in self.change_points:
            f = np.ones_like(declared)
            hit = rng.random(declared.shape) < drift_frac
            f[hit] = np.exp(rng.uniform(-math.log(drift_scale), math.log(drift_scale), size=int(hit.sum())))
            self._factors.append(f)
        if schedule is not None:  # explicit change points: (round, multiplicative factor per link)
            if drift != "abrupt":
                raise InvalidInput("an explicit drift schedule needs drift='abrupt'")
            self.change_points = [int(t) for t, _ in schedule]
            self._factors = [np.asarray(f, dtype=float) for _, f in schedule]
            if any(f.shape != declared.shape or (f <= 0).any() for f in self._factors):
                raise InvalidInput("drift schedule factors must be positive and one per link")
        self._phase = rng.uniform(0, 2 * math.pi, size=declared.shape)
        self._amp = math.log(drift_scale) / 2
        self._periods = periods
        self._sample_seed = int(rng.integers(2**63))

    def means(self, t: int) -> np.ndarray:
        """True mean delay of every link at round ``t``."""
        m = self.base.copy()
        for cp, f in zip(self.change_points, self._factors):
            if t >= cp:
                m *= f
        if self.drift == "sine":
            m *= np.exp(self._amp * np.sin(2 * math.pi * self._periods * t / self.horizon + self._phase))
        return m

    def sample(self, rounds: int, start: int = 0) -> np.ndarray:
        """Delays of every link for rounds ``start..start+rounds-1`` (rounds x links), reproducible."""
        rng = np.random.default_rng([self._sample_seed, start])
        noise = rng.gamma(self.shape, 1.0 / self.shape, size=(rounds, self.declared.size))
        if self.drift == "none":
            return noise * self.base
        return noise * np.stack([self.means(t) for t in range(start, start + rounds)])


# ------------------------------------------------------------------------------- to the model


def to_problem(g: nx.Graph, app: GenApp, *, delay_weight: float = 20.0, horizon: float = 3600.0,
               request_bytes: float = 10_000, response_bytes: float = 10_000, delay_bound: float | None = None,
               delay_cv: float = 0.5):
    """Convert a generated topology and application into a :class:`remora.placement.model.Problem`.

    ``delay_weight`` (cost per second of mean delay) makes delay part of the objective; the default
    (20 per second) puts 100 ms of mean delay on the order of a 30-node instance's hourly bill
    (a few units), so neither term is noise.
    ``delay_cv`` sets each link's ``delay_std`` relative to its mean (what :class:`DelayProcess`
    with ``shape = 1/cv^2`` samples). ``delay_bound`` defaults to none (the benchmarks compare
    cost and delay, not feasibility against a bound; the online learner uses ``app.delay_bound``).
    """
    from remora.placement import model as m

    chunk_of = {im.name: im for im in app.images}
    nodes = []
    for name, d in g.nodes(data=True):
        cached = frozenset(c for im_name in d.get("cached_images", ()) if im_name in chunk_of
                           for c in chunk_of[im_name].chunks)
        nodes.append(m.Node(name=name, cpu=d["cpu"], memory=d["memory"], speed=d["speed"], cpu_cost=d["cpu_cost"],
                            storage_cost=d["storage_cost"], deploy_cost=d["deploy_cost"], storage=d["storage"],
                            cached=cached, pos=tuple(d["pos"]), labels={"tier": d["tier"]}))
    links = tuple(m.Link(a, b, bandwidth=d["bandwidth"], delay=d["delay"], cost_per_gb=d["cost_per_gb"],
                         delay_std=d["delay"] * delay_cv) for a, b, d in g.edges(data=True))
    images = {im.name: m.Image(im.name, tuple((c, im.chunk_size) for c in im.chunks), kind="remora")
              for im in app.images}
    accesses = []
    for st in app.states:
        for f in sorted(set(st.reads) | set(st.writes)):
            accesses.append(m.Access(f, st.name, read=float(st.reads.get(f, 0)), write=float(st.writes.get(f, 0))))
    application = m.Application(
        name=app.name,
        functions=tuple(m.Function(f.name, cpu=f.cpu, memory=float(f.mem), image=f.image) for f in app.functions),
        edges=tuple(m.Edge(a, b, float(x)) for (a, b), x in app.edges.items()),
        states=tuple(m.State(st.name, float(st.size)) for st in app.states),
        accesses=tuple(accesses), images=images, request_bytes=request_bytes, response_bytes=response_bytes,
        delay_bound=delay_bound, delay_weight=delay_weight, horizon=horizon)
    users = {n: float(g.nodes[n]["user_rate"]) for n in g.graph["users"]}
    return m.Problem(m.Network(tuple(nodes), links), application, users)


def random_problem(n_nodes: int, n_functions: int, seed=0, *, topology: str = "transit-stub",
                   n_states: int | None = None, users: int | None = None, total_rate: float = 50.0,
                   cache_prob: float = 0.2, load: float | None = None, **problem_kw):
    """One reproducible instance: topology + application + users, as a model ``Problem``.

    ``load`` (optional) rescales the user rates so the application's total CPU demand is ``load`` times
    the largest node's capacity: above 1 no single node can host everything, so the trade-off between
    cheap-but-far, near-but-dear and co-location is forced (at low load "all on one big node" is
    optimal and every algorithm finds it).
    """
    rng = _rng(seed)
    images = image_pool(max(2, n_functions // 2), rng)
    if topology == "waxman":
        g = waxman_topology(n_nodes, rng, users=users, images=images, cache_prob=cache_prob, total_rate=total_rate)
    elif topology == "transit-stub":
        g = transit_stub_topology(n_nodes, rng, users=users, images=images, cache_prob=cache_prob,
                                  total_rate=total_rate)
    else:
        raise InvalidInput(f"unknown topology kind {topology!r} (waxman, transit-stub)")
    app = random_application(n_functions, rng, n_states=n_states, images=images)
    if load is not None:
        _check_positive(load=load)
        demand = sum(f.cpu for f in app.functions) * 1000.0          # millicores per (request/s)
        biggest = max(d["cpu"] for _, d in g.nodes(data=True))
        scale = load * biggest / demand / sum(g.nodes[u]["user_rate"] for u in g.graph["users"])
        for u in g.graph["users"]:
            g.nodes[u]["user_rate"] *= scale
    return to_problem(g, app, **problem_kw)
