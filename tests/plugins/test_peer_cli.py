"""``remora peer`` as a real process, ``remora peer status``, ``remora peer hosts-toml``."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
from peer_util import push_blob, sha, start_peer, unique

from remora.cli import main
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerServer
from remora.procutil import Daemon, free_port, port_open, wait_until

REMORA = [sys.executable, "-m", "remora.cli"]


def remora(*args) -> subprocess.CompletedProcess:
    """Run the CLI in this process (a subprocess costs seconds of imports on a loaded CI machine)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse errors
            code = exc.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_hosts_toml_writes_one_file_per_registry(tmp_path):
    out = remora("peer", "hosts-toml", "--dir", str(tmp_path), "--registry", "docker.io", "--registry",
                 "10.0.0.9:5000", "--plain-http", "10.0.0.9:5000", "--mirror", "http://127.0.0.1:65001")
    assert out.returncode == 0, out.stderr
    hub = (tmp_path / "docker.io" / "hosts.toml").read_text()
    assert 'server = "https://registry-1.docker.io"' in hub
    assert '[host."http://127.0.0.1:65001"]' in hub and 'capabilities = ["pull", "resolve"]' in hub
    assert 'dial_timeout = "200ms"' in hub
    local = (tmp_path / "10.0.0.9:5000" / "hosts.toml").read_text()
    assert 'server = "http://10.0.0.9:5000"' in local
    assert "config_path" in out.stderr
    old = remora("peer", "hosts-toml", "--print", "--containerd", "1.6", "--registry", "ghcr.io")
    assert old.returncode == 0 and "dial_timeout" not in old.stdout and 'server = "https://ghcr.io"' in old.stdout
    bad = remora("peer", "hosts-toml", "--dir", str(tmp_path), "--registry", "_default", "--containerd", "1.6")
    assert bad.returncode == 2 and "_default" in bad.stderr
    assert remora("peer", "hosts-toml", "--dir", str(tmp_path)).returncode == 2


def test_daemon_flags_are_validated():
    out = remora("peer", "--gc-high", "10GiB", "--gc-low", "80%")
    assert out.returncode == 2 and "both be percentages" in out.stderr
    out = remora("peer", "--listen", "nowhere")
    assert out.returncode == 2 and "needs a port" in out.stderr
    out = remora("peer", "--gc-ttl", "soon")
    assert out.returncode == 2 and "bad duration" in out.stderr
    out = remora("peer", "--advertise", "10.0.0.1:http")
    assert out.returncode == 2 and "bad port" in out.stderr
    # the mesh is mutual TLS, or plain only when asked for by name (issue 10)
    out = remora("peer", "--data-dir", "/nonexistent/remora-peer")
    assert out.returncode == 2 and "--tls-dir" in out.stderr and "--insecure-plain-mesh" in out.stderr
    out = remora("scheduler")
    assert out.returncode == 2 and "--tls-dir" in out.stderr and "--insecure-plain-mesh" in out.stderr


async def test_peer_process_status_and_a_killed_parent(tmp_path, registry):
    sched = await SchedulerServer(SchedulerConfig(), "127.0.0.1:0", insecure_plain=True).start()
    listen, upload = free_port(), free_port()
    proc = Daemon([*REMORA, "-v", "peer", "--insecure-plain-mesh", "--listen", f"127.0.0.1:{listen}", "--upload-listen",
                   f"127.0.0.1:{upload}", "--scheduler", sched.address, "--data-dir", str(tmp_path / "proc"),
                   "--upstream", registry.host, "--label", "zone=z1", "--peer-id", "proc-peer",
                   "--gc-high", "64G", "--gc-low", "48G"],
                  tmp_path / "peer.log")
    child = None
    try:
        proc.start()
        await asyncio.to_thread(wait_until, lambda: port_open("127.0.0.1", listen) or not proc.alive(), 20,
                                what="remora peer")
        assert proc.alive(), proc.log_tail()
        repo = unique("cli/app")
        data = os.urandom(2_000_000)
        digest = push_blob(registry.url, repo, data)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{listen}/v2/{repo}/blobs/{digest}") as r:  # --upstream
                assert r.status == 200 and sha(await r.read()) == digest
            async with s.get(f"http://127.0.0.1:{listen}/metrics") as r:
                metrics = await r.text()
        assert 'remora_peer_download_bytes_total{source="registry"} 2e+06' in metrics
        out = await asyncio.to_thread(remora, "peer", "status", "--address", f"127.0.0.1:{listen}", "--json")
        status = json.loads(out.stdout)
        assert status["peer_id"] == "proc-peer" and status["labels"] == {"zone": "z1"}
        assert [(t["digest"], t["state"], t["have"]) for t in status["tasks"]] == [(digest, "done", 8)]
        table = await asyncio.to_thread(remora, "peer", "status", "--address", f"127.0.0.1:{listen}")
        assert table.returncode == 0 and digest[7:19] in table.stdout and "done" in table.stdout
        # The parent dies (SIGKILL): the scheduler still believes in it, the child must not.
        proc.kill()
        child = await start_peer(tmp_path, "child", [sched.address], piece_timeout=0.5)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{child.mirror_url}/v2/{repo}/blobs/{digest}?ns={registry.host}") as r:
                assert r.status == 200 and await r.read() == data
        task = child.tasks.tasks[digest]
        assert task.blocklist == {"proc-peer": "connection"}
        assert child.metrics.registry.get_sample_value("remora_peer_download_bytes_total",
                                                       {"source": "registry"}) == len(data)
        dead = await asyncio.to_thread(remora, "peer", "status", "--address", f"127.0.0.1:{listen}")
        assert dead.returncode != 0 and "cannot get the status" in dead.stderr
    finally:
        proc.stop()
        if child:
            await child.stop()
        await sched.stop(0)
