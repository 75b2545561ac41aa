#!/usr/bin/env python3
"""P2P mesh vs straight-from-the-registry, with real processes in network namespaces (remora_testing.netlab).

N nodes (default 8), each a namespace with its own ``remora peer`` and containerd; a registry in its own
namespace; a scheduler in its own. Every link (registry uplink, node up and down) is a tbf at 100 Mbit/s.
All in ONE run, so the ratios compare like with like:

1. one node alone gets a fresh 200 MB blob through its peer (the baseline of the 1.3x target);
2. all N nodes get another fresh blob at once through their peers (the mesh);
3. all N nodes get a third blob at once straight from the registry (no mesh);
4. all N containerds pull a real image (busybox + real files) through their peers, then, on fresh
   containerds, straight from the registry;
5. heterogeneous node uplinks (fast, medium, slow): the same mesh pull with the scheduler's weighted
   scorer and with its UCB bandit scorer (a fresh lab each, a fresh blob each; node0, on a fast uplink,
   starts 1 s early so both runs have the same seed).

The machine's CPU is reported with the mesh case (peers' CPU seconds, % busy, load average): eight
peers, eight clients and the kernel's emulated links share its cores, and on a small machine they run out
of CPU before the links are full.

Registry egress is measured twice: application bytes (the registry's access log: body bytes of blob
GETs) and wire bytes (what the registry uplink's tbf sent: every frame with its TCP/IP/Ethernet headers,
~3% more, also when a TCP super-packet crossed the shaper whole).

The lab is built with ``offload=True`` (see remora_testing.netlab.shaping.tbf_burst): shapers pass TCP
super-packets whole and the bridge skips br_netfilter, as a NIC with TSO/GRO behind a switch would. Same
rates; without it tbf cuts every 64 KiB segment into 45 frames in software and, on 2 cores, the kernel's
per-frame work (21 core-seconds of softirq in a 30 s mesh run, against 5) starves the peers before the
links are full. ``--no-offload`` measures the old way; the one-node baseline always runs in the same lab
as the mesh.

Targets (issue 4): with the mesh, all N nodes done within 1.3x the time one node alone needs; registry
egress <= 1.05x the blob size.

The mesh is mutual TLS (issue 10: pieces and scheduler calls between cluster members only), as the
peers run in production; ``--plain-mesh`` runs it with ``--insecure-plain-mesh`` instead. ``--compare-tls
N`` measures only what the TLS target needs: N rounds, each a plain lab then a TLS lab (one node alone,
then all nodes), and reports the mesh/alone ratio of each with their spread (issue 10: TLS within 5% of
plain). Alternating the modes spreads the machine's other load over both. The scheduler's simulation
benchmark compares scorers on a model; this one runs the real processes.

    python benchmarks/bench_p2p_mesh.py                      # N=8, 100 Mbit/s, 200 MB (~10 min)
    python benchmarks/bench_p2p_mesh.py --nodes 4 --blob-mb 50 --skip-direct   # quick look
    python benchmarks/bench_p2p_mesh.py --skip-direct --skip-image --skip-scorers  # the targets only (~2 min)
    python benchmarks/bench_p2p_mesh.py --json results.json
    python benchmarks/bench_p2p_mesh.py --compare-tls 2      # TLS vs plain mesh ratio (~6 min)
    python benchmarks/bench_p2p_mesh.py --compare-tls 5 --json benchmarks/bench_p2p_mesh_tls8.json
    python benchmarks/bench_p2p_mesh.py --nodes 16 --rate 50mbit --blob-mib 100 --compare-tls 5 \
        --json benchmarks/bench_p2p_mesh_tls16.json                            # issue 15: twice the size
    python benchmarks/bench_p2p_mesh.py --compare-tls 1 --tls-only --profile /tmp/prof  # where CPU goes

``--compare-tls`` reports medians over the rounds (issue 15: medians of at least 5 alternating runs),
the last node finished / one node alone ratio (every node asks at once, so the mesh wall time is the
moment the last node has the whole blob), registry egress, and the CPU the peers spent per MiB a node
received. ``--profile DIR`` runs every peer under cProfile (its asyncio thread: parsing, TLS, the
scheduler client, bookkeeping) and samples per-thread CPU from /proc (the hashing and file threads
cProfile does not see); the top functions by own time are printed and ``peerN.prof`` kept for pstats.

Needs root (namespaces, tc); cleans up after itself, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

from remora_testing.netlab import Lab, cleanup_stale, content
from remora_testing.netlab.mesh import PY, REMORA, Mesh, MeshOptions, metric
from remora_testing.netlab.services import NsContainerd
from remora_testing.netlab.shaping import show

REPO = "bench/blob"
PREFIX = "rbm-"
BYTES = "remora_peer_download_bytes_total"
IMAGE_FILES = ["/usr/lib/python3.11", "/usr/lib/gcc"]


#: Runs ``remora`` under cProfile, the stats written to argv[1] when the daemon returns (SIGTERM ends the
#: peer's event loop normally, so the ``finally`` runs).
PROFILE_CODE = """import cProfile, sys
out, args = sys.argv[1], sys.argv[2:]
from remora.cli import main
prof = cProfile.Profile()
prof.enable()
try:
    rc = main(args)
finally:
    prof.disable()
    prof.dump_stats(out)
sys.exit(rc)
"""


#: Runs ``remora`` with ``remora.plugins.peer`` imported from argv[1] (a frozen copy of plugins/peer), then
#: like PROFILE_CODE when argv[2] names a profile file ("" = no profile), on uvloop's event loop when
#: argv[3] is "uvloop": the arms of ``--ab``.
ARM_CODE = """import asyncio, cProfile, importlib.util, sys
code, out, loop, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
if loop == "uvloop":
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
import remora.plugins
spec = importlib.util.spec_from_file_location("remora.plugins.peer", code + "/__init__.py",
                                              submodule_search_locations=[code])
mod = importlib.util.module_from_spec(spec)
sys.modules["remora.plugins.peer"] = mod
remora.plugins.peer = mod
spec.loader.exec_module(mod)
from remora.cli import main
prof = cProfile.Profile() if out else None
if prof:
    prof.enable()
try:
    rc = main(args)
finally:
    if prof:
        prof.disable()
        prof.dump_stats(out)
sys.exit(rc)
"""


class ProfiledMesh(Mesh):
    """A mesh whose peers run under cProfile (``profile_dir/peerN.prof``) and/or with the peer code of an
    A/B arm (``peer_code``: a directory holding a copy of plugins/peer)."""

    profile_dir: Path | None = None
    peer_code: Path | None = None
    loop = "asyncio"

    def peer_argv(self, p) -> list[str]:
        argv = super().peer_argv(p)
        prof = str(self.profile_dir / f"peer{p.index}.prof") if self.profile_dir else ""
        if self.peer_code is not None:
            return [PY, "-c", ARM_CODE, str(self.peer_code), prof, self.loop, *argv[len(REMORA):]]
        if prof:
            return [PY, "-c", PROFILE_CODE, prof, *argv[len(REMORA):]]
        return argv


def freeze_arms(args) -> dict[str, Path | None]:
    """``--ab BASE``: the two arms as frozen copies of plugins/peer (edits made in the tree while the
    benchmark runs change neither). Arm "A" is BASE; arm "B" is BASE with the files named by ``--ab-files``
    taken from this tree (all of plugins/peer when empty), so that a change is measured against the same
    code around it. Without ``--ab``: one arm, the tree as it is."""
    if not args.ab:
        return {"": None}
    root = Path(args.workdir) / "arms"
    shutil.rmtree(root, ignore_errors=True)
    tree = Path(__file__).resolve().parent.parent / "plugins" / "peer"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(args.ab, root / "A", ignore=ignore)
    if args.ab_files:
        shutil.copytree(args.ab, root / "B", ignore=ignore)
        for name in args.ab_files.split(","):
            shutil.copy2(tree / name.strip(), root / "B" / name.strip())
    else:
        shutil.copytree(tree, root / "B", ignore=ignore)
    arms = {"A": root / "A", "B": root / "B"}
    if args.ab_uvloop:
        arms["C"] = root / "B"   # B's code on uvloop's event loop
    return arms


def thread_cpu(mesh: Mesh) -> dict[str, float]:
    """CPU seconds (user + system) per thread over every peer, from /proc/PID/task/*/stat: the event loop
    (the main thread), Python's worker threads (to_thread: hashing, file I/O), gRPC's own threads."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for p in mesh.peers:
        if p.daemon is None:
            continue
        for task in Path(f"/proc/{p.daemon.pid}/task").glob("*"):
            try:
                text = (task / "stat").read_text()
            except OSError:
                continue
            name = text[text.index("(") + 1:text.rindex(")")]
            if name == "python":   # Python threads keep the process's name: the event loop vs the rest
                name = "event loop" if task.name == str(p.daemon.pid) else "worker threads"
            fields = text.rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


#: A client that starts a fetch when told: it prints "ready" once its interpreter is up, waits for a line
#: on stdin, then streams the URL (hashing it, as containerd does) and prints one JSON line with the wall
#: clock time it finished. Imports only the standard library.
SYNCED_FETCH = """import hashlib, json, sys, time, urllib.request
url = sys.argv[1]
print("ready", flush=True)
sys.stdin.readline()
h, n, status, error = hashlib.sha256(), 0, 0, ""
buf = bytearray(1 << 20)
view = memoryview(buf)
try:
    with urllib.request.urlopen(url, timeout=600) as resp:
        status = resp.status
        while (got := resp.readinto(buf)):
            h.update(view[:got])
            n += got
except Exception as exc:
    error = str(exc)[:500]
print(json.dumps({"status": status, "bytes": n, "sha256": "sha256:" + h.hexdigest(), "end": time.time(),
                  "error": error}), flush=True)
"""


def fetch_synced(mesh: Mesh, repo: str, digest: str, nodes=None) -> tuple[float, list[dict]]:
    """Every node asks for the blob at the same moment: each client's interpreter is started first (16
    Python start-ups on a loaded 2-core machine took up to 10 s, which ``Mesh.fetch_all`` counts as mesh
    time and which staggers the clients), then all are told to go at once. Returns the time from "go" to
    the last node finished and the results (``seconds``: from "go" to that node finished)."""
    import subprocess

    from remora_testing.netlab.namespaces import nsenter_argv

    nodes = list(mesh.peers if nodes is None else nodes)
    procs = [subprocess.Popen(nsenter_argv(p.node.ns) + [PY, "-c", SYNCED_FETCH, mesh.blob_url(p, repo, digest)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for p in nodes]
    for proc in procs:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("a fetch client did not start")
    go = time.time()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        r = json.loads(out.strip().splitlines()[-1])
        r["seconds"] = r["end"] - go
        results.append(r)
    return max(r["seconds"] for r in results), results


def median(values: list[float]) -> float:
    v = sorted(values)
    return (v[len(v) // 2] + v[(len(v) - 1) // 2]) / 2 if v else float("nan")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fill(mesh: Mesh, blobs, images=()) -> None:
    with mesh.registry.loopback() as loop:
        for path, digest in blobs:
            content.push_blob(loop.url, REPO, path=path, digest=digest)
        for image in images:
            content.push_image(loop.url, image)


def check(results: list[dict], digest: str, size: int, what: str) -> None:
    bad = [r for r in results if r.get("status") != 200 or r.get("sha256") != digest or r.get("bytes") != size]
    if bad:
        raise SystemExit(f"{what}: {len(bad)} node(s) did not get the right bytes: {bad[:2]}")


def wire_tx(mesh: Mesh) -> int:
    """Bytes the registry's uplink shaper has sent. Its counter adds the headers of every frame a TCP
    super-packet stands for, so it is the wire figure whether or not the lab keeps offloads (the
    interface's own tx counter sees a super-packet's headers once)."""
    stats = show(mesh.registry_node.ns, "eth0")
    m = re.search(r"Sent (\d+) bytes", stats)
    return int(m.group(1)) if m else mesh.registry_node.tx_bytes()


def egress(mesh: Mesh, digests: list[str], tx_before: int) -> tuple[int, int]:
    served = mesh.registry.blob_bytes_served()
    return sum(served.get(d, 0) for d in digests), wire_tx(mesh) - tx_before


def sources(mesh: Mesh) -> dict[str, float]:
    total = {"registry": 0.0, "peer": 0.0}
    for p in mesh.peers:
        m = mesh.metrics(p)
        for s in total:
            total[s] += metric(m, BYTES, source=s)
    return total


def cpu_seconds(mesh: Mesh) -> float:
    """CPU time (user + system) used so far by every peer daemon and the scheduler: the lab shares the
    machine's cores, so a mesh that is CPU bound shows here rather than on the links."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for d in [p.daemon for p in mesh.peers] + [mesh.scheduler]:
        try:
            fields = Path(f"/proc/{d.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, AssertionError, AttributeError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def cpu_split(mesh: Mesh) -> dict[str, float]:
    """CPU seconds so far: the peers' user and system time (system: the kernel's TCP, veth, bridge and
    shaper work of what they send, charged to them) and the scheduler's."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"peers_user": 0.0, "peers_sys": 0.0, "scheduler": 0.0}
    for d, who in [(p.daemon, "peers") for p in mesh.peers] + [(mesh.scheduler, "scheduler")]:
        try:
            fields = Path(f"/proc/{d.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, AssertionError, AttributeError):
            continue
        user, system = int(fields[11]) / tick, int(fields[12]) / tick
        if who == "peers":
            out["peers_user"] += user
            out["peers_sys"] += system
        else:
            out["scheduler"] += user + system
    return out


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat (iowait counts as idle)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def pull_all(mesh: Mesh, ref: str, ctrds: list[NsContainerd], hosts_dirs: list[Path]) -> float:
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            ctrds[i].pull(ref, hosts_dirs[i], timeout=900)
        except Exception as exc:  # noqa: BLE001 - every node's failure is reported together below
            errors.append(f"node{i}: {exc}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ctrds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        raise SystemExit("image pull failed:\n" + "\n".join(errors))
    return elapsed


def main_bench(args) -> dict:
    cache = Path(args.cache) / "netlab"
    size = args.blob_mb * 1_000_000
    blobs = {name: (cache / f"bench-{args.blob_mb}mb-{name}.bin") for name in ("alone", "mesh", "direct")}
    log(f"preparing {len(blobs)} blobs of {args.blob_mb} MB and a real image (cached in {cache})")
    digests = {name: content.random_blob(path, size, seed=1000 + i) for i, (name, path) in enumerate(blobs.items())}
    image = content.cached_image(cache, "bench/app", "v1", extra_paths=IMAGE_FILES)
    res: dict = {"nodes": args.nodes, "rate": args.rate, "offload": not args.no_offload, "blob_bytes": size,
                 "image_bytes": image.size, "peer_args": args.peer_arg, "scheduler_args": args.scheduler_arg}

    res["tls"] = not args.plain_mesh
    with Lab(prefix=PREFIX, workdir=Path(args.workdir) / "main", offload=not args.no_offload) as lab:
        mesh = Mesh(lab, MeshOptions(peers=args.nodes, node_rate=args.rate, registry_rate=args.rate,
                                     containerd=not args.skip_image, peer_args=args.peer_arg,
                                     scheduler_args=args.scheduler_arg,
                                     tls=not args.plain_mesh))
        fill(mesh, [(blobs[n], digests[n]) for n in blobs], [image])
        mesh.start()
        log(f"lab {lab.name} up: {lab.subnet}, {args.nodes} nodes")

        # 1. one node alone, through its peer (it seeds from the registry)
        tx0 = wire_tx(mesh)
        t, r = mesh.fetch_all(REPO, digests["alone"], nodes=mesh.peers[:1])
        check(r, digests["alone"], size, "alone")
        res["alone_s"] = t
        res["alone_egress_app"], res["alone_egress_wire"] = egress(mesh, [digests["alone"]], tx0)
        log(f"one node alone: {t:.1f}s")

        # 2. all nodes through the mesh
        before = sources(mesh)
        cpu0, load0, ticks0 = cpu_seconds(mesh), os.getloadavg()[0], machine_ticks()
        tx0 = wire_tx(mesh)
        res["mesh_epoch"] = [time.time()]
        t, r = mesh.fetch_all(REPO, digests["mesh"])
        res["mesh_epoch"].append(time.time())
        res["mesh_cpu_s"], res["mesh_load"] = cpu_seconds(mesh) - cpu0, (load0, os.getloadavg()[0])
        ticks1 = machine_ticks()
        res["mesh_machine_busy"] = (ticks1[0] - ticks0[0]) / max(1, ticks1[1] - ticks0[1])
        check(r, digests["mesh"], size, "mesh")
        after = sources(mesh)
        res["mesh_s"] = t
        res["mesh_node_s"] = sorted(x["seconds"] for x in r)
        res["mesh_egress_app"], res["mesh_egress_wire"] = egress(mesh, [digests["mesh"]], tx0)
        res["mesh_from_peers"] = after["peer"] - before["peer"]
        res["mesh_from_registry"] = after["registry"] - before["registry"]
        log(f"mesh, {args.nodes} nodes: {t:.1f}s")

        # 3. all nodes straight from the registry
        if not args.skip_direct:
            tx0 = wire_tx(mesh)
            t, r = mesh.fetch_all(REPO, digests["direct"], direct=True)
            check(r, digests["direct"], size, "direct")
            res["direct_s"] = t
            res["direct_egress_app"], res["direct_egress_wire"] = egress(mesh, [digests["direct"]], tx0)
            log(f"direct, {args.nodes} nodes: {t:.1f}s")

        # 4. a real image: containerd through the peers, then fresh containerds straight
        if not args.skip_image:
            ref = f"{mesh.registry.host}/{image.repo}:{image.tag}"
            layer_digests = [layer.digest for layer in image.layers]
            tx0 = wire_tx(mesh)
            res["image_mesh_s"] = pull_all(mesh, ref, [p.containerd for p in mesh.peers],
                                           [p.hosts_dir for p in mesh.peers])
            res["image_mesh_egress_app"], res["image_mesh_egress_wire"] = egress(mesh, layer_digests, tx0)
            log(f"image through the mesh: {res['image_mesh_s']:.1f}s")
            if not args.skip_direct:
                fresh = [NsContainerd(p.node, lab.workdir / f"containerd-direct{p.index}").start() for p in mesh.peers]
                nohosts = lab.workdir / "no-mirror"
                nohosts.mkdir(exist_ok=True)
                served_before = sum(mesh.registry.blob_bytes_served().get(d, 0) for d in layer_digests)
                tx0 = wire_tx(mesh)
                res["image_direct_s"] = pull_all(mesh, ref, fresh, [nohosts] * len(fresh))
                app, wire = egress(mesh, layer_digests, tx0)
                res["image_direct_egress_app"], res["image_direct_egress_wire"] = app - served_before, wire
                for c in fresh:
                    c.stop()
                log(f"image straight from the registry: {res['image_direct_s']:.1f}s")

    # 5. weighted vs bandit on heterogeneous uplinks
    if not args.skip_scorers:
        het_size = args.het_blob_mb * 1_000_000
        rates = heterogeneous_rates(args.nodes)
        res["het_rates"] = {i: r[0] for i, r in rates.items()}
        res["het_blob_bytes"] = het_size
        for n, scorer in enumerate(("weighted", "bandit")):
            path = cache / f"bench-het-{args.het_blob_mb}mb-{scorer}.bin"
            digest = content.random_blob(path, het_size, seed=2000 + n)
            with Lab(prefix=PREFIX, workdir=Path(args.workdir) / scorer, offload=not args.no_offload) as lab:
                mesh = Mesh(lab, MeshOptions(peers=args.nodes, registry_rate=args.rate, peer_rates=rates,
                                             scorer=scorer, containerd=False, peer_args=args.peer_arg,
                                             scheduler_args=args.scheduler_arg, tls=not args.plain_mesh))
                fill(mesh, [(path, digest)])
                mesh.start()
                tx0 = wire_tx(mesh)
                t, r = mesh.fetch_all(REPO, digest, lead=1.0)  # node0 (fast uplink) seeds in both runs
                check(r, digest, het_size, scorer)
                res[f"{scorer}_s"] = t
                res[f"{scorer}_node_s"] = sorted(x["seconds"] for x in r)
                res[f"{scorer}_egress_app"], _ = egress(mesh, [digest], tx0)
                log(f"{scorer} on heterogeneous links: {t:.1f}s")
    return res


def blob_size(args) -> tuple[int, str]:
    """(bytes, cache-name tag): ``--blob-mib`` (MiB, issue 15) overrides ``--blob-mb`` (MB)."""
    if args.blob_mib:
        return args.blob_mib << 20, f"{args.blob_mib}mib"
    return args.blob_mb * 1_000_000, f"{args.blob_mb}mb"


def compare_tls(args) -> dict:
    """Rounds of (plain lab, TLS lab), each: one node alone, then all nodes, through their peers."""
    cache = Path(args.cache) / "netlab"
    size, tag = blob_size(args)
    paths = {name: cache / f"bench-{tag}-{name}.bin" for name in ("alone", "mesh")}
    digests = {name: content.random_blob(path, size, seed=1000 + i) for i, (name, path) in enumerate(paths.items())}
    runs = []
    modes = (True,) if args.tls_only else (False, True)
    arms = freeze_arms(args)
    for n in range(args.compare_tls):
        # A/B arms alternate within a round, and which goes first alternates between rounds: the machine's
        # other load (and any drift over the run) falls on both arms alike.
        order = list(arms.items()) if n % 2 == 0 else list(reversed(arms.items()))
        for (arm, code), tls in [(a, t) for a in order for t in modes]:
            label = f"{arm + '-' if arm else ''}{'tls' if tls else 'plain'}"
            workdir = Path(args.workdir) / f"cmp{n}-{label}"
            shutil.rmtree(workdir, ignore_errors=True)
            with Lab(prefix=PREFIX, workdir=workdir, offload=not args.no_offload) as lab:
                opts = MeshOptions(peers=args.nodes, node_rate=args.rate, registry_rate=args.rate,
                                   containerd=False, peer_args=args.peer_arg,
                                   scheduler_args=args.scheduler_arg, tls=tls)
                mesh = ProfiledMesh(lab, opts)
                mesh.peer_code = code
                mesh.loop = "uvloop" if arm == "C" else "asyncio"
                if args.profile:
                    mesh.profile_dir = Path(args.profile) / f"round{n}-{label}"
                    mesh.profile_dir.mkdir(parents=True, exist_ok=True)
                fill(mesh, [(paths[k], digests[k]) for k in paths])
                mesh.start()
                load0, ticks0 = os.getloadavg()[0], machine_ticks()
                def fetch(digest, nodes=None, mesh=mesh):
                    return fetch_synced(mesh, REPO, digest, nodes) if args.synced else \
                        mesh.fetch_all(REPO, digest, nodes=nodes)

                alone, r = fetch(digests["alone"], nodes=mesh.peers[:1])
                check(r, digests["alone"], size, "alone")
                cpu0, threads0, split0 = cpu_seconds(mesh), thread_cpu(mesh), cpu_split(mesh)
                tx0 = wire_tx(mesh)
                t, r = fetch(digests["mesh"])
                check(r, digests["mesh"], size, "mesh")
                threads1 = thread_cpu(mesh)
                app, wire = egress(mesh, [digests["mesh"]], tx0)
                ticks1 = machine_ticks()
                cpu = cpu_seconds(mesh) - cpu0
                split = {k: round(v - split0[k], 2) for k, v in cpu_split(mesh).items()}
                run = {"cpu_split_s": split, "round": n, "arm": arm, "tls": tls, "synced": args.synced,
                       "alone_s": alone, "mesh_s": t,
                       "ratio": t / alone,
                       "node_s": sorted(x["seconds"] for x in r), "egress": app / size, "egress_wire": wire / size,
                       "cpu_s": cpu, "cpu_ms_per_mib": cpu * 1000 / (args.nodes * size / 2**20),
                       "threads_cpu_s": {k: round(v - threads0.get(k, 0.0), 2) for k, v in threads1.items()},
                       "busy": (ticks1[0] - ticks0[0]) / max(1, ticks1[1] - ticks0[1]),
                       "load": (load0, os.getloadavg()[0])}
                runs.append(run)
                log(f"round {n} {arm or ''} {'TLS  ' if tls else 'plain'}: alone {alone:.1f}s, mesh {t:.1f}s, ratio "
                    f"{run['ratio']:.3f}, egress {run['egress']:.3f}x, peers' CPU {run['cpu_s']:.1f}s "
                    f"({run['cpu_ms_per_mib']:.1f} ms/MiB), machine busy {run['busy'] * 100:.0f}%, "
                    f"load {load0:.1f}->{run['load'][1]:.1f}")
            if args.profile:
                run["profile_top"] = profile_top(mesh.profile_dir)
            # The peers' stores hold every blob of the round (N x 2 blobs): gone once the lab is, logs kept
            # (ten 8-node labs of 200 MB blobs are 32 GB otherwise).
            for p in mesh.peers:
                shutil.rmtree(p.data_dir, ignore_errors=True)
    res = {"nodes": args.nodes, "rate": args.rate, "blob_bytes": size, "runs": runs, "cpus": os.cpu_count(),
           "arms": {k: str(v) for k, v in arms.items() if v}}
    res["summary"] = summarize_tls(runs)
    return res


def profile_top(directory: Path, n: int = 25) -> list[tuple[str, float, float, int]]:
    """The functions with the most own time over every peer's profile: (where, tottime, cumtime, calls)."""
    import pstats

    files = sorted(str(f) for f in directory.glob("peer*.prof"))
    if not files:
        return []
    stats = pstats.Stats(*files)
    rows = []
    for (path, line, fn), (_, calls, tot, cum, _) in stats.stats.items():
        where = f"{'/'.join(Path(path).parts[-2:])}:{line}({fn})"
        rows.append((where, round(tot, 3), round(cum, 3), calls))
    rows.sort(key=lambda r: -r[1])
    return rows[:n]


def summarize_tls(runs: list[dict]) -> dict:
    """Medians per mode (``plain``, ``tls``), and per arm with ``--ab`` (``A-tls``, ``B-tls``, ...)."""
    out = {}
    for arm in sorted({r.get("arm", "") for r in runs}):
        for mode in (False, True):
            rs = [r for r in runs if r["tls"] == mode and r.get("arm", "") == arm]
            if rs:
                out[f"{arm + '-' if arm else ''}{'tls' if mode else 'plain'}"] = {
                    "runs": len(rs), "ratio_median": median([r["ratio"] for r in rs]),
                    "ratio_min": min(r["ratio"] for r in rs), "ratio_max": max(r["ratio"] for r in rs),
                    "alone_s_median": median([r["alone_s"] for r in rs]),
                    "mesh_s_median": median([r["mesh_s"] for r in rs]),
                    "last_node_s_median": median([r["node_s"][-1] for r in rs]),
                    "egress_median": median([r["egress"] for r in rs]), "egress_max": max(r["egress"] for r in rs),
                    "cpu_ms_per_mib_median": median([r["cpu_ms_per_mib"] for r in rs]),
                    "cpu_ms_per_mib_min": min(r["cpu_ms_per_mib"] for r in rs),
                    "cpu_ms_per_mib_max": max(r["cpu_ms_per_mib"] for r in rs)}
    if "plain" in out and "tls" in out:
        out["tls_vs_plain_ratio_change"] = out["tls"]["ratio_median"] / out["plain"]["ratio_median"] - 1
    return out


def report_tls(res: dict) -> str:
    lines = [f"TLS vs plain mesh: {res['nodes']} nodes, {res['rate']} links, blob {res['blob_bytes'] / 2**20:.0f} MiB, "
             f"{res.get('cpus', '?')} CPUs"]
    if res.get("arms"):
        lines.append(f"A/B arms (peer code): {res['arms']}")
    lines.append("round  arm  mode   alone s  mesh s  last/alone  egress  peers CPU s  ms/MiB  busy  load")
    for r in res["runs"]:
        lines.append(f"{r['round']:5d}  {r.get('arm', '') or '-':3s}  {'tls  ' if r['tls'] else 'plain'}  "
                     f"{r['alone_s']:7.1f}  {r['mesh_s']:6.1f}  "
                     f"{r['ratio']:10.3f}  {r['egress']:6.3f}  {r['cpu_s']:11.1f}  {r['cpu_ms_per_mib']:6.1f}  "
                     f"{r['busy'] * 100:3.0f}%  {r['load'][0]:.1f}->{r['load'][1]:.1f}")
    summary = res.get("summary") or summarize_tls(res["runs"])
    groups = [k for k in summary if isinstance(summary[k], dict)]
    for mode in groups:
        m = summary[mode]
        lines.append(f"median {mode:5s} ({m['runs']} runs): last node / one node alone {m['ratio_median']:.3f} "
                     f"(min {m['ratio_min']:.3f}, max {m['ratio_max']:.3f}), alone {m['alone_s_median']:.1f}s, "
                     f"all {m['mesh_s_median']:.1f}s, registry egress {m['egress_median']:.3f}x "
                     f"(max {m['egress_max']:.3f}x), peers' CPU {m['cpu_ms_per_mib_median']:.1f} ms/MiB received "
                     f"({m['cpu_ms_per_mib_min']:.1f}-{m['cpu_ms_per_mib_max']:.1f})")
    if "tls_vs_plain_ratio_change" in summary:
        change = summary["tls_vs_plain_ratio_change"]
        lines.append(f"TARGET TLS within 5% of plain (medians): {change * 100:+.1f}% -> "
                     f"{'MET' if abs(change) <= 0.05 else 'NOT MET'}")
    for mode in groups:
        m = summary[mode]
        lines.append(f"TARGET registry egress <= 1.05x blob ({mode}): max {m['egress_max']:.3f}x -> "
                     f"{'MET' if m['egress_max'] <= 1.05 else 'NOT MET'}")
        if mode.endswith("tls"):
            lines.append(f"TARGET last node <= 1.3x one node alone ({mode}, median): {m['ratio_median']:.3f}x -> "
                         f"{'MET' if m['ratio_median'] <= 1.3 else 'NOT MET'}")
    for r in res["runs"]:
        if r.get("profile_top"):
            lines.append(f"profile, round {r['round']} {r.get('arm', '')} {'tls' if r['tls'] else 'plain'}: "
                         f"per-thread CPU s {r['threads_cpu_s']}")
            lines.append("  own s    cum s     calls  function")
            for where, tot, cum, calls in r["profile_top"]:
                lines.append(f"  {tot:6.2f}  {cum:7.2f}  {calls:8d}  {where}")
    return "\n".join(lines)


def heterogeneous_rates(n: int) -> dict[int, tuple[str, str]]:
    """Uplinks cycle fast/medium/slow (100/30/5 Mbit/s); every downlink 100 Mbit/s."""
    cycle = ("100mbit", "30mbit", "5mbit")
    return {i: (cycle[i % 3], "100mbit") for i in range(n)}


def report(res: dict) -> str:
    size, n = res["blob_bytes"], res["nodes"]
    rows = [("case", "time s", "vs alone", "registry app bytes", "x blob", "registry wire bytes", "x blob")]

    def row(name, secs, app, wire, unit):
        rows.append((name, f"{secs:.1f}", f"{secs / res['alone_s']:.2f}", f"{app:,}", f"{app / unit:.3f}",
                     f"{wire:,}", f"{wire / unit:.3f}"))

    row("1 node alone (peer)", res["alone_s"], res["alone_egress_app"], res["alone_egress_wire"], size)
    row(f"{n} nodes, mesh", res["mesh_s"], res["mesh_egress_app"], res["mesh_egress_wire"], size)
    if "direct_s" in res:
        row(f"{n} nodes, direct", res["direct_s"], res["direct_egress_app"], res["direct_egress_wire"], size)
    img = res["image_bytes"]
    if "image_mesh_s" in res:
        row(f"image {img / 1e6:.0f} MB, {n} nodes, mesh", res["image_mesh_s"], res["image_mesh_egress_app"],
            res["image_mesh_egress_wire"], img)
    if "image_direct_s" in res:
        row(f"image {img / 1e6:.0f} MB, {n} nodes, direct", res["image_direct_s"], res["image_direct_egress_app"],
            res["image_direct_egress_wire"], img)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append("")
    lines.append(f"mesh security: {'mutual TLS' if res.get('tls', True) else 'PLAIN (--insecure-plain-mesh)'}")
    lines.append(f"blob {size / 1e6:.0f} MB, links {res['rate']} (registry uplink and every node link), tbf; "
                 f"extra peer flags {res['peer_args'] or 'none'}, scheduler flags {res['scheduler_args'] or 'none'}")
    lines.append(f"mesh: from peers {res['mesh_from_peers'] / size:.2f}x blob, from registry "
                 f"{res['mesh_from_registry'] / size:.2f}x blob; per-node times "
                 f"{[f'{s:.1f}' for s in res['mesh_node_s']]}")
    lines.append(f"mesh: CPU of the peers + scheduler {res['mesh_cpu_s']:.1f}s; machine busy "
                 f"{res['mesh_machine_busy'] * 100:.0f}% of {os.cpu_count()} cores; load average before/after "
                 f"{res['mesh_load'][0]:.1f}/{res['mesh_load'][1]:.1f}")
    ok_time = res["mesh_s"] <= 1.3 * res["alone_s"]
    ok_egress = res["mesh_egress_app"] <= 1.05 * size
    lines.append(f"TARGET all nodes within 1.3x one node alone: {res['mesh_s'] / res['alone_s']:.2f}x -> "
                 f"{'MET' if ok_time else 'NOT MET'}")
    lines.append(f"TARGET registry egress <= 1.05x blob: {res['mesh_egress_app'] / size:.3f}x (app), "
                 f"{res['mesh_egress_wire'] / size:.3f}x (wire) -> {'MET' if ok_egress else 'NOT MET'}")
    if "direct_s" in res:
        lines.append(f"mesh vs direct: time {res['mesh_s'] / res['direct_s']:.2f}x, registry egress "
                     f"{res['mesh_egress_app'] / max(res['direct_egress_app'], 1):.2f}x")
    if "weighted_s" in res:
        lines.append("")
        lines.append(f"heterogeneous uplinks {sorted(set(res['het_rates'].values()))}, blob "
                     f"{res['het_blob_bytes'] / 1e6:.0f} MB:")
        for scorer in ("weighted", "bandit"):
            lines.append(f"  {scorer:8s} all done {res[scorer + '_s']:.1f}s, median node "
                         f"{res[scorer + '_node_s'][len(res[scorer + '_node_s']) // 2]:.1f}s, registry "
                         f"{res[scorer + '_egress_app'] / res['het_blob_bytes']:.2f}x blob")
        lines.append(f"  bandit / weighted time: {res['bandit_s'] / res['weighted_s']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python benchmarks/bench_p2p_mesh.py\n"
                                       "  python benchmarks/bench_p2p_mesh.py --nodes 4 --blob-mb 50 --skip-direct\n"
                                       "  python benchmarks/bench_p2p_mesh.py --skip-direct --skip-image --skip-scorers"
                                       "   # the targets only")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--rate", default="100mbit", help="registry uplink and every node link (tbf)")
    p.add_argument("--blob-mb", type=int, default=200)
    p.add_argument("--blob-mib", type=int, default=0, help="blob size in MiB (overrides --blob-mb; --compare-tls)")
    p.add_argument("--tls-only", action="store_true", help="--compare-tls: only the TLS labs (e.g. to profile)")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="--compare-tls: run the peers under cProfile, keep peerN.prof in DIR, print the hot spots")
    p.add_argument("--het-blob-mb", type=int, default=100, help="blob of the weighted-vs-bandit runs")
    p.add_argument("--skip-direct", action="store_true", help="skip the straight-from-registry runs (slow: N x)")
    p.add_argument("--skip-scorers", action="store_true", help="skip weighted vs bandit")
    p.add_argument("--skip-image", action="store_true", help="skip the containerd pulls of a real image")
    p.add_argument("--cache", default="/var/cache/remora-test", help="where test blobs/layers are kept")
    p.add_argument("--workdir", default="/tmp/remora-bench-p2p",
                   help="lab state and logs (emptied at start: peers must not start with the blobs)")
    p.add_argument("--peer-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for every remora peer (repeat; e.g. --peer-arg=--upload-slots=64)")
    p.add_argument("--scheduler-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for the remora scheduler (repeat)")
    p.add_argument("--no-offload", action="store_true",
                   help="shape links frame by frame (tbf cuts TCP super-packets into MTU frames, bridged frames "
                        "go through br_netfilter): more kernel CPU per byte, same rates")
    p.add_argument("--plain-mesh", action="store_true",
                   help="run the mesh without TLS (--insecure-plain-mesh); default: mutual TLS, as in production")
    p.add_argument("--compare-tls", type=int, default=0, metavar="ROUNDS",
                   help="only compare the plain and the TLS mesh: ROUNDS x (plain lab, TLS lab), alone + mesh each")
    p.add_argument("--ab", default="", metavar="BASE_DIR",
                   help="--compare-tls: A/B rounds, arm A = the peer code in BASE_DIR (a copy of plugins/peer), "
                        "arm B = this tree's; the arms alternate within each round, first arm alternating")
    p.add_argument("--ab-files", default="", metavar="F1,F2",
                   help="--ab: arm B is BASE_DIR with only these files of plugins/peer from this tree")
    p.add_argument("--synced", action="store_true",
                   help="--compare-tls: start every client's interpreter first, then tell all to fetch at once; "
                        "times run from that moment (default: Mesh.fetch_all, client start-ups included)")
    p.add_argument("--ab-uvloop", action="store_true",
                   help="--ab: a third arm C, arm B's code on uvloop's event loop")
    p.add_argument("--json", help="also write the raw figures here")
    args = p.parse_args(argv)
    cleanup_stale(PREFIX)  # a previous run killed with -9
    if args.compare_tls:
        res = compare_tls(args)
        print(report_tls(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0
    # Peers keep their pieces across runs: a leftover data dir would serve the "fresh" blobs from disk.
    for sub in ("main", "weighted", "bandit"):
        shutil.rmtree(Path(args.workdir) / sub, ignore_errors=True)
    res = main_bench(args)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
