"""Load generator: keepalives per second one manager answers, and server CPU per keepalive.

    python3 tests/manager/bench_keepalive.py                          # SQLite and PostgreSQL, this tree
    python3 tests/manager/bench_keepalive.py --baseline-rev HEAD --repeats 3 --json out.json
    python3 tests/manager/bench_keepalive.py --db sqlite --tls --workers 2

Registers N members, then C connections send keepalives round-robin for the given time. The load
generator is a raw asyncio HTTP/1.1 client with pre-built requests (~30 µs of CPU per request), so it
measures the server rather than itself. ``--baseline-rev REV`` also runs the manager of git revision
REV (``git archive``, nothing in the working tree or git state changes) in the same run, interleaved,
and reports medians and the after/before ratio: on a shared machine only same-run ratios compare.

Reported per run: keepalives/s (wall clock: bounded by what the other jobs leave of the cores),
server CPU per keepalive (utime+stime of the manager and its workers; independent of the load), and
``projected_per_2_cores`` = 2 / CPU-per-keepalive: what two idle cores would answer. Not collected by
pytest (shared CI cores make throughput assertions flaky); the figures go into docs/manager.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from manager_util import REPO, ManagerProcess, PrivatePostgres


def _stat(pid: int) -> list[str]:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the manager and its worker processes: server cost per request, independent
    of what else the shared cores run."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat(int(entry))
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def register(url: str, join: str, members: int, ssl_ctx) -> list[int]:
    headers = {"Authorization": f"Bearer {join}"}
    connector = aiohttp.TCPConnector(limit=16, ssl=ssl_ctx if ssl_ctx is not None else True)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
        async def one(i):
            async with http.post(url + "/api/v1/agent/register", json={
                    "type": "peer", "hostname": "node" if ssl_ctx is not None else f"node-{i}", "ip": "127.0.0.1",
                    "port": 10000 + i}) as r:   # over mTLS a member registers as its certificate's host
                return (await r.json())["id"]
        return list(await asyncio.gather(*(one(i) for i in range(members))))


async def hammer(port: int, join: str, ids: list[int], seconds: float, conc: int, ssl_ctx, pid: int,
                 warmup: float = 1.0) -> dict:
    """C keep-alive connections, each sending one request at a time (no pipelining). Connections are
    opened (TLS handshakes done) and warmed up first; only the window after that is measured."""
    body = json.dumps({"load": 1.0, "config_version": 0, "fallbacks": {}}).encode()
    reqs = [(f"POST /api/v1/agent/{mid}/keepalive HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {join}\r\n"
             f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body for mid in ids]
    lat: list[float] = []
    errors = 0
    counter = iter(range(10**12))
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx,
                                                           server_hostname="127.0.0.1" if ssl_ctx else None)
                                   for _ in range(conc)))
    window = {"start": time.monotonic() + warmup}
    window["end"] = window["start"] + seconds

    async def worker(reader, writer):
        nonlocal errors
        while time.monotonic() < window["end"]:
            t0 = time.monotonic()
            writer.write(reqs[next(counter) % len(reqs)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if t0 >= window["start"]:
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                lat.append(time.monotonic() - t0)
        writer.close()

    async def sample():
        await asyncio.sleep(max(0.0, window["start"] - time.monotonic()))
        c0 = cpu_seconds(pid)
        await asyncio.sleep(max(0.0, window["end"] - time.monotonic()))
        return cpu_seconds(pid) - c0

    cpu, *_ = await asyncio.gather(sample(), *(worker(r, w) for r, w in conns))
    return {"lat": lat, "errors": errors, "cpu": cpu, "seconds": seconds}


def measure(m: ManagerProcess, members: int, seconds: float, conc: int, ssl_ctx) -> dict:
    join = m.ok("POST", "/api/v1/join-tokens", json={"name": f"bench-{time.monotonic_ns()}"})["token"]
    ids = asyncio.run(register(m.url, join, members, ssl_ctx))
    out = asyncio.run(hammer(m.port, join, ids, seconds, conc, ssl_ctx, m.proc.pid))
    lat, errors, cpu, took = sorted(out["lat"]), out["errors"], out["cpu"], out["seconds"]
    per = cpu / len(lat)
    return {"requests": len(lat), "seconds": round(took, 2), "rps": round(len(lat) / took, 1), "errors": errors,
            "p50_ms": round(1000 * statistics.median(lat), 2), "p99_ms": round(1000 * lat[int(0.99 * len(lat))], 2),
            "server_cpu_ms_per_keepalive": round(1000 * per, 3),
            "keepalives_per_server_cpu_second": round(1 / per, 1) if per else None,
            "projected_per_2_cores": round(2 / per, 1) if per else None,
            "loadavg": os.getloadavg()[0]}


def baseline_launcher(rev: str, work: Path) -> list[str]:
    """A Python command running ``remora.cli`` of revision ``rev`` (git archive into ``work``): the
    repository's folders laid out as the package (remora/, remora/plugins, ...), the editable install
    of this tree taken off the import path."""
    src = work / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = work / "pkg"
    shutil.copytree(src / "remora", pkg / "remora")
    for sub in ("plugins", "converter", "placement", "snapshotter"):
        if (src / sub).exists():
            shutil.copytree(src / sub, pkg / "remora" / sub)
    code = ("import sys, runpy; sys.meta_path[:] = [f for f in sys.meta_path if 'remora_0' not in "
            "getattr(f, '__module__', '')]; [sys.modules.pop(k) for k in list(sys.modules) if k == 'remora' "
            f"or k.startswith('remora.')]; sys.path.insert(0, {str(pkg)!r}); "
            "sys.argv[0] = 'remora'; runpy.run_module('remora.cli', run_name='__main__')")
    return [sys.executable, "-c", code]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--baseline-rev", help="also measure the manager of this git revision, same run")
    ap.add_argument("--json", type=Path, help="write all runs and medians here")
    ap.add_argument("--tls", action="store_true", help="HTTPS, members present peer certificates (mutual TLS)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="remora-bench-"))
    dbs = args.db.split(",")
    pg = PrivatePostgres().start() if "postgresql" in dbs else None
    ssl_ctx, tls_dir = None, None
    if args.tls:
        from remora.pki.ca import init_ca, write_member
        from remora.pki.tls import TLSFiles, client_context

        ca = init_ca(work / "ca", cluster="bench")
        tls_dir = work / "tls-manager"
        write_member(tls_dir, ca.issue("manager", "manager", ips=["127.0.0.1"]), ca.bundle_pem)
        write_member(work / "tls-peer", ca.issue("peer", "node", ips=["127.0.0.1"]), ca.bundle_pem)
        ssl_ctx: ssl.SSLContext | None = client_context(TLSFiles.in_dir(work / "tls-peer"))
    arms = {"after": None}
    if args.baseline_rev:
        arms = {"before": baseline_launcher(args.baseline_rev, work / "baseline"), "after": None}
    runs: list[dict] = []
    try:
        for rep in range(args.repeats):
            for db in dbs:
                for arm, launcher in arms.items():
                    url = pg.new_database() if db == "postgresql" else f"sqlite:///{work}/bench-{arm}-{rep}.db"
                    wd = work / f"{arm}-{db}-{rep}"
                    wd.mkdir()
                    m = ManagerProcess(url, wd, keepalive_interval=30, extra=["--workers", str(args.workers)],
                                       tls_dir=tls_dir, launcher=launcher)
                    try:
                        out = {"arm": arm, "db": db, "repeat": rep, "workers": args.workers, "tls": bool(args.tls),
                               **measure(m, args.members, args.seconds, args.concurrency, ssl_ctx)}
                    finally:
                        m.stop()
                    print(json.dumps(out), flush=True)
                    runs.append(out)
    finally:
        if pg:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for db in dbs:
        for arm in arms:
            sel = [r for r in runs if r["db"] == db and r["arm"] == arm]
            keys = ("rps", "server_cpu_ms_per_keepalive", "projected_per_2_cores", "p50_ms", "loadavg")
            summary[f"{db}/{arm}"] = {k: statistics.median(r[k] for r in sel) for k in keys}
        if "before" in arms:
            b, a = summary[f"{db}/before"], summary[f"{db}/after"]
            cpu = "server_cpu_ms_per_keepalive"
            summary[f"{db}/ratio_after_over_before"] = {"rps": round(a["rps"] / b["rps"], 2),
                                                        "server_cpu_per_keepalive": round(a[cpu] / b[cpu], 3)}
    print("| db / arm | keepalives/s | server CPU ms/keepalive | projected /s on 2 idle cores | p50 ms | load |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, v in summary.items():
        if "ratio" not in k:
            print(f"| {k} | {v['rps']} | {v['server_cpu_ms_per_keepalive']} | {v['projected_per_2_cores']} | "
                  f"{v['p50_ms']} | {v['loadavg']:.1f} |")
    for k, v in summary.items():
        if "ratio" in k:
            print(f"{k}: {v}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                         "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
