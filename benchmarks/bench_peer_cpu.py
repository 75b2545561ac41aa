#!/usr/bin/env python3
"""CPU seconds per MiB one piece moves costs the peers: one child pulls a blob from one parent, mutual TLS.

The mesh benchmarks (bench_p2p_mesh.py, bench_preheat.py) are CPU-bound on a 2-core machine: every byte
goes through Python peers (TLS, SHA-256 of every piece, disk writes, piece bookkeeping, scheduler
announcements). Wall times there swing with the machine's other load; CPU seconds per MiB do much less,
and they are what has to come down. This measures them on loopback with real processes, no shaping:

1. a registry (Debian's docker-registry), a TLS scheduler and two ``remora peer`` processes (member
   certificates of a fresh CA, distinct host ids) on 127.0.0.1;
2. the seed gets the blob from the registry (through its mirror) and verifies it;
3. the child gets it through its mirror: every piece from the seed over mutual TLS, verified, on disk,
   the whole blob verified, then streamed to the client. The CPU each process spent (user + system, per
   thread from /proc: the event loop vs worker threads vs gRPC's threads) over this step is reported
   per MiB of the blob: ``parent`` is the serving side, ``child`` everything the child did;
4. the client reads the complete blob from the child once more: the mirror's serving cost alone
   (``child serve``), so ``child - child serve`` is the cost of fetching the pieces.

``--arm NAME=DIR`` (repeatable) runs the peers with ``remora.plugins.peer`` imported from DIR (a copy of
plugins/peer: ``git archive HEAD plugins/peer | tar -x -C /tmp/before``), the arms alternating within each
round so that the machine's other load spreads over all of them; medians over ``--rounds``.
``--profile DIR`` runs both peers under cProfile (their event loop thread) and prints the top functions.

    python benchmarks/bench_peer_cpu.py --blob-mib 128 --rounds 3
    python benchmarks/bench_peer_cpu.py --arm before=/tmp/before/plugins/peer --arm after=plugins/peer \\
        --rounds 5 --json benchmarks/bench_peer_cpu.json
    python benchmarks/bench_peer_cpu.py --rounds 1 --profile /tmp/peerprof
"""
from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from remora.procutil import Daemon, free_port, port_open, wait_until
from remora_testing.registry import LocalRegistry

PY = sys.executable
REPO = "bench/peercpu"

#: ``remora`` with ``remora.plugins.peer`` imported from argv[1] ("" = the installed tree), under cProfile
#: when argv[2] names a file (written when SIGTERM ends the daemon normally).
ARM_CODE = """import cProfile, importlib.util, sys, time
code, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
if code:
    import remora.plugins
    spec = importlib.util.spec_from_file_location("remora.plugins.peer", code + "/__init__.py",
                                                  submodule_search_locations=[code])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["remora.plugins.peer"] = mod
    remora.plugins.peer = mod
    spec.loader.exec_module(mod)
from remora.cli import main
prof = cProfile.Profile(time.thread_time) if out else None   # CPU time of the loop thread, not wall
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
REMORA = [PY, "-c", "import sys; from remora.cli import main; sys.exit(main(sys.argv[1:]))"]


def push_blob(registry: str, data: bytes) -> str:
    import hashlib

    import requests
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = requests.post(f"http://{registry}/v2/{REPO}/blobs/uploads/", timeout=10)
    r.raise_for_status()
    loc = r.headers["Location"]
    loc = f"http://{registry}{loc}" if loc.startswith("/") else loc
    r = requests.put(f"{loc}{'&' if '?' in loc else '?'}digest={digest}", data=data, timeout=300,
                     headers={"Content-Type": "application/octet-stream"})
    r.raise_for_status()
    return digest


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread kind of one process (see bench_p2p_mesh.thread_cpu)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        if name == "python":
            name = "loop" if task.name == str(pid) else "workers"
        elif name.startswith("asyncio_"):
            name = "workers"
        else:
            name = "grpc/other"
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in set(a) | set(b)}


def get(url: str) -> int:
    """Stream a URL to nowhere (big reads: the client's own cost is not the peers')."""
    n = 0
    with urllib.request.urlopen(url, timeout=600) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status}")
        buf = bytearray(1 << 20)
        while (k := r.readinto(buf)):
            n += k
    return n


class Trial:
    """Registry (shared) + a fresh scheduler and two fresh peers running one arm's code."""

    def __init__(self, work: Path, registry: LocalRegistry, code: str, profile: Path | None, tag: str):
        self.work, self.registry, self.code, self.profile, self.tag = work, registry, code, profile, tag
        self.daemons: list[Daemon] = []

    def pki(self) -> dict[str, Path]:
        from remora.pki.ca import init_ca, write_member
        ca = init_ca(self.work / "ca", cluster="peercpu", force=True)
        out = {}
        for key, role, host in [("scheduler", "scheduler", "sched"), ("seed", "peer", "host-seed"),
                                ("child", "peer", "host-child")]:
            issued = ca.issue(role, host, ips=["127.0.0.1"])
            out[key] = write_member(self.work / key, issued, ca.bundle_pem)["ca"].parent
        return out

    def start(self) -> None:
        dirs = self.pki()
        self.sched_port = free_port()
        sched = Daemon([*REMORA, "scheduler", "--listen", f"127.0.0.1:{self.sched_port}",
                        "--metrics-listen", f"127.0.0.1:{free_port()}", "--tls-dir", str(dirs["scheduler"])],
                       self.work / "scheduler.log").start()
        self.daemons.append(sched)
        self.ports = {}
        for name in ("seed", "child"):
            mirror, upload = free_port(), free_port()
            prof = str(self.profile / f"{self.tag}-{name}.prof") if self.profile else ""
            argv = [PY, "-c", ARM_CODE, self.code, prof, "peer", "--data-dir", str(self.work / f"data-{name}"),
                    "--listen", f"127.0.0.1:{mirror}", "--upload-listen", f"127.0.0.1:{upload}",
                    "--advertise", f"127.0.0.1:{upload}", "--scheduler", f"127.0.0.1:{self.sched_port}",
                    "--upstream", self.registry.host, "--plain-http", self.registry.host,
                    "--host-id", f"host-{name}", "--tls-dir", str(dirs[name]),
                    "--gc-high", "64G", "--gc-low", "48G"]
            d = Daemon(argv, self.work / f"{name}.log").start()
            self.daemons.append(d)
            self.ports[name] = (mirror, upload, d)
        for port, d in [(self.sched_port, sched)] + [(m, d) for m, _, d in self.ports.values()]:
            wait_until(lambda port=port, d=d: port_open("127.0.0.1", port) or not d.alive(), 60, what="daemon port")
            if not d.alive():
                raise RuntimeError(f"daemon died at start:\n{d.log_tail()}")

    def url(self, name: str, digest: str) -> str:
        return f"http://127.0.0.1:{self.ports[name][0]}/v2/{REPO}/blobs/{digest}?ns={self.registry.host}"

    def metrics(self, name: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[name][0]}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()


def from_peers(metrics_text: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("remora_peer_download_bytes_total") and 'source="peer"' in line:
            total += float(line.split()[-1])
    return total


def run_trial(args, registry: LocalRegistry, digest: str, size: int, code: str, tag: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"peercpu-{tag}-", dir=args.workdir))
    trial = Trial(work, registry, code, Path(args.profile) if args.profile else None, tag)
    try:
        trial.start()
        assert get(trial.url("seed", digest)) == size
        seed_pid, child_pid = trial.ports["seed"][2].pid, trial.ports["child"][2].pid
        spies = []
        if args.pyspy or args.perf:
            import subprocess
            for name, pid in [("seed", seed_pid), ("child", child_pid)]:
                if args.perf:   # by shared object: libcrypto (TLS, SHA-256), libpython, kernel, libc
                    cmd = ["perf", "record", "-F", "997", "-p", str(pid), "-o", f"{args.perf}/{tag}-{name}.data"]
                else:
                    cmd = ["py-spy", "record", "-p", str(pid), "-r", "250", "-f", "raw", "--threads",
                           "-o", f"{args.pyspy}/{tag}-{name}.txt"] + (["--native"] if args.native else [])
                spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)   # the samplers attaching (not a synchronisation: only less of the fetch unsampled)
        s0, c0, t0 = thread_cpu(seed_pid), thread_cpu(child_pid), time.monotonic()
        assert get(trial.url("child", digest)) == size
        s1, c1, t1 = thread_cpu(seed_pid), thread_cpu(child_pid), time.monotonic()
        for spy in spies:
            spy.send_signal(2)   # SIGINT: the samplers write their output
            spy.wait(60)
        assert get(trial.url("child", digest)) == size
        c2, t2 = thread_cpu(child_pid), time.monotonic()
        peer_bytes = from_peers(trial.metrics("child"))
        if peer_bytes < size:
            raise RuntimeError(f"{tag}: the child got only {peer_bytes:.0f} of {size} bytes from the seed")
    except BaseException:
        args.keep = True
        print(f"{tag}: failed; logs kept in {work}", file=sys.stderr)
        raise
    finally:
        trial.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    mib = size / (1 << 20)
    parent, child, serve = diff(s0, s1), diff(c0, c1), diff(c1, c2)
    ms = {"parent": 1e3 * sum(parent.values()) / mib, "child": 1e3 * sum(child.values()) / mib,
          "child_serve": 1e3 * sum(serve.values()) / mib}
    ms["child_fetch"] = ms["child"] - ms["child_serve"]
    ms["total_fetch"] = ms["child_fetch"] + ms["parent"]
    split = {f"parent.{k}": 1e3 * v / mib for k, v in parent.items()}
    split.update({f"child.{k}": 1e3 * v / mib for k, v in child.items()})
    return {"ms_per_mib": ms, "threads_ms_per_mib": split, "wall_s": t1 - t0, "serve_wall_s": t2 - t1,
            "load": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blob-mib", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arm", action="append", default=[], help="NAME=DIR of a plugins/peer copy")
    ap.add_argument("--profile", help="directory for cProfile stats of both peers")
    ap.add_argument("--pyspy", help="directory for py-spy samples (collapsed stacks) of the child's fetch")
    ap.add_argument("--perf", help="directory for perf samples (perf.data) of both peers during the child's fetch")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames: ssl, hashlib, ...)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directories (logs)")
    args = ap.parse_args()
    arms = dict(a.split("=", 1) for a in args.arm) or {"tree": ""}
    arms = {k: str(Path(v).resolve()) if v else "" for k, v in arms.items()}
    for d in (args.pyspy, args.perf):
        if d:
            Path(d).mkdir(parents=True, exist_ok=True)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    size = args.blob_mib << 20
    results: dict[str, list[dict]] = {k: [] for k in arms}
    with LocalRegistry() as registry:
        digest = push_blob(registry.host, os.urandom(size))
        for r in range(args.rounds):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for name in order:
                res = run_trial(args, registry, digest, size, arms[name], f"{name}{r}")
                results[name].append(res)
                ms = res["ms_per_mib"]
                print(f"round {r} {name:>8}: child {ms['child']:.2f} (fetch {ms['child_fetch']:.2f}, serve "
                      f"{ms['child_serve']:.2f}) parent {ms['parent']:.2f} ms/MiB; fetch {res['wall_s']:.2f}s "
                      f"load {res['load']:.1f}", flush=True)
    summary = {}
    for name, rs in results.items():
        keys = rs[0]["ms_per_mib"].keys()
        tkeys = sorted({k for x in rs for k in x["threads_ms_per_mib"]})
        summary[name] = {"ms_per_mib": {k: statistics.median(x["ms_per_mib"][k] for x in rs) for k in keys},
                         "threads_ms_per_mib": {k: statistics.median(x["threads_ms_per_mib"].get(k, 0.0) for x in rs)
                                                for k in tkeys},
                         "wall_s": statistics.median(x["wall_s"] for x in rs)}
    print(f"\nmedians over {args.rounds} round(s), {args.blob_mib} MiB, CPU ms per MiB (user+sys):")
    cols = ["child", "child_fetch", "child_serve", "parent", "total_fetch"]
    print(f"{'arm':>8} " + " ".join(f"{c:>12}" for c in cols) + "   fetch wall s")
    for name, s in summary.items():
        print(f"{name:>8} " + " ".join(f"{s['ms_per_mib'][c]:12.2f}" for c in cols) + f"   {s['wall_s']:.2f}")
    for name, s in summary.items():
        print(f"{name:>8} threads: " + ", ".join(f"{k} {v:.2f}" for k, v in s["threads_ms_per_mib"].items()))
    if args.profile:
        for f in sorted(Path(args.profile).glob("*.prof")):
            print(f"\n== {f.name} (event loop thread, by own time)")
            pstats.Stats(str(f)).sort_stats("tottime").print_stats(18)
    if args.json:
        Path(args.json).write_text(json.dumps({"blob_mib": args.blob_mib, "rounds": args.rounds, "arms": arms,
                                               "cpus": os.cpu_count(), "summary": summary, "runs": results},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
