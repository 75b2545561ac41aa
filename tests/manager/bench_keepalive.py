"""Load generator: keepalives per second one manager answers (SQLite or PostgreSQL).

    python3 tests/manager/bench_keepalive.py --db sqlite:////tmp/bench.db --members 1000 --seconds 10
    python3 tests/manager/bench_keepalive.py --postgres ...   (starts a private PostgreSQL)

Registers N members, then C concurrent aiohttp connections send keepalives round-robin for the given
time; prints requests/s, latency percentiles and errors as JSON. Not collected by pytest (shared CI
cores make throughput assertions flaky); the figures go into the notes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from manager_util import ManagerProcess, PrivatePostgres


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


async def run(url: str, join: str, members: int, seconds: float, conc: int, pid: int, ssl_ctx=None) -> dict:
    headers = {"Authorization": f"Bearer {join}"}
    connector = aiohttp.TCPConnector(limit=conc, ssl=ssl_ctx if ssl_ctx is not None else True)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
        ids = []
        for i in range(members):
            async with http.post(url + "/api/v1/agent/register", json={
                    "type": "peer", "hostname": "node" if ssl_ctx is not None else f"node-{i}", "ip": "127.0.0.1",
                    "port": 10000 + i}) as r:   # over mTLS a member registers as its certificate's host
                ids.append((await r.json())["id"])
        lat, errors = [], 0
        end = time.monotonic() + seconds
        counter = iter(range(10**12))

        async def worker():
            nonlocal errors
            while time.monotonic() < end:
                mid = ids[next(counter) % len(ids)]
                t0 = time.monotonic()
                async with http.post(f"{url}/api/v1/agent/{mid}/keepalive", json={"load": 1.0}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                lat.append(time.monotonic() - t0)

        t0, c0 = time.monotonic(), cpu_seconds(pid)
        await asyncio.gather(*(worker() for _ in range(conc)))
        took, cpu = time.monotonic() - t0, cpu_seconds(pid) - c0
    lat.sort()
    return {"requests": len(lat), "seconds": round(took, 2), "rps": round(len(lat) / took, 1), "errors": errors,
            "p50_ms": round(1000 * statistics.median(lat), 2), "p99_ms": round(1000 * lat[int(0.99 * len(lat))], 2),
            "server_cpu_ms_per_request": round(1000 * cpu / len(lat), 3),
            "keepalives_per_server_core_second": round(len(lat) / cpu, 1) if cpu else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db")
    ap.add_argument("--postgres", action="store_true")
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--tls", action="store_true", help="HTTPS, members present peer certificates (mutual TLS)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="remora-bench-"))
    pg = PrivatePostgres().start() if args.postgres else None
    db = pg.new_database() if pg else (args.db or f"sqlite:///{work}/bench.db")
    ssl_ctx, tls_dir = None, None
    if args.tls:
        from remora.pki.ca import init_ca, write_member
        from remora.pki.tls import TLSFiles, client_context

        ca = init_ca(work / "ca", cluster="bench")
        tls_dir = work / "tls-manager"
        write_member(tls_dir, ca.issue("manager", "manager", ips=["127.0.0.1"]), ca.bundle_pem)
        write_member(work / "tls-peer", ca.issue("peer", "node", ips=["127.0.0.1"]), ca.bundle_pem)
        ssl_ctx = client_context(TLSFiles.in_dir(work / "tls-peer"))
    m = ManagerProcess(db, work, keepalive_interval=30, extra=["--workers", str(args.workers)], tls_dir=tls_dir)
    try:
        join = m.ok("POST", "/api/v1/join-tokens", json={"name": "bench"})["token"]
        out = asyncio.run(run(m.url, join, args.members, args.seconds, args.concurrency, m.proc.pid, ssl_ctx))
        out["tls"] = bool(args.tls)
        out["db"] = "postgresql" if pg else "sqlite"
        print(json.dumps(out))
    finally:
        m.stop()
        if pg:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
