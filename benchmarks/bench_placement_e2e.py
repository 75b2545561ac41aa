#!/usr/bin/env python3
"""End to end in network namespaces: a stateful 3-function app placed by ``remora place plan --preheat`` on
the live cluster vs a random placement deployed cold (issue 12).

Lab (remora_testing.netlab, one fresh lab per run; blackholed subnet, every client inside a namespace):
a registry (uplink tbf), a ``remora scheduler`` (mutual TLS), N edge nodes (default 6) each with its own
``remora peer`` (preheat API on), a ``remora snapshotter`` whose lazy reads go through that peer
(``--mirror``), a private containerd with the snapshotter as its ``remora`` proxy plugin, tbf rates that
differ per node, and a node *agent* (this file, ``--agent``) that runs the application: functions, state
objects, and user-space delay proxies (remora_testing.netlab.delay) for every outgoing node pair, so a
byte from node i to node j waits ``δ_i + δ_j`` (the kernel has no netem) and crosses both nodes' tbf
(bottleneck ``min(rate_i, rate_j)``).

The application: f1 → f2 → f3 (5 ms of CPU each, 1 GiB of memory each), each its own image: busybox plus
``/app/hot.bin`` (HOT_FRACTION of the app data, what the function reads at start) and ``/app/cold.bin``
(never read), f2's of ``--image-mb``, f1's 2/3 and f3's 4/3 of it; converted once by ``remora convert
--prefetch-list`` (busybox and hot.bin: the image's hot blob). States s1 (f1 reads/writes, f3 reads) and
s2 (f2 reads); requests enter at node0. Each request runs exactly the model of docs/placement.md §2.4:
the request travels one way to f1, each state access is a synchronous round trip, f1 hands on to f2 to
f3 one way, f3 sends the answer to the user's node; the agent of the user's node timestamps its arrival
(one clock: all namespaces share the kernel).

Per run, both arms in the same lab (order alternates between runs; each arm has its own images, so
neither warms the other):

* **planned**: ``remora place plan spec.json --from-scheduler SCHED --preheat --pull --peer-port P`` run in
  the scheduler's namespace with a manager certificate — the hosts come from the scheduler (the spec gives
  capacities, prices and the emulated links, which TCP-connect probes cannot see: the lab's delays are in
  user space), then each chosen node's peer preheats its images (a remora image: bootstrap and hot blob
  first, then the rest) and, with ``--pull`` (remora images; each peer runs with ``--runtime-pull-api``
  naming its node's snapshotter), has its node's snapshotter pull them into containerd; ``--no-pull``
  measures the preheat of blobs alone;
* **random**: ``--algorithm random --seed RUN``, no preheat.

Then *deploy*: on every node, each function's image is pulled with ``remora pull`` (the snapshotter's pull
service: manifest, config, bootstrap; a lazy mount) unless containerd already has it (what a kubelet with
``imagePullPolicy: IfNotPresent`` does; both arms ask, with ``ctr images ls``), and its container started
with ``ctr run --snapshotter remora``; the container's start reads /app/hot.bin and checks its SHA-256, then the agent
activates the function. The time from deploy to the first answered request is measured, then
``--requests`` more requests give the measured delay, set against the delay the model predicts for the
plan. Registry blob bytes are counted per phase and per blob role (config, bootstrap, hot blob, blob)
from the registry's access log. ``--image-format oci`` runs the same with the plain OCI images,
``ctr images pull`` through the peer mirror and containerd's overlayfs snapshotter.

Target (issue 12): the planned, preheated deployment answers its first request ≥ 3× sooner than the
random, cold one (medians over runs, same-run ratio).

    python benchmarks/bench_placement_e2e.py --runs 5       # 6 nodes (~2 min a run)
    python benchmarks/bench_placement_e2e.py --smoke         # 4 nodes, 1 run, small images (~1.5 min)
    python benchmarks/bench_placement_e2e.py --image-format oci --json-out x.json

Needs root (namespaces, tc, containerd, FUSE). Cleans up on any exit (lazy mounts detached first).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
AGENT_PORT = 7000
PROXY_BASE = 7100
TASK_FORWARD_PORT = 65004          # node_ip:65004 -> 127.0.0.1:65001 (the peer's mirror + task API)
PREFIX = "rpe-"
DELAYS_MS = [1, 4, 8, 15, 25, 40, 60, 80]
RATES_MBIT = [50, 100, 20, 60, 30, 80, 40, 70]
TOKEN = "placement-e2e-preheat-token-0123456789"
FUNCTIONS = ("f1", "f2", "f3")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =================================================================================== the node agent
def agent_main(cfg_path: str) -> int:
    """One per node: the app's functions and states on this node, the delay proxies, the user sink."""
    import asyncio
    import http.client
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlparse

    from remora_testing.netlab.delay import DelayProxy

    cfg = json.loads(Path(cfg_path).read_text())
    me, ip = cfg["index"], cfg["ip"]
    loop = asyncio.new_event_loop()

    async def proxies():
        out = []
        for j, peer in cfg["proxies"].items():
            out.append(await DelayProxy(("127.0.0.1", PROXY_BASE + int(j)), (peer["ip"], AGENT_PORT),
                                        up_delay=peer["delay"], down_delay=peer["delay"]).start())
        out.append(await DelayProxy((ip, TASK_FORWARD_PORT), ("127.0.0.1", cfg["mirror_port"])).start())
        return out

    started = threading.Event()

    def run_loop():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(proxies())
        started.set()
        loop.run_forever()

    threading.Thread(target=run_loop, daemon=True).start()
    started.wait(30)

    app: dict = {}                 # the arm's plan: functions, placement, states
    active: set[str] = set()
    arrivals: dict = {}
    sink: dict[str, float] = {}
    cond = threading.Condition()

    def route(node: int) -> tuple[str, int]:
        return (ip, AGENT_PORT) if node == me else ("127.0.0.1", PROXY_BASE + node)

    def post(node: int, path: str, body: bytes) -> bytes:
        """POST to a node's agent; a function not deployed yet (503) is retried until it is, as a
        platform queues a request for a function that is still starting."""
        host, port = route(node)
        deadline = time.monotonic() + 600
        while True:
            c = http.client.HTTPConnection(host, port, timeout=60)
            try:
                c.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
                r = c.getresponse()
                data = r.read()
            finally:
                c.close()
            if r.status == 503 and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            if r.status >= 300:
                raise RuntimeError(f"POST {path} -> {r.status}")
            return data

    def deliver(f: str, rid: str, user: int) -> None:
        with cond:
            k = (rid, f)
            arrivals[k] = arrivals.get(k, 0) + 1
            if arrivals[k] < app["functions"][f]["preds"]:
                return
            del arrivals[k]
        threading.Thread(target=execute, args=(f, rid, user), daemon=True).start()

    def execute(f: str, rid: str, user: int) -> None:
        spec = app["functions"][f]
        for s, (read, write) in spec["access"].items():
            where = app["states"][s]
            if where != me:
                got = post(where, f"/state/{s}?read={int(read)}", b"w" * int(write))
                assert len(got) == int(read)
        end = time.perf_counter() + spec["cpu"]
        while time.perf_counter() < end:
            pass
        for g, nbytes in spec["calls"].items():
            node = app["placement"][g]
            if node == me:
                deliver(g, rid, user)
            else:
                threading.Thread(target=post, args=(node, f"/invoke/{g}?rid={rid}&user={user}", b"d" * int(nbytes)),
                                 daemon=True).start()
        if not spec["calls"]:
            if user == me:
                arrive(rid)
            else:
                post(user, f"/sink?rid={rid}", b"r" * int(app["response_bytes"]))

    def arrive(rid: str) -> None:
        with cond:
            sink[rid] = time.time()
            cond.notify_all()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _reply(self, code: int, body: bytes = b"") -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            u = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(u.query).items()}
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if u.path == "/activate":
                doc = json.loads(body)
                app.clear()
                app.update(doc["app"])
                active.clear()
                active.update(doc["functions"])
                return self._reply(200, b"{}")
            if u.path.startswith("/invoke/"):
                f = u.path.rsplit("/", 1)[1]
                if f not in active:
                    return self._reply(503, b"not deployed")
                self._reply(202)
                deliver(f, q["rid"], int(q["user"]))
                return None
            if u.path.startswith("/state/"):
                return self._reply(200, b"s" * int(q["read"]))
            if u.path == "/sink":
                self._reply(202)
                arrive(q["rid"])
                return None
            return self._reply(404)

        def do_GET(self):
            u = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(u.query).items()}
            if u.path == "/wait":
                deadline = time.time() + float(q.get("timeout", 60))
                with cond:
                    while q["rid"] not in sink and time.time() < deadline:
                        cond.wait(deadline - time.time())
                    t = sink.get(q["rid"])
                return self._reply(200 if t else 504, json.dumps({"t": t}).encode())
            if u.path == "/healthz":
                return self._reply(200, b"ok")
            return self._reply(404)

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer((ip, AGENT_PORT), Handler).serve_forever()
    return 0


#: Run in the user's namespace: send requests one after the other, print their delays (JSON).
CLIENT = r"""
import http.client, json, sys, time, uuid
ip, entries = sys.argv[1], json.loads(sys.argv[3])
me, n, nbytes, agent, base = (int(a) for a in (sys.argv[2], *sys.argv[4:8]))
def post(host, port, path, body):
    deadline = time.monotonic() + 600
    while True:   # 503: the entry function is not deployed yet; the user retries
        c = http.client.HTTPConnection(host, port, timeout=60)
        c.request("POST", path, body=body)
        r = c.getresponse()
        r.read()
        c.close()
        if r.status == 503 and time.monotonic() < deadline:
            time.sleep(0.02); continue
        if r.status >= 300: raise SystemExit(f"POST {path}: {r.status}")
        return
out = []
for _ in range(n):
    rid = uuid.uuid4().hex
    t0 = time.time()
    for f, node in entries.items():
        host, port = (ip, agent) if node == me else ("127.0.0.1", base + node)
        post(host, port, f"/invoke/{f}?rid={rid}&user={me}", b"q" * nbytes)
    c = http.client.HTTPConnection(ip, agent, timeout=120)
    c.request("GET", f"/wait?rid={rid}&timeout=100")
    t = json.loads(c.getresponse().read())["t"]
    c.close()
    if t is None: raise SystemExit("no answer")
    out.append({"sent": t0, "answered": t, "delay": t - t0})
print(json.dumps(out))
"""

ACTIVATE = r"""
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=30)
c.request("POST", "/activate", body=sys.argv[3].encode()); r = c.getresponse(); r.read()
sys.exit(0 if r.status == 200 else 1)
"""


# =================================================================================== the harness
HOT_FRACTION = 0.25      # of each image's app data: the file its start reads (the prefetch list)


def build_images(cache: Path, sizes_mb: dict[str, float]) -> dict:
    """Per arm, one OCI image per function, built once into ``cache``: a busybox layer (the container's
    shell and ``sha256sum``) and an app layer of incompressible data, ``/app/hot.bin`` (read at start,
    HOT_FRACTION of it) and ``/app/cold.bin`` (never read by this app)."""
    import tarfile

    from remora_testing.netlab import content

    def app_layer(path: Path, src: Path):
        meta = path.with_suffix(".json")
        if path.exists() and meta.exists():   # built by an earlier run: reused once its digest checks out
            info = json.loads(meta.read_text())
            if content.sha256_file(path) == info["digest"]:
                return content.Layer(path=path, **info)

        def add(tar: tarfile.TarFile) -> None:
            tar.addfile(content._dir_info("app"))
            for f in sorted(src.iterdir()):
                ti = tar.gettarinfo(str(f), f"app/{f.name}")
                ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
                with open(f, "rb") as fh:
                    tar.addfile(ti, fh)
        layer = content._tar_gz(path, add)
        meta.write_text(json.dumps({"digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size}))
        return layer

    cache.mkdir(parents=True, exist_ok=True)   # a fresh machine has no cache yet
    busybox = content.busybox_layer(cache / "busybox.tar.gz")
    images = {}
    for arm_i, arm in enumerate(("planned", "random")):
        for f_i, f in enumerate(FUNCTIONS):
            size = int(sizes_mb[f] * (1 << 20))
            hot = int(size * HOT_FRACTION)
            d = cache / f"{arm}-{f}-{size}-app"
            hot_digest = content.random_blob(d / "hot.bin", hot, seed=1000 + 10 * arm_i + f_i)
            content.random_blob(d / "cold.bin", size - hot, seed=2000 + 10 * arm_i + f_i)
            layer = app_layer(cache / f"{arm}-{f}-{size}-app.tar.gz", d)
            im = content.build_image(f"placebench/{arm}-{f}", "v1", [busybox, layer])
            images[(arm, f)] = {"oci": im, "hot_sha256": hot_digest.removeprefix("sha256:")}
    return images


REF_NAME = "org.opencontainers.image.ref.name"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def convert_images(cache: Path, images: dict) -> None:
    """``remora convert`` every OCI image into a remora image (OCI layouts in ``cache``, converted once per
    content: a conversion takes ~40 s of the 2 shared cores), with ``/bin/busybox`` and ``/app/hot.bin``
    as its prefetch list — what a ``remora trace`` of the container's start records — so that the
    bootstrap names a hot blob. Sets ``images[key]["remora"]`` = {"layout", "manifest", "roles"}."""
    import hashlib
    import subprocess

    from remora.format import annotations as ann

    hot_list = cache / "hot.txt"
    hot_list.write_text("/bin/busybox\n/app/hot.bin\n")
    key_of_list = hashlib.sha256(hot_list.read_bytes()).hexdigest()[:8]
    for entry in images.values():
        im = entry["oci"]
        dst = cache / f"remora-{im.manifest_digest[7:23]}-{key_of_list}"
        if not (dst / "index.json").exists():
            src = cache / f"oci-{im.manifest_digest[7:23]}"
            _write_layout(src, im)
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            proc = subprocess.run([*remora_cli(), "convert", "--no-progress", "--json", "--prefetch-list",
                                   str(hot_list), f"oci:{src}:{im.tag}", f"oci:{tmp}:{im.tag}-remora"],
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"remora convert {im.repo}: {proc.stderr[-2000:]}")
            shutil.rmtree(src, ignore_errors=True)
            tmp.rename(dst)
        raw = _layout_manifest(dst, f"{im.tag}-remora")
        manifest = json.loads(raw)
        roles = {manifest["config"]["digest"]: "config"}
        for layer in manifest["layers"]:
            a = layer.get("annotations", {})
            roles[layer["digest"]] = ("bootstrap" if a.get(ann.ROLE) == "bootstrap" else
                                      "hot blob" if int(a.get(ann.PREFETCH_BYTES, "0") or 0) else "blob")
        if "hot blob" not in roles.values():
            raise RuntimeError(f"{dst}: no hot blob after converting with a prefetch list")
        entry["remora"] = {"layout": dst, "manifest": manifest, "raw_manifest": raw, "roles": roles}


def _write_layout(d: Path, im) -> None:
    """An OCI image layout of one image (``remora convert`` reads ``oci:DIR:TAG``)."""
    import hashlib

    shutil.rmtree(d, ignore_errors=True)
    blobs = d / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for layer in im.layers:
        shutil.copyfile(layer.path, blobs / layer.digest[7:])
    (blobs / hashlib.sha256(im.config).hexdigest()).write_bytes(im.config)
    (blobs / im.manifest_digest[7:]).write_bytes(im.manifest)
    (d / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (d / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": im.manifest_digest, "size": len(im.manifest),
         "annotations": {REF_NAME: im.tag}}]}))


def _layout_manifest(d: Path, tag: str) -> bytes:
    index = json.loads((d / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag)
    return (d / "blobs" / "sha256" / desc["digest"][7:]).read_bytes()


def push_remora_image(base_url: str, im, conv: dict) -> None:
    """Push a converted image from its layout to ``<repo>:<tag>-remora`` (the registry checks every digest)."""
    import requests

    from remora_testing.netlab import content

    blobs = conv["layout"] / "blobs" / "sha256"
    m = conv["manifest"]
    for desc in [m["config"], *m["layers"]]:
        got = content.push_blob(base_url, im.repo, path=blobs / desc["digest"][7:])
        if got != desc["digest"]:
            raise RuntimeError(f"cached blob {desc['digest']} has digest {got}")
    r = requests.put(f"{base_url}/v2/{im.repo}/manifests/{im.tag}-remora", data=conv["raw_manifest"],
                     headers={"Content-Type": m.get("mediaType", OCI_MANIFEST)}, timeout=60)
    if r.status_code != 201:
        raise RuntimeError(f"manifest push {im.repo}:{im.tag}-remora: HTTP {r.status_code} {r.text[:200]}")


def remora_cli() -> list[str]:
    script = Path(sys.executable).parent / "remora"
    return [str(script)] if script.exists() else [sys.executable, "-m", "remora.cli"]


def issue_planner_certificate(mesh) -> None:
    """A manager certificate of the lab's cluster CA for the planner (it reads the scheduler's topology)."""
    from remora.pki.ca import load_ca, write_member

    ca = load_ca(mesh.work / "pki" / "ca")
    mesh.tls_dirs["planner"] = write_member(mesh.work / "pki" / "planner",
                                            ca.issue("manager", "planner", ips=[mesh.sched_node.ip]),
                                            ca.bundle_pem)["ca"].parent


def spec_for(mesh, arm: str, images, n: int, rates: list[int], delays: list[float]) -> dict:
    """The planner's input: the application, users at node0, per-host capacities and prices, and the
    emulated links (δ_i + δ_j one way, min of the two tbf rates)."""
    hosts = [mesh.host_id(p) for p in mesh.peers]
    img_entries, fn_image = [], {}
    for f in FUNCTIONS:
        ref = image_ref(mesh, images, arm, f)
        fn_image[f] = ref
        remora_image = images[(arm, f)].get("remora")
        if remora_image:
            m = remora_image["manifest"]
            layers = [{"digest": x["digest"], "size": x["size"]} for x in [*m["layers"], m["config"]]]
        else:
            import hashlib
            im = images[(arm, f)]["oci"]
            layers = [{"digest": layer.digest, "size": layer.size} for layer in im.layers]
            layers.append({"digest": "sha256:" + hashlib.sha256(im.config).hexdigest(), "size": len(im.config)})
        img_entries.append({"name": ref, "layers": layers})
    nodes = [{"name": h, "cpu": "1", "memory": "2Gi", "deploy_cost": 1, "cpu_cost": 0.0001, "storage_cost": 0.01}
             for h in hosts]
    links = []
    for i in range(n):
        for j in range(i + 1, n):
            links.append({"a": hosts[i], "b": hosts[j], "bandwidth": f"{min(rates[i], rates[j])}Mbps",
                          "delay": f"{(delays[i] + delays[j]) * 1000:g}ms"})
    return {
        "version": 1,
        "network": {"nodes": nodes, "links": links},
        "users": {hosts[0]: 10},
        "application": {
            "name": f"e2e-{arm}", "request_bytes": "20Ki", "response_bytes": "20Ki", "delay_weight": 100,
            "images": img_entries,
            "functions": [
                {"name": "f1", "cpu": "5ms", "memory": "1Gi", "image": fn_image["f1"], "calls": {"f2": "100Ki"}},
                {"name": "f2", "cpu": "5ms", "memory": "1Gi", "image": fn_image["f2"], "calls": {"f3": "100Ki"}},
                {"name": "f3", "cpu": "5ms", "memory": "1Gi", "image": fn_image["f3"]},
            ],
            "states": [
                {"name": "s1", "size": "10Mi",
                 "access": {"f1": {"read": "50Ki", "write": "10Ki"}, "f3": {"read": "20Ki"}}},
                {"name": "s2", "size": "5Mi", "access": {"f2": {"read": "100Ki"}}},
            ],
        },
    }


def image_ref(mesh, images, arm: str, f: str) -> str:
    im = images[(arm, f)]["oci"]
    return f"{mesh.registry.host}/{im.repo}:{im.tag}" + ("-remora" if images[(arm, f)].get("remora") else "")


def app_doc(spec: dict, plan: dict, index_of: dict[str, int]) -> dict:
    """What the agents need to run a plan: per function its CPU, calls, state accesses and predecessors."""
    import re

    def q(v) -> float:
        m = re.fullmatch(r"([0-9.]+)(Ki|Mi)?", str(v))
        return float(m.group(1)) * {"Ki": 1024, "Mi": 1 << 20, None: 1}[m.group(2)]

    a = spec["application"]
    preds = {f["name"]: 0 for f in a["functions"]}
    for f in a["functions"]:
        for g in f.get("calls", {}):
            preds[g] += 1
    funcs = {}
    for f in a["functions"]:
        access = {}
        for s in a["states"]:
            if f["name"] in s["access"]:
                rw = s["access"][f["name"]]
                access[s["name"]] = [q(rw.get("read", 0)), q(rw.get("write", 0))]
        funcs[f["name"]] = {"cpu": float(f["cpu"].rstrip("ms")) / 1000,
                            "calls": {g: q(b) for g, b in f.get("calls", {}).items()},
                            "access": access, "preds": max(1, preds[f["name"]])}
    return {"functions": funcs, "response_bytes": q(a["response_bytes"]),
            "placement": {f: index_of[n] for f, n in plan["placement"]["functions"].items()},
            "states": {s: index_of[n] for s, n in plan["placement"]["states"].items()}}


def place(mesh, spec_path: Path, extra: list[str], timeout: float = 900) -> tuple[dict, float]:
    """``remora place plan`` in the scheduler's namespace, against the live scheduler; (plan JSON, seconds)."""
    from remora_testing.netlab.mesh import REMORA, SCHEDULER_PORT

    argv = [*REMORA, "place", "plan", str(spec_path), "--from-scheduler", f"{mesh.sched_node.ip}:{SCHEDULER_PORT}",
            "--tls-dir", str(mesh.tls_dirs["planner"]), "--json", *extra]
    t0 = time.monotonic()
    out = mesh.sched_node.run(argv, check=False, timeout=timeout)
    took = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(f"remora place plan failed ({out.returncode}): {out.stderr[-3000:]}")
    return json.loads(out.stdout), took


def wait_scheduler_knows(mesh, spec_path: Path, timeout: float = 60) -> None:
    """Until the scheduler's topology has every node of the spec (the peers registered)."""
    from remora_testing.netlab.mesh import REMORA, SCHEDULER_PORT

    deadline = time.monotonic() + timeout
    while True:
        out = mesh.sched_node.run([*REMORA, "place", "validate", str(spec_path), "--from-scheduler",
                                   f"{mesh.sched_node.ip}:{SCHEDULER_PORT}", "--tls-dir",
                                   str(mesh.tls_dirs["planner"])], check=False, timeout=60)
        if out.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the scheduler does not know every node: {out.stderr[-1000:]}")


def registry_bytes(mesh) -> int:
    return sum(mesh.registry.blob_bytes_served().values())


def start_function(mesh, p, images, arm: str, f: str) -> dict[str, float]:
    """What a kubelet does to start one function on node ``p``: pull its image — a remora image with
    ``remora pull`` into containerd's remora proxy snapshotter (manifest, config and bootstrap; file
    contents are read lazily through the node's peer), an OCI image with ``ctr images pull`` through the
    peer mirror — then run its container, whose start reads ``/app/hot.bin`` (checked against its
    SHA-256: the bytes the function sees are the image's). Returns the phases' wall times (the deploy's
    timeline: ``pull_s`` the image pull, ``run_s`` the container's start and its read of hot.bin)."""
    ref = image_ref(mesh, images, arm, f)
    ctd = p.containerd
    t0 = time.monotonic()
    present = ref in ctd.ctr(["images", "ls", "-q", f"name=={ref}"], timeout=60).stdout.split()
    if present:   # imagePullPolicy: IfNotPresent (a preheat with --pull put it there)
        snap = ["--snapshotter", "remora"] if images[(arm, f)].get("remora") else []
    elif images[(arm, f)].get("remora"):
        p.node.run([*remora_cli(), "pull", "--address", ctd.address, "--namespace", ctd.namespace,
                    "--api", str(ctd.snapshotter_api), "--plain-http", "--quiet", ref], timeout=600)
        snap = ["--snapshotter", "remora"]
    else:
        ctd.pull(ref, p.hosts_dir)
        snap = []
    t1 = time.monotonic()
    out = ctd.ctr(["run", "--rm", "--net-host", *snap, ref, f"{arm}-{f}-{time.time_ns()}",
                   "sha256sum", "/app/hot.bin"], timeout=600).stdout
    if out.split()[:1] != [images[(arm, f)]["hot_sha256"]]:
        raise RuntimeError(f"{ref}: /app/hot.bin in the container has sha256 {out.split()[:1]}")
    return {"pull_s": round(t1 - t0, 3), "run_s": round(time.monotonic() - t1, 3), "present": present}


def deploy_and_measure(mesh, arm: str, spec: dict, plan: dict, images, requests: int) -> dict:
    """Pull each function's image through its node's peer, activate, then time the first and later requests."""
    import subprocess

    from remora_testing.netlab.mesh import PY
    from remora_testing.netlab.namespaces import nsenter_argv

    index_of = {mesh.host_id(p): p.index for p in mesh.peers}
    app = app_doc(spec, plan, index_of)
    by_node: dict[int, list[str]] = {}
    for f, node in app["placement"].items():
        by_node.setdefault(node, []).append(f)
    # Every agent learns the plan (routing, the sink) and drops the previous arm's functions: not part of
    # the deploy, so before the clock starts.
    resets = [threading.Thread(target=p.node.run, args=([PY, "-c", ACTIVATE, p.node.ip, str(AGENT_PORT),
                                                         json.dumps({"app": app, "functions": []})],),
                               kwargs={"timeout": 60}) for p in mesh.peers]
    for t in resets:
        t.start()
    for t in resets:
        t.join()
    user = mesh.peers[0]
    entries = {f: app["placement"][f] for f in ("f1",)}

    def client_argv(n: int) -> list[str]:
        return nsenter_argv(user.node.ns) + [PY, "-c", CLIENT, user.node.ip, "0", json.dumps(entries), str(n),
                                             str(20 * 1024), str(AGENT_PORT), str(PROXY_BASE)]

    def client_result(proc) -> list[dict]:
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"client: {err[-800:]}")
        return json.loads(out)

    # A preheat happens well ahead of a deploy in practice, so its bytes are on disk by then; here it ran
    # seconds ago, and the writeback of its ~75 MB would compete with the deploy's own writes and fsyncs
    # on the lab's one shared disk. Both arms start from a flushed disk.
    os.sync()
    before = registry_bytes(mesh)
    before_blobs = mesh.registry.blob_bytes_served()
    t0 = time.time()
    # "deploy": the user's first request goes out at once and is answered when the whole chain is up
    first_proc = subprocess.Popen(client_argv(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready: dict[int, float] = {}
    pulled: dict[int, float] = {}
    phases: dict[str, dict[str, float]] = {}   # "node<i>/<f>" -> pull_s, run_s (start_function)
    errors: list[str] = []

    def deploy_node(i: int, fns: list[str]) -> None:
        p = mesh.peers[i]
        try:
            failed: list[str] = []

            def pull(f: str) -> None:   # a node starts its functions at once, as a kubelet would
                try:
                    phases[f"node{i}/{f}"] = start_function(mesh, p, images, arm, f)
                except Exception as exc:  # noqa: BLE001 - reported by deploy_node
                    failed.append(f"{f}: {exc}")

            pulls = [threading.Thread(target=pull, args=(f,)) for f in fns]
            for t in pulls:
                t.start()
            for t in pulls:
                t.join()
            if failed:
                raise RuntimeError("; ".join(failed))
            pulled[i] = time.time() - t0
            out = p.node.run([PY, "-c", ACTIVATE, p.node.ip, str(AGENT_PORT),
                              json.dumps({"app": app, "functions": fns})], check=False, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"activate on node{i}: {out.stderr[-500:]}")
            ready[i] = time.time() - t0
        except Exception as exc:  # noqa: BLE001 - reported, and the run fails below
            errors.append(f"node{i}: {exc}")

    threads = [threading.Thread(target=deploy_node, args=(i, fns)) for i, fns in by_node.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        first_proc.kill()
        raise RuntimeError("; ".join(errors))
    first = client_result(first_proc)[0]
    deploy_registry = registry_bytes(mesh) - before
    by_role: dict[str, int] = {}
    for digest, n in mesh.registry.blob_bytes_served().items():
        if n > before_blobs.get(digest, 0):
            role = next((images[(arm, g)]["remora"]["roles"].get(digest) for g in FUNCTIONS
                         if images[(arm, g)].get("remora") and digest in images[(arm, g)]["remora"]["roles"]),
                        "oci layer or config")
            by_role[role] = by_role.get(role, 0) + n - before_blobs.get(digest, 0)
    later = client_result(subprocess.Popen(client_argv(requests), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True))
    delays = [r["delay"] for r in later]
    return {"deploy_ready_s": max(ready.values()),
            "per_node_ready_s": {f"node{i}": round(v, 3) for i, v in ready.items()},
            "per_node_pulled_s": {f"node{i}": round(v, 3) for i, v in pulled.items()},
            "per_function_phases_s": phases,
            "first_answer_s": first["answered"] - t0, "first_delay_s": first["delay"],
            "measured_delay_s": statistics.median(delays), "measured_delays_s": delays,
            "deploy_registry_bytes": deploy_registry, "deploy_registry_bytes_by_role": by_role}


def one_run(args, run: int, images, sizes_mb) -> dict:
    from remora_testing.netlab import Lab

    n = args.nodes
    rates = [max(1, round(r * args.rate_scale)) for r in RATES_MBIT[:n]]
    delays = [d / 1000 for d in DELAYS_MS[:n]]
    lab = Lab(prefix=PREFIX, offload=True)
    passed = False
    try:
        with lab:
            out = _one_lab(args, run, images, lab, n, rates, delays)
        passed = True
        return out
    finally:
        # The lab's daemons are stopped by now; a lazy mount whose FUSE process died stays in the mount
        # table (all mounts are in the root mount namespace: nsenter --net only): detach them all first.
        from remora.mounts import detach_mount, mountpoints_under

        for mp in mountpoints_under(lab.workdir):
            try:
                detach_mount(mp)
            except Exception as exc:  # noqa: BLE001 - keep cleaning, say what stays
                log(f"warning: {mp} stays mounted: {exc}")
        # ~600 MB per run (registry, containerd roots, snapshotter roots, peer stores) on a shared disk:
        # only the logs and the specs stay, for a look after a failure.
        for sub in ("registry", *(f"{kind}{i}" for kind in ("containerd", "peer", "hosts", "snap")
                                             for i in range(n))):
            shutil.rmtree(Path(lab.workdir) / sub, ignore_errors=True)
        if passed and args.smoke:   # CI's check of the harness: nothing to look at after a pass
            shutil.rmtree(lab.workdir, ignore_errors=True)


def image_bytes_by_role(images: dict, arm: str) -> dict[str, int]:
    """Blob bytes of the arm's three images per role (what the deploy's registry reads are set against)."""
    out: dict[str, int] = {}
    for f in FUNCTIONS:
        entry = images[(arm, f)]
        if entry.get("remora"):
            m = entry["remora"]["manifest"]
            for desc in [m["config"], *m["layers"]]:
                role = entry["remora"]["roles"][desc["digest"]]
                out[role] = out.get(role, 0) + desc["size"]
        else:
            out["oci layer or config"] = out.get("oci layer or config", 0) + entry["oci"].size
    return out


def start_node_runtimes(lab, mesh, remora: bool, fs_spares: int = 2) -> None:
    """Every node's containerd (namespaced, private root), with the remora snapshotter as its proxy plugin
    ``remora`` when ``remora``: its lazy range reads go through the node's peer (``--mirror``), its pull
    service answers ``remora pull``. Snapshotters first (containerd connects to them), all at once."""
    from remora.procutil import unix_socket_answers, wait_until
    from remora_testing.netlab.mesh import PY
    from remora_testing.netlab.services import NsContainerd, write_mirror_hosts

    class Containerd(NsContainerd):
        snapshotter_socket: Path | None = None
        snapshotter_api: Path | None = None

        def config(self) -> str:
            text = super().config()
            if self.snapshotter_socket:
                text += f'\n[proxy_plugins.remora]\n  type = "snapshot"\n  address = "{self.snapshotter_socket}"\n'
            return text

    work = Path(lab.workdir)
    snaps = []
    for p in mesh.peers:
        ctd = Containerd(p.node, work / f"containerd{p.index}")
        if remora:
            d = work / f"snap{p.index}"
            d.mkdir()
            ctd.snapshotter_socket, ctd.snapshotter_api = d / "snap.sock", d / "api.sock"
            daemon = lab.spawn(p.node, [PY, "-m", "remora.snapshotter.cli", "--root", str(d / "root"),
                                        "--address", str(ctd.snapshotter_socket),
                                        "--api-address", str(ctd.snapshotter_api), "--mirror", p.mirror,
                                        "--plain-http", "--log-level", "info", "--fs-spares", str(fs_spares)],
                              log_name=f"snapshotter{p.index}.log")
            snaps.append((daemon, ctd))
        p.containerd = ctd
        p.hosts_dir = write_mirror_hosts(work / f"hosts{p.index}", mesh.registry.host, p.mirror)
    for daemon, ctd in snaps:
        wait_until(lambda d=daemon, c=ctd: (unix_socket_answers(c.snapshotter_socket)
                                            and unix_socket_answers(c.snapshotter_api)) or not d.alive(),
                   60, what=f"snapshotter {ctd.snapshotter_socket}")
        if not daemon.alive():
            raise RuntimeError(f"snapshotter exited:\n{daemon.log_tail()}")
    for p in mesh.peers:
        p.containerd.start()


def _one_lab(args, run: int, images, lab, n: int, rates: list[int], delays: list[float]) -> dict:
    from remora_testing.netlab.mesh import MIRROR_PORT, PY, Mesh, MeshOptions
    from remora_testing.netlab.services import wait_port_in

    token = Path(lab.workdir) / "preheat-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    work = Path(lab.workdir)
    pull = args.image_format == "remora" and not args.no_pull
    # a preheat with --pull: each peer has its own node's snapshotter (start_node_runtimes: snap<i>/api.sock)
    # pull into its own node's containerd
    runtime = {i: ["--runtime-pull-api", str(work / f"snap{i}" / "api.sock"),
                   "--runtime-address", str(work / f"containerd{i}" / "containerd.sock"),
                   "--runtime-namespace", f"lab{lab.id}"] for i in range(n)} if pull else {}
    opts = MeshOptions(peers=n, containerd=False, registry_rate=f"{args.registry_mbit}mbit",
                       peer_rates={i: (f"{rates[i]}mbit", f"{rates[i]}mbit") for i in range(n)},
                       scheduler_args=["--probe-interval", "2"],
                       peer_args=["--preheat-token-file", str(token)], node_args=runtime)
    mesh = Mesh(lab, opts)
    issue_planner_certificate(mesh)
    with mesh.registry.loopback() as loop:
        from remora_testing.netlab import content
        for entry in images.values():
            content.push_image(loop.url, entry["oci"])
            if entry.get("remora"):
                push_remora_image(loop.url, entry["oci"], entry["remora"])
    mesh.start()
    start_node_runtimes(lab, mesh, remora=args.image_format == "remora", fs_spares=args.fs_spares)
    for p in mesh.peers:
        cfg = {"index": p.index, "ip": p.node.ip, "mirror_port": MIRROR_PORT,
               "proxies": {str(q.index): {"ip": q.node.ip, "delay": delays[p.index] + delays[q.index]}
                           for q in mesh.peers if q.index != p.index}}
        path = Path(lab.workdir) / f"agent{p.index}.json"
        path.write_text(json.dumps(cfg))
        lab.spawn(p.node, [PY, str(HERE), "--agent", str(path)], log_name=f"agent{p.index}.log",
                  env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'testing'}"})
    for p in mesh.peers:
        wait_port_in(p.node, p.node.ip, AGENT_PORT, timeout=30)
    specs = {}
    for arm in ("planned", "random"):
        spec = spec_for(mesh, arm, images, n, rates, delays)
        path = Path(lab.workdir) / f"spec-{arm}.json"
        path.write_text(json.dumps(spec, indent=1))
        specs[arm] = (spec, path)
    wait_scheduler_knows(mesh, specs["planned"][1])
    result = {"run": run, "lab": lab.name, "arms": {}}
    order = ("random", "planned") if run % 2 == 0 else ("planned", "random")
    for arm in order:
        spec, path = specs[arm]
        before = registry_bytes(mesh)
        if arm == "planned":
            plan, took = place(mesh, path, ["--preheat", *(["--pull"] if pull else []),
                                            "--peer-port", str(TASK_FORWARD_PORT), "--preheat-token-file", str(token)])
            assert all(r["state"] == "succeeded" for r in plan["preheat"]), plan["preheat"]
        else:
            plan, took = place(mesh, path, ["--algorithm", "random", "--seed", str(run)])
        pre_registry = registry_bytes(mesh) - before
        log(f"run {run} {arm}: plan {plan['placement']} in {took:.1f}s")
        m = deploy_and_measure(mesh, arm, spec, plan, images, args.requests)
        user = mesh.host_id(mesh.peers[0])
        ev = plan["evaluation"]
        m.update({"plan_s": took, "placement": plan["placement"], "predicted_delay_s": ev["delays"][user],
                  "predicted_cost": ev["cost"]["total"], "predicted_objective": ev["objective"],
                  "predicted_deployment_bytes": sum(plan["deployment_bytes"].values()),
                  "plan_registry_bytes": pre_registry, "image_bytes_by_role": image_bytes_by_role(images, arm)})
        log(f"run {run} {arm}: first answer {m['first_answer_s']:.2f}s, delay measured "
            f"{m['measured_delay_s'] * 1000:.1f} ms vs predicted {m['predicted_delay_s'] * 1000:.1f} ms")
        result["arms"][arm] = m
    result["load_avg_after"] = list(os.getloadavg())
    return result


def summarize(runs: list[dict]) -> dict:
    def med(arm, key):
        return statistics.median(r["arms"][arm][key] for r in runs)

    rows = []
    for arm in ("planned", "random"):
        rows.append({"arm": arm, "runs": len(runs), "first_answer_s": med(arm, "first_answer_s"),
                     "deploy_ready_s": med(arm, "deploy_ready_s"), "plan_s": med(arm, "plan_s"),
                     "measured_delay_s": med(arm, "measured_delay_s"),
                     "predicted_delay_s": med(arm, "predicted_delay_s"),
                     "predicted_cost": med(arm, "predicted_cost"),
                     "deploy_registry_bytes": med(arm, "deploy_registry_bytes"),
                     "plan_registry_bytes": med(arm, "plan_registry_bytes"),
                     "predicted_deployment_bytes": med(arm, "predicted_deployment_bytes")})
    ratios = [r["arms"]["random"]["first_answer_s"] / r["arms"]["planned"]["first_answer_s"] for r in runs]
    delay_ratio = [r["arms"]["random"]["measured_delay_s"] / r["arms"]["planned"]["measured_delay_s"] for r in runs]
    err = {arm: statistics.median(r["arms"][arm]["measured_delay_s"] / r["arms"][arm]["predicted_delay_s"]
                                  for r in runs) for arm in ("planned", "random")}
    return {"rows": rows, "first_answer_speedup": statistics.median(ratios), "first_answer_speedups": ratios,
            "delay_ratio_random_over_planned": statistics.median(delay_ratio),
            "measured_over_predicted_delay": err, "target_first_answer_speedup": 3.0,
            "target_met": statistics.median(ratios) >= 3.0}


def print_table(summary: dict) -> None:
    print("| arm | runs | first answer s | deploy ready s | plan(+preheat) s | delay measured ms | delay predicted ms "
          "| registry MB at deploy | registry MB at plan | model deploy MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in summary["rows"]:
        print(f"| {r['arm']} | {r['runs']} | {r['first_answer_s']:.2f} | {r['deploy_ready_s']:.2f} | "
              f"{r['plan_s']:.2f} | "
              f"{r['measured_delay_s'] * 1000:.1f} | {r['predicted_delay_s'] * 1000:.1f} | "
              f"{r['deploy_registry_bytes'] / 1e6:.3f} | {r['plan_registry_bytes'] / 1e6:.1f} | "
              f"{r['predicted_deployment_bytes'] / 1e6:.1f} |")
    print(f"first answer: random/planned = {summary['first_answer_speedup']:.2f}x (target >= 3x: "
          f"{'met' if summary['target_met'] else 'NOT met'}); request delay random/planned = "
          f"{summary['delay_ratio_random_over_planned']:.2f}x; measured/predicted delay "
          + ", ".join(f"{k} {v:.2f}" for k, v in summary["measured_over_predicted_delay"].items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agent", help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=15, help="requests after the first, per arm and run")
    ap.add_argument("--image-mb", type=float, default=24.0, help="size of f2's image (f1: 2/3, f3: 4/3 of it)")
    ap.add_argument("--registry-mbit", type=int, default=100)
    ap.add_argument("--rate-scale", type=float, default=1.0,
                    help=f"multiply every node's link rate (default rates: {RATES_MBIT} Mbit/s)")
    ap.add_argument("--image-format", choices=("remora", "oci"), default="remora",
                    help="remora: images converted by 'remora convert', pulled lazily into the remora snapshotter "
                         "(default); oci: the plain images with containerd's overlayfs snapshotter")
    ap.add_argument("--fs-spares", type=int, default=2,
                    help="the snapshotters' --fs-spares (their default: 2; 1 = one warm fs process per node)")
    ap.add_argument("--no-pull", action="store_true",
                    help="planned arm: preheat the blobs only (no --pull: the deploy then runs 'remora pull' "
                         "on every node, as the random arm does)")
    ap.add_argument("--smoke", action="store_true", help="4 nodes, 1 run, 3 MB images, 3 requests")
    ap.add_argument("--json-out", default=str(HERE.with_suffix(".json")))
    ap.add_argument("--cache", default="/tmp/remora-bench-cache/placement-e2e")
    args = ap.parse_args(argv)
    if args.agent:
        return agent_main(args.agent)
    if args.smoke:
        args.nodes, args.runs, args.requests, args.image_mb = 4, 1, 3, 3.0
    if not 3 <= args.nodes <= len(DELAYS_MS):
        ap.error(f"--nodes must be 3..{len(DELAYS_MS)}")
    sys.path.insert(0, str(ROOT / "testing"))
    from remora_testing.netlab import cleanup_stale

    cleanup_stale(PREFIX)
    sizes = {"f1": args.image_mb * 2 / 3, "f2": args.image_mb, "f3": args.image_mb * 4 / 3}
    images = build_images(Path(args.cache), sizes)
    if args.image_format == "remora":
        t = time.monotonic()
        convert_images(Path(args.cache), images)
        log(f"remora images ready in {time.monotonic() - t:.1f}s (converted once, cached in {args.cache})")
    load_before = os.getloadavg()
    log(f"load average before: {load_before}")
    runs, errors = [], []
    for run in range(args.runs):
        try:
            runs.append(one_run(args, run, images, sizes))
        except Exception as exc:  # noqa: BLE001 - one failed run is reported, the others still count
            log(f"run {run} failed: {exc}")
            errors.append(f"run {run}: {exc}")
    doc = {"config": {"nodes": args.nodes, "runs": args.runs, "requests": args.requests, "image_mb": sizes,
                      "registry_mbit": args.registry_mbit,
                      "node_mbit": [max(1, round(r * args.rate_scale)) for r in RATES_MBIT[:args.nodes]],
                      "node_delay_ms": DELAYS_MS[:args.nodes], "smoke": args.smoke,
                      "image_format": args.image_format, "hot_fraction": HOT_FRACTION,
                      "fs_spares": args.fs_spares,
                      "preheat_pull": args.image_format == "remora" and not args.no_pull},
           "load_avg_before": list(load_before), "runs": runs, "errors": errors,
           "summary": summarize(runs) if runs else None}
    Path(args.json_out).write_text(json.dumps(doc, indent=1))
    if doc["summary"]:
        print_table(doc["summary"])
    print(f"json: {args.json_out}")
    return 0 if runs and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
