"""Presenting a plan: a rich table, JSON, a picture of the placement on the topology, Kubernetes manifests.

Every output is derived from :func:`remora.placement.model.evaluate`, so the table, the JSON and the
picture agree on every number. The JSON document (``to_json``) is versioned with the model
(docs/placement.md §9) so scripts (and a later ``--preheat`` step, which needs exactly the (node, image)
pairs listed under ``deploy``) can consume it.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from remora.errors import StorageError, UsageError

from .model import MODEL_VERSION, Evaluation, Placement, Problem, deployment_bytes


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def deploy_list(problem: Problem, plan: Placement) -> list[dict]:
    """The (node, image) pairs the plan needs, with the bytes the node lacks: what a preheat would fetch."""
    app = problem.app
    out: dict[tuple[str, str], dict] = {}
    for f in app.functions:
        if not f.image:
            continue
        node = problem.network.node(plan.functions[f.name])
        img = app.images.get(f.image)
        missing = sum(s for d, s in (img.parts if img else ()) if d not in node.cached)
        entry = out.setdefault((node.name, f.image), {"node": node.name, "image": f.image, "functions": [],
                                                      "kind": img.kind if img else "oci", "missing_bytes": missing})
        entry["functions"].append(f.name)
    return list(out.values())


def to_json(problem: Problem, plan: Placement, ev: Evaluation) -> dict:
    return _finite({
        "model_version": MODEL_VERSION,
        "application": problem.app.name,
        "algorithm": plan.algorithm,
        "placement": {"functions": plan.functions, "states": plan.states},
        "evaluation": ev.to_dict(),
        "deploy": deploy_list(problem, plan),
        "deployment_bytes": deployment_bytes(problem, plan),
        "meta": {k: v for k, v in plan.meta.items() if isinstance(v, (int, float, str, bool, type(None)))},
    })


def _money(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:,.4f}"


def _ms(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x * 1000:,.2f}"


def render_table(problem: Problem, plan: Placement, ev: Evaluation, console=None) -> None:
    """Per-function and per-state rows, then totals (rich, to ``console`` or stdout)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"{problem.app.name}: placement by {plan.algorithm} (costs over {problem.app.horizon / 3600:g} h)",
              show_lines=False)
    for col, just in (("function/\\[state]", "left"), ("node", "left"), ("process", "right"),
                      ("transfer", "right"), ("storage", "right"), ("deploy", "right"), ("delay ms", "right")):
        t.add_column(col, justify=just)
    for name, r in ev.functions.items():
        t.add_row(name, r.node, _money(r.processing), _money(r.transmission), "", _money(r.deployment), _ms(r.delay))
    for name, r in ev.states.items():
        t.add_row(f"\\[{name}]", r.node, "", "", _money(r.storage), "", "")
    c = ev.cost
    t.add_section()
    t.add_row("[bold]total[/]", "", _money(c.processing), _money(c.transmission), _money(c.storage),
              _money(c.deployment), _ms(ev.mean_delay))
    console.print(t)
    secs = plan.meta.get("seconds")
    console.print(f"total cost {_money(c.total)} over {problem.app.horizon / 3600:g} h, "
                  f"mean delay {_ms(ev.mean_delay)} ms, "
                  f"max delay {_ms(ev.max_delay)} ms, objective {_money(ev.objective)}"
                  + (f", planned in {secs:.2f} s" if isinstance(secs, float) else ""))
    if ev.violations:
        console.print("[bold red]infeasible:[/] " + "; ".join(ev.violations))


# ---------------------------------------------------------------------------------------------------
def picture(problem: Problem, plan: Placement, ev: Evaluation, path: str | Path) -> Path:
    """Draw the topology, where each function and state runs, the DAG's data flows and the users."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise UsageError(f"--picture: {path.name}: use a .png or .svg file name")
    net = problem.network
    g = nx.Graph()
    g.add_nodes_from(n.name for n in net.nodes)
    g.add_edges_from((link.a, link.b) for link in net.links)
    if all(n.pos is not None for n in net.nodes):
        pos = {n.name: n.pos for n in net.nodes}
    else:
        pos = nx.spring_layout(g, seed=1)
    used: dict[str, list[str]] = {}
    for f, n in plan.functions.items():
        used.setdefault(n, []).append(f)
    for s, n in plan.states.items():
        used.setdefault(n, []).append(f"[{s}]")
    big = len(net.nodes) > 60
    fig, ax = plt.subplots(figsize=(11, 8), dpi=110)
    nx.draw_networkx_edges(g, pos, ax=ax, edge_color="#cccccc", width=0.6 if big else 1.2)
    others = [n for n in g.nodes if n not in used]
    nx.draw_networkx_nodes(g, pos, nodelist=others, ax=ax, node_size=12 if big else 160, node_color="#dddddd",
                           edgecolors="#999999")
    rate = problem.users
    users = [u for u, r in rate.items() if r > 0]
    if users:
        top = max(rate.values())
        nx.draw_networkx_nodes(g, pos, nodelist=users, ax=ax, node_shape="s",
                               node_size=[(20 + 200 * rate[u] / top) if big else (520 + 600 * rate[u] / top)
                                          for u in users],
                               node_color="#f4a261", alpha=0.85, label="user-facing node (size: requests/s)")
    nx.draw_networkx_nodes(g, pos, nodelist=list(used), ax=ax, node_size=420, node_color="#2a9d8f",
                           edgecolors="black", label="hosts functions / [state]")
    dag = nx.DiGraph()
    for e in problem.app.edges:
        a, b = plan.functions[e.src], plan.functions[e.dst]
        if a != b:
            dag.add_edge(a, b)
    for acc in problem.app.accesses:
        a, b = plan.functions[acc.function], plan.states[acc.state]
        if a != b:
            dag.add_edge(a, b, state=True)
    solid = [(a, b) for a, b, d in dag.edges(data=True) if not d.get("state")]
    dashed = [(a, b) for a, b, d in dag.edges(data=True) if d.get("state")]
    nx.draw_networkx_edges(dag, pos, edgelist=solid, ax=ax, edge_color="#264653", width=2.0, arrows=True,
                           arrowsize=14, connectionstyle="arc3,rad=0.15", node_size=420)
    nx.draw_networkx_edges(dag, pos, edgelist=dashed, ax=ax, edge_color="#e76f51", width=1.6, style="dashed",
                           arrows=True, arrowsize=12, connectionstyle="arc3,rad=-0.15", node_size=420)
    labels = {}
    for n, items in used.items():
        shown = items if len(items) <= 4 else items[:4] + [f"+{len(items) - 4} more"]
        labels[n] = f"{n}\n" + "\n".join(shown)
    for n, (x, y) in ((n, pos[n]) for n in labels):
        ax.annotate(labels[n], (x, y), xytext=(8, 8), textcoords="offset points", fontsize=8,
                    bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "#2a9d8f", "alpha": 0.9})
    if not big:
        nx.draw_networkx_labels(g, pos, labels={n: n for n in others}, ax=ax, font_size=7, font_color="#666666")
    c = ev.cost
    ax.set_title(f"{problem.app.name} — {plan.algorithm}: cost {_money(c.total)} "
                 f"(proc {_money(c.processing)}, trans {_money(c.transmission)}, stor {_money(c.storage)}, "
                 f"deploy {_money(c.deployment)}), mean delay {_ms(ev.mean_delay)} ms", fontsize=10, pad=14)
    ax.plot([], [], color="#264653", lw=2, label="function → function data")
    ax.plot([], [], color="#e76f51", lw=1.6, ls="--", label="state access")
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9, markerscale=0.4)
    ax.margins(0.15)
    ax.set_axis_off()
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format=path.suffix.lower().lstrip("."))
    except OSError as exc:
        raise StorageError(f"--picture: cannot write {path}: {exc}") from None
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
def _dns(name: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return (s or "fn")[:63].rstrip("-")


HOSTNAME_LABEL = "kubernetes.io/hostname"


def manifests(problem: Problem, plan: Placement, directory: str | Path, namespace: str = "default") -> list[Path]:
    """One file per function in ``directory``: a Deployment pinned to its node by required node affinity
    (or, when the function has no image, e.g. it came from an AppGroup naming an existing Deployment, a
    strategic-merge patch for ``kubectl patch deployment NAME --patch-file FILE``), and ``placement.yaml``,
    a ConfigMap holding the whole plan (states included) for operators and later tooling."""
    import yaml

    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"--manifests: cannot create {d}: {exc}") from None
    written = []
    app = problem.app
    part_of = _dns(app.name)
    taken: set[str] = set()
    for f in app.functions:
        node = plan.functions[f.name]
        name = base = _dns(f.name)
        i = 2
        while name in taken:  # two function names that sanitise alike ("a_b", "a.b") still get two files
            name = f"{base[:60]}-{i}"
            i += 1
        taken.add(name)
        affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}]}]}}}
        labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": part_of}
        if f.image:
            cpu_m = max(1, math.ceil(problem.cpu_demand(f, problem.network.node(node))))
            container = {"name": name, "image": f.image,
                         "resources": {"requests": {"cpu": f"{cpu_m}m", "memory": str(int(f.memory))}}}
            doc = {"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": name, "namespace": namespace, "labels": labels,
                                "annotations": {"placement.remora.dev/node": node,
                                                "placement.remora.dev/algorithm": plan.algorithm}},
                   "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                            "template": {"metadata": {"labels": labels},
                                         "spec": {"affinity": affinity, "containers": [container]}}}}
            out = d / f"{name}.deployment.yaml"
        else:
            doc = {"metadata": {"annotations": {"placement.remora.dev/node": node}},
                   "spec": {"template": {"spec": {"affinity": affinity}}}}
            out = d / f"{name}.patch.yaml"
        written.append(_write(out, yaml.safe_dump(doc, sort_keys=False)))
    plan_doc = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": f"{part_of}-placement", "namespace": namespace,
                             "labels": {"app.kubernetes.io/part-of": part_of}},
                "data": {"placement.json": json.dumps({"model_version": MODEL_VERSION, "algorithm": plan.algorithm,
                                                       "functions": plan.functions, "states": plan.states},
                                                      sort_keys=True)}}
    written.append(_write(d / "placement.yaml", yaml.safe_dump(plan_doc, sort_keys=False)))
    return written


def _write(path: Path, text: str) -> Path:
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        raise StorageError(f"--manifests: cannot write {path}: {exc}") from None
    return path
