"""Small clients that run INSIDE a lab namespace (the safety rule: no client in the root namespace).

``python -m remora_testing.netlab.probe fetch URL`` streams a URL, hashes it and prints one JSON line
(bytes, seconds, sha256, status); ``sink``/``send`` measure raw TCP throughput across a shaped link;
``wait-port`` polls until a TCP port accepts (readiness of a daemon inside a namespace).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import time
import urllib.error
import urllib.request


def fetch(url: str, timeout: float, headers: list[str]) -> dict:
    req = urllib.request.Request(url)
    for h in headers:
        k, _, v = h.partition(":")
        req.add_header(k.strip(), v.strip())
    h = hashlib.sha256()
    n = 0
    t0 = time.monotonic()
    status = 0
    error = ""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status = resp.status
            # into one reused buffer: eight clients on a small machine each reading 200 MB must not spend
            # the CPU of the peers they measure on allocating fresh memory for every chunk
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            while True:
                got = resp.readinto(buf)
                if not got:
                    break
                h.update(view[:got])
                n += got
    except urllib.error.HTTPError as exc:
        status, error = exc.code, exc.read(2000).decode(errors="replace")
    except (OSError, urllib.error.URLError) as exc:
        error = str(exc)
    return {"url": url, "status": status, "bytes": n, "seconds": time.monotonic() - t0,
            "sha256": "sha256:" + h.hexdigest(), "error": error}


def sink(host: str, port: int, timeout: float) -> dict:
    """Accept connections until one carries data, read it to EOF; time from its first byte to the last.

    Connections that close without data (readiness probes such as ``wait-port``) are skipped.
    """
    with socket.create_server((host, port)) as srv:
        srv.settimeout(timeout)
        while True:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(timeout)
                n, first = 0, None
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        break
                    if first is None:
                        first = time.monotonic()
                    n += len(data)
                if n:
                    elapsed = time.monotonic() - first
                    return {"bytes": n, "seconds": elapsed, "mbit_s": n * 8 / elapsed / 1e6 if elapsed else 0.0}


def send(host: str, port: int, nbytes: int, timeout: float) -> dict:
    block = b"\x5a" * (1 << 16)
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as s:
        left = nbytes
        while left > 0:
            s.sendall(block[:min(left, len(block))])
            left -= min(left, len(block))
    return {"bytes": nbytes, "seconds": time.monotonic() - t0}


def wait_port(host: str, port: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return {"open": True}
        except OSError:
            if time.monotonic() > deadline:
                return {"open": False}
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m remora_testing.netlab.probe",
                                description="Clients run inside a lab namespace; each prints one JSON line.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="GET a URL, hash the body")
    f.add_argument("url")
    f.add_argument("--timeout", type=float, default=120)
    f.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    s = sub.add_parser("sink", help="accept one TCP connection and count bytes until EOF")
    s.add_argument("--listen", required=True, help="HOST:PORT")
    s.add_argument("--timeout", type=float, default=60)
    d = sub.add_parser("send", help="send N bytes to HOST:PORT")
    d.add_argument("--to", required=True, help="HOST:PORT")
    d.add_argument("--bytes", type=int, required=True)
    d.add_argument("--timeout", type=float, default=60)
    w = sub.add_parser("wait-port", help="wait until HOST:PORT accepts a connection")
    w.add_argument("target", help="HOST:PORT")
    w.add_argument("--timeout", type=float, default=15)
    args = p.parse_args(argv)
    if args.cmd == "fetch":
        out = fetch(args.url, args.timeout, args.header)
        ok = out["status"] == 200 and not out["error"]
    elif args.cmd == "sink":
        host, _, port = args.listen.rpartition(":")
        out, ok = sink(host, int(port), args.timeout), True
    elif args.cmd == "send":
        host, _, port = args.to.rpartition(":")
        out, ok = send(host, int(port), args.bytes, args.timeout), True
    else:
        host, _, port = args.target.rpartition(":")
        out = wait_port(host, int(port), args.timeout)
        ok = out["open"]
    print(json.dumps(out), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
