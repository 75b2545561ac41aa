"""The network lab itself: namespaces talk, the root namespace cannot reach them, shaping, delay, cleanup.

Every client that talks to a lab address runs inside a lab namespace; the root namespace is only ever
*asked* where it would route a lab address (``ip route get``-style lookup, no packet sent).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from remora_testing.netlab import Lab, cleanup_stale
from remora_testing.netlab.delay import DelayProxy
from remora_testing.netlab.namespaces import LAB_SUPERNET, STATE_DIR, blackhole_routes, netns_list, route_get
from remora_testing.netlab.shaping import GSO_BURST, parse_rate, show, tbf_burst

PY = sys.executable
PREFIX = f"rlt{os.getpid() % 10000}-"  # this run's labs only: parallel runs never clean each other


def leftovers(prefix: str = PREFIX) -> tuple[list[str], list[str]]:
    ours = [ns for ns in netns_list() if ns.startswith(prefix)]
    states = [p.name for p in STATE_DIR.glob(f"{prefix}*.json")] if STATE_DIR.is_dir() else []
    return ours, states


def probe(node, *args: str, check: bool = True) -> dict:
    out = node.run([PY, "-m", "remora_testing.netlab.probe", *args], check=check).stdout
    return json.loads(out.strip().splitlines()[-1])


def send_through(lab, src, dst, nbytes: int) -> dict:
    """Send nbytes from src to dst over the lab and return the sink's measurement."""
    sink = lab.spawn(dst, [PY, "-m", "remora_testing.netlab.probe", "sink", "--listen", f"{dst.ip}:5001"],
                     log_name=f"sink-{time.monotonic_ns()}.log")
    assert probe(src, "wait-port", f"{dst.ip}:5001")["open"]
    probe(src, "send", "--to", f"{dst.ip}:5001", "--bytes", str(nbytes))
    sink.proc.wait(60)
    return json.loads(sink.log_path.read_text().strip().splitlines()[-1])


def test_lab_builds_and_namespaces_talk(tmp_path):
    with Lab(prefix=PREFIX, workdir=tmp_path) as lab:
        a, b = lab.add_node("a"), lab.add_node("b")
        assert lab.subnet.subnet_of(LAB_SUPERNET) and lab.subnet.prefixlen == 24
        assert a.ip != b.ip and all(ip_ in {str(h) for h in lab.subnet.hosts()} for ip_ in (a.ip, b.ip))
        got = send_through(lab, a, b, 2_000_000)
        assert got["bytes"] == 2_000_000
        # interface counters are the namespace's own (netlink), wire level: payload plus headers
        assert a.tx_bytes() >= 2_000_000 and b.rx_bytes() >= 2_000_000
        assert set(lab.namespaces()) <= set(netns_list())
        # the lab's interfaces exist only inside its namespaces
        root_addrs = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        assert a.ip not in root_addrs and b.ip not in root_addrs
    assert leftovers() == ([], [])
    assert str(lab.subnet) not in blackhole_routes()


def test_root_namespace_cannot_reach_lab(tmp_path):
    with Lab(prefix=PREFIX, workdir=tmp_path) as lab:
        a = lab.add_node("a")
        # asked, not tried: the longest match for a lab address in the root namespace is our blackhole
        assert route_get(a.ip) == f"blackhole {lab.subnet}"
        assert str(lab.subnet) in blackhole_routes()
        # inside the namespace the same address is local
        assert "local" in a.run(["ip", "route", "get", a.ip]).stdout
    # after teardown the route is gone (and the lookup falls back to whatever the host has)
    assert str(lab.subnet) not in blackhole_routes()


@pytest.mark.parametrize("kind", ["tbf", "htb"])
def test_rate_limit_roughly_right(tmp_path, kind):
    with Lab(prefix=PREFIX, workdir=tmp_path) as lab:
        a, b = lab.add_node("a"), lab.add_node("b")
        b.shape(down="20mbit", kind=kind)
        got = send_through(lab, a, b, 4_000_000)
        ratio = got["mbit_s"] * 1e6 / parse_rate("20mbit")
        print(f"\n{kind} 20mbit: measured {got['mbit_s']:.1f} Mbit/s, ratio {ratio:.2f}")
        assert got["bytes"] == 4_000_000
        stats = show(lab.bridge_ns, b.port)
        assert kind in stats and "Sent" in stats
        sent = int(stats.split("Sent", 1)[1].split()[0])
        assert sent >= 4_000_000  # the data really went through the shaper


def tbf_burst_of(ns: str, dev: str) -> int:
    qdiscs = json.loads(subprocess.run(["tc", "-n", ns, "-j", "qdisc", "show", "dev", dev],
                                       capture_output=True, text=True, check=True).stdout)
    return next(q for q in qdiscs if q["kind"] == "tbf")["options"]["burst"]


def test_offload_lab_shapes_at_the_same_rate_and_lets_super_packets_through(tmp_path):
    """``Lab(offload=True)``: the shapers' bucket holds a whole 64 KiB TCP super-packet, the bridge
    namespace stops handing frames to iptables, the data still goes through the shaper; a plain lab keeps
    the frame-sized bucket."""
    with Lab(prefix=PREFIX, workdir=tmp_path, offload=True) as lab:
        a, b = lab.add_node("a"), lab.add_node("b")
        b.shape(down="20mbit")
        # tc stores the bucket as a time: a byte or two is lost on the way back
        assert tbf_burst_of(lab.bridge_ns, b.port) >= 0.99 * GSO_BURST > tbf_burst(parse_rate("20mbit"))
        got = send_through(lab, a, b, 4_000_000)
        assert got["bytes"] == 4_000_000
        sent = int(show(lab.bridge_ns, b.port).split("Sent", 1)[1].split()[0])
        assert sent >= 4_000_000  # the data really went through the shaper
        nf = subprocess.run(["nsenter", f"--net=/run/netns/{lab.bridge_ns}", "--", "sh", "-c",
                             "cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo absent"],
                            capture_output=True, text=True, check=True).stdout.strip()
        assert nf in ("0", "absent")
    with Lab(prefix=PREFIX, workdir=tmp_path / "plain") as lab:
        a = lab.add_node("a", up="20mbit")
        assert abs(tbf_burst_of(a.ns, "eth0") - tbf_burst(parse_rate("20mbit"))) <= 16 < GSO_BURST


def test_delay_proxy_adds_latency_and_can_corrupt(tmp_path):
    """In-process on 127.0.0.1 (loopback is allowed): one-way delay per direction, corruption mode."""
    payload = os.urandom(200_000)

    async def scenario():
        async def echo(reader, writer):
            data = await reader.readexactly(len(payload))
            writer.write(data)
            await writer.drain()
            writer.close()

        upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
        up_port = upstream.sockets[0].getsockname()[1]
        results = {}
        for corrupt in (False, True):
            proxy = await DelayProxy(("127.0.0.1", 0), ("127.0.0.1", up_port), up_delay=0.05, down_delay=0.08,
                                     corrupt=corrupt).start()
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(payload)
            await writer.drain()
            back = await reader.readexactly(len(payload))
            results[corrupt] = (time.monotonic() - t0, back)
            writer.close()
            await proxy.close()
        upstream.close()
        return results

    results = asyncio.run(scenario())
    rtt, back = results[False]
    print(f"\nround trip through 50+80 ms proxy: {rtt * 1000:.0f} ms")
    assert rtt >= 0.13  # a lower bound: the proxy never delivers early
    assert back == payload
    _, bad = results[True]
    assert len(bad) == len(payload) and bad != payload


def test_teardown_on_exception_and_sigterm(tmp_path):
    with pytest.raises(RuntimeError):
        with Lab(prefix=PREFIX, workdir=tmp_path / "exc") as lab:
            lab.add_node("a")
            raise RuntimeError("boom")
    assert leftovers() == ([], [])
    assert str(lab.subnet) not in blackhole_routes()

    script = textwrap.dedent(f"""
        import sys, time
        from remora_testing.netlab import Lab
        with Lab(prefix={PREFIX!r}, workdir={str(tmp_path / 'term')!r}) as lab:
            a = lab.add_node("a")
            lab.spawn(a, ["sleep", "300"])
            print(lab.subnet, flush=True)
            time.sleep(300)
    """)
    proc = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        subnet = proc.stdout.readline().strip()
        assert subnet
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert leftovers() == ([], [])
    assert subnet not in blackhole_routes()


def test_cleanup_removes_killed_run_but_not_live_lab(tmp_path):
    prefix = PREFIX[:-1] + "k-"
    script = textwrap.dedent(f"""
        import time
        from remora_testing.netlab import Lab
        lab = Lab(prefix={prefix!r}, workdir={str(tmp_path / 'killed')!r}).__enter__()
        a = lab.add_node("a")
        lab.spawn(a, ["sleep", "300"])
        print(lab.subnet, flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        subnet = proc.stdout.readline().strip()
        proc.kill()  # SIGKILL: no teardown runs
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert subnet in blackhole_routes()
    assert leftovers(prefix)[0], "the killed run should have left its namespaces"
    with Lab(prefix=prefix, workdir=tmp_path / "live") as live:
        live.add_node("a")
        removed = cleanup_stale(prefix)
        assert f"route blackhole {subnet}" in removed
        assert any(item.startswith("netns ") for item in removed)
        # the live lab is untouched
        assert set(live.namespaces()) <= set(netns_list())
        assert str(live.subnet) in blackhole_routes()
        stale_ns, stale_states = leftovers(prefix)
        assert all(ns.startswith(live.name) for ns in stale_ns) and stale_states == [f"{live.name}.json"]
    assert leftovers(prefix) == ([], [])
    assert subnet not in blackhole_routes() and str(live.subnet) not in blackhole_routes()
    # the command-line form finds nothing more to do
    out = subprocess.run([PY, "-m", "remora_testing.netlab", "cleanup", "--prefix", prefix],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "nothing to clean" in out.stdout
