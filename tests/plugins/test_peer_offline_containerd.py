"""Issue 13 end to end: `remora peer preheat`, stop the registries, a real containerd pull through the peer.

Real processes: two Debian docker-registry instances (a public one, and a private one with htpasswd
users), a real ``remora peer`` process (the node's credentials for the private registry in its docker
config), ``remora peer preheat`` from the command line, and containerd 1.6 (``ctr images pull`` with
hosts.toml written by :mod:`remora.plugins.peer.hoststoml`: the peer first, the registry as fallback).
Both registries are stopped before containerd starts pulling, so any byte it gets came from the peer:
zero registry requests. The public image is pulled and every byte checked against its digest; the
private one is refused with no credentials, wrong ones, or valid ones the peer never saw the registry
accept (no layer of it reaches containerd), and pulled by the client whose credentials it saw accepted
while the registry was up.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import requests
from peer_util import unique
from test_peer_offline_mirror import TOKEN, USERS, docker_config, push_indexed_image, sha

from remora.plugins.peer import hoststoml
from remora.procutil import Daemon, free_port, port_open, wait_until
from remora_testing.containerd import PrivateContainerd
from remora_testing.registry import LocalRegistry

REMORA = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "remora")


@pytest.fixture(autouse=True)
def no_env_credentials(monkeypatch):
    monkeypatch.delenv("REMORA_USERNAME", raising=False)
    monkeypatch.delenv("REMORA_PASSWORD", raising=False)


def content(ctd: PrivateContainerd, digest: str) -> subprocess.CompletedProcess:
    """``ctr content get`` as bytes (PrivateContainerd.ctr decodes text)."""
    return subprocess.run([ctd.ctr_bin, "--address", str(ctd.address), "-n", ctd.namespace, "content", "get",
                           digest], capture_output=True, timeout=60)


def offline_metric(mirror: str, ref: str, result: str) -> float:
    text = requests.get(f"{mirror}/metrics", timeout=5).text
    line = f'remora_peer_offline_manifests_total{{ref="{ref}",result="{result}"}} '
    values = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)]
    return values[0] if values else 0.0


def test_preheat_then_containerd_pulls_with_the_registries_stopped(tmp_path):
    public = LocalRegistry(root=tmp_path / "public").start()
    private = LocalRegistry(root=tmp_path / "private", users=USERS).start()
    peer = ctd = None
    try:
        pub = push_indexed_image(public, unique("offline/ctd"), "v1")
        priv = push_indexed_image(private, unique("offline/secret"), "v1", auth=("alice", "alice-pw"))
        (tmp_path / "token").write_text(TOKEN)
        port = free_port()
        mirror = f"http://127.0.0.1:{port}"
        peer = Daemon([REMORA, "-v", "peer", "--listen", f"127.0.0.1:{port}", "--upload-listen", "127.0.0.1:0",
                       "--insecure-plain-mesh", "--registry", public.host, "--registry", private.host,
                       "--data-dir", str(tmp_path / "peer"), "--preheat-token-file", str(tmp_path / "token"),
                       "--registry-config", str(docker_config(tmp_path / "node.json", private.host, "alice",
                                                              "alice-pw"))],
                      tmp_path / "peer.log").start()
        wait_until(lambda: port_open("127.0.0.1", port) or not peer.alive(), 30, what="remora peer")
        assert peer.alive(), peer.log_tail()
        for image in (f"{public.host}/{pub['repo']}:v1", f"{private.host}/{priv['repo']}:v1"):
            out = subprocess.run([REMORA, "peer", "preheat", image, "--address", f"127.0.0.1:{port}",
                                  "--preheat-token-file", str(tmp_path / "token"), "--wait", "--json"],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and '"succeeded"' in out.stdout, out.stdout + out.stderr + peer.log_tail()

        hosts = tmp_path / "certs.d"
        hoststoml.write(hosts, [public.host, private.host], mirror, containerd="1.6")
        private_ref = f"{private.host}/{priv['repo']}:v1"
        # registry up: alice pulls the private image through the peer once (another containerd), so the
        # peer sees the registry accept her credentials for the repository
        online = PrivateContainerd(tmp_path / "containerd-online").start()
        try:
            out = online.ctr("images", "pull", "--user", "alice:alice-pw", "--hosts-dir", str(hosts), private_ref,
                             check=False, timeout=120)
            assert out.returncode == 0, out.stderr + "\n--- peer ---\n" + peer.log_tail()
        finally:
            online.ctr("images", "rm", private_ref, check=False)
            online.close()

        public.stop()
        private.stop()
        assert not port_open("127.0.0.1", public.port) and not port_open("127.0.0.1", private.port)

        ctd = PrivateContainerd(tmp_path / "containerd").start()
        t0 = time.monotonic()
        pulled = ctd.ctr("images", "pull", "--hosts-dir", str(hosts), f"{public.host}/{pub['repo']}:v1",
                         check=False, timeout=120)
        assert pulled.returncode == 0, pulled.stderr + "\n--- peer ---\n" + peer.log_tail()
        took = time.monotonic() - t0
        for digest in [pub["index_digest"], pub["manifest_digest"], pub["config_digest"], *pub["layers"]]:
            got = content(ctd, digest)
            assert got.returncode == 0, got.stderr
            assert sha(got.stdout) == digest
        for digest in [pub["config_digest"], *pub["layers"]]:
            assert content(ctd, digest).stdout == pub["blobs"][digest]
        listed = ctd.ctr("images", "ls", "-q").stdout.split()
        assert f"{public.host}/{pub['repo']}:v1" in listed
        assert offline_metric(mirror, "tag", "served") >= 1
        assert "stale-while-offline" in (tmp_path / "peer.log").read_text()

        # the private image: no credentials, wrong ones, or valid ones the peer never saw the registry
        # accept (bob) -> refused, nothing of it reaches containerd
        for user in ([], ["--user", "alice:wrong-pw"], ["--user", "bob:bob-pw"]):
            refused = ctd.ctr("images", "pull", *user, "--hosts-dir", str(hosts), private_ref, check=False,
                              timeout=120)
            assert refused.returncode != 0, f"private image pulled with {user}"
            for digest in [priv["manifest_digest"], priv["config_digest"], *priv["layers"]]:
                assert content(ctd, digest).returncode != 0
            assert private_ref not in ctd.ctr("images", "ls", "-q").stdout.split()
        # alice, whose credentials the registry accepted: the whole image from the peer, verified
        pulled = ctd.ctr("images", "pull", "--user", "alice:alice-pw", "--hosts-dir", str(hosts), private_ref,
                         check=False, timeout=120)
        assert pulled.returncode == 0, pulled.stderr + "\n--- peer ---\n" + peer.log_tail()
        for digest in [priv["config_digest"], *priv["layers"]]:
            assert content(ctd, digest).stdout == priv["blobs"][digest]
        print(f"offline pull of {sum(len(b) for b in pub['blobs'].values())} bytes through the peer: {took:.2f} s")
    finally:
        if ctd is not None:
            ctd.ctr("images", "rm", f"{public.host}/{pub['repo']}:v1", f"{private.host}/{priv['repo']}:v1",
                    check=False)
            ctd.close()
            for mnt in reversed(Path("/proc/mounts").read_text().splitlines()):
                target = mnt.split()[1]
                if target.startswith(str(tmp_path)):
                    subprocess.run(["umount", "-l", target], capture_output=True)
        if peer is not None:
            peer.stop()
        public.stop()
        private.stop()
