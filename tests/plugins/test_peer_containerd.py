"""A real ``ctr images pull`` through hosts.toml pointing at a peer (private containerd on this machine)."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from peer_util import make_layer, push_image, start_peer, unique

from remora.plugins.peer import hoststoml
from remora.procutil import Daemon, free_port, wait_until
from remora_testing.containerd_v2 import containerd2_bin_dir  # fetched by scripts/fetch-newer-runtimes.sh

SID_CONTAINERD = "2.1"


@pytest.fixture(params=["1.6", SID_CONTAINERD])
def containerd(request, cache_dir):
    """A containerd of the test's own (the system's 1.6, and 2.1 extracted privately): own root, state,
    sockets and opt dir; stopped by PID afterwards, its mounts and directories removed."""
    from shutil import which
    version = request.param
    bindir = containerd2_bin_dir() if version == SID_CONTAINERD else Path(which("containerd")).parent
    root = Path(tempfile.mkdtemp(prefix="remora-peer-ctd-", dir="/tmp"))
    sock = root / "c.sock"
    (root / "config.toml").write_text(f"""version = {3 if version == SID_CONTAINERD else 2}
root = "{root}/root"
state = "{root}/state"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
""")
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    d = Daemon([str(bindir / "containerd"), "--config", str(root / "config.toml")], root / "containerd.log",
               env=env).start()
    cd = {"address": str(sock), "root": root, "ns": unique("peer-test"), "ctr": str(bindir / "ctr"),
          "version": version, "env": env}
    try:
        wait_until(lambda: ctr(cd, "version", check=False).returncode == 0 or not d.alive(), 15, what="containerd")
        assert d.alive(), d.log_tail()
        yield cd
    finally:
        d.stop()
        for mnt in reversed(Path("/proc/mounts").read_text().splitlines()):
            target = mnt.split()[1]
            if target.startswith(str(root)):
                subprocess.run(["umount", "-l", target], capture_output=True)
        subprocess.run(["rm", "-rf", str(root)], capture_output=True)


def ctr(cd, *args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([cd["ctr"], "--address", cd["address"], "--namespace", cd["ns"], *args],
                          capture_output=True, timeout=120, check=check, env=cd["env"])


@pytest.fixture(scope="module")
def image(registry):
    repo = unique("ctd/app")
    layers = [make_layer({"etc/hello": b"hello from remora\n", "bin/data": os.urandom(900_000)}),
              make_layer({"srv/big": os.urandom(2_500_000)})]
    return {"repo": repo, "layers_bytes": layers, **push_image(registry.url, repo, "v1", layers)}


async def _pull(cd, hosts_dir: Path, ref: str) -> subprocess.CompletedProcess:
    import asyncio
    return await asyncio.to_thread(ctr, cd, "images", "pull", "--hosts-dir", str(hosts_dir), ref, check=False)


async def test_ctr_pull_through_the_peer(tmp_path, registry, containerd, image):
    peer = await start_peer(tmp_path, "node")
    try:
        hosts = tmp_path / "certs.d"
        hoststoml.write(hosts, [registry.host], peer.mirror_url,
                        containerd="1.6" if containerd["version"] == "1.6" else "2.x")
        ref = f"{registry.host}/{image['repo']}:v1"
        out = await _pull(containerd, hosts, ref)
        assert out.returncode == 0, out.stderr.decode()
        for digest, data in zip(image["layers"], image["layers_bytes"]):
            got = ctr(containerd, "content", "get", digest).stdout
            assert got == data
        served = peer.metrics.registry.get_sample_value("remora_peer_served_bytes_total", {"kind": "blob"})
        assert served == sum(map(len, image["layers_bytes"])) + len(ctr(containerd, "content", "get",
                                                                         image["config_digest"]).stdout)
        resolved = peer.metrics.registry.get_sample_value("remora_peer_mirror_requests_total",
                                                          {"kind": "manifest", "status": "200"})
        assert resolved >= 1, "containerd must resolve the tag through the peer"
    finally:
        await peer.stop()


async def test_ctr_pull_falls_back_to_the_registry_when_the_peer_is_down(tmp_path, registry, containerd, image):
    hosts = tmp_path / "certs.d"
    hoststoml.write(hosts, [registry.host], f"http://127.0.0.1:{free_port()}",
                    containerd="1.6" if containerd["version"] == "1.6" else "2.x")
    t0 = time.monotonic()
    out = await _pull(containerd, hosts, f"{registry.host}/{image['repo']}:v1")
    assert out.returncode == 0, out.stderr.decode()
    assert ctr(containerd, "content", "get", image["layers"][1]).stdout == image["layers_bytes"][1]
    assert time.monotonic() - t0 < 30
