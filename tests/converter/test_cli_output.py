"""What the converter commands show a person at a terminal, and what a killed convert leaves behind.

Run under a pseudo-terminal (progress is drawn only on a TTY) with COLUMNS=80: every long command
(convert, unpack, check) shows progress rows with real totals, and the report prints the manifest
digest whole. A convert killed with SIGKILL leaves its work dir; the next run removes it.
"""
from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import threading
import time

import pytest

from remora_testing.imagebuild import LayerSpec, write_image
from remora_testing.tarbuild import LayerBuilder

_ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


def run_pty(argv: list[str], env: dict | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as stdin/stdout/stderr; ``(exit code, output without colours)``."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            block = os.read(master, 65536)
        except OSError:         # EIO: the other side closed
            break
        if not block:
            break
        out += block
    code = proc.wait(max(1.0, deadline - time.monotonic()))
    os.close(master)
    return code, _ANSI.sub("", out.decode(errors="replace")).replace("\r", "\n")


def _last_row(out: str, label: str) -> str:
    rows = [line for line in out.splitlines() if line.lstrip().startswith(label)]
    assert rows, f"no {label!r} row in:\n{out[-3000:]}"
    return rows[-1]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-output")
    layer = LayerBuilder().add_file("big", os.urandom(3_000_000)).add_file("hot", b"hot" * 1000).build("none")
    write_image(f"oci:{tmp}/src:1", None, [LayerSpec(layer)])
    (tmp / "hot.txt").write_text("/hot\n/big\n")
    return tmp


def test_convert_progress_rows_and_full_digest_at_80_columns(image, tmp_path):
    env = {**os.environ, "COLUMNS": "80"}
    code, out = run_pty(["remora", "convert", f"oci:{image}/src:1", f"oci:{tmp_path}/out:1",
                         "--prefetch-list", str(image / "hot.txt")], env)
    assert code == 0, out[-3000:]
    assert "3.0/3.0 MB" in _last_row(out, "prefetch blob")
    boot = _last_row(out, "bootstrap")
    assert "?" not in boot.split("━")[-1].split()[0], boot          # a real total, not 0/?
    assert re.search(r"(\d+(\.\d+)?)/\1 (kB|bytes)", boot), boot    # and finished
    digests = re.findall(r"sha256:[0-9a-f]{64}", out)
    index = (tmp_path / "out" / "index.json").read_text()
    manifest_digest = re.search(r"sha256:[0-9a-f]{64}", index).group()
    assert manifest_digest in digests, out[-2000:]


def test_unpack_and_check_show_progress(image, tmp_path):
    code, out = run_pty(["remora", "convert", f"oci:{image}/src:1", f"oci:{tmp_path}/out:1", "--no-progress"])
    assert code == 0, out
    code, out = run_pty(["remora", "unpack", f"oci:{tmp_path}/out:1", str(tmp_path / "root")])
    assert code == 0, out
    assert "3.0/3.0 MB" in _last_row(out, "unpack ")
    code, out = run_pty(["remora", "check", f"oci:{tmp_path}/out:1"])
    assert code == 0, out
    assert "3.0/3.0 MB" in _last_row(out, "verify blobs")
    # not on a terminal: no progress rows at all
    proc = subprocess.run(["remora", "check", f"oci:{tmp_path}/out:1"], capture_output=True, text=True)
    assert proc.returncode == 0 and "verify blobs" not in proc.stderr + proc.stdout
    # dict build: a row per image for its bootstrap, then its chunks counted to the end
    code, out = run_pty(["remora", "dict", "build", str(tmp_path / "app.dict"), f"oci:{tmp_path}/out:1"])
    assert code == 0, out
    assert "image 1/1: bootstrap" in out
    assert "3.0/3.0 MB" in _last_row(out, "image 1/1: chunks")


def _stalling_registry(manifest: bytes, config: bytes, config_digest: str, layer_digest: str, release: threading.Event):
    """A registry on 127.0.0.1 that serves one image but stalls in the middle of its layer blob."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen_layer = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, body: bytes, ctype: str, length: int | None = None):
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            if "/manifests/" in self.path:
                self._send(manifest, "application/vnd.oci.image.manifest.v1+json")
            elif self.path.endswith(config_digest):
                self._send(config, "application/octet-stream")
            elif self.path.endswith(layer_digest):
                self._send(b"\0" * 4096, "application/octet-stream", length=10_000_000)
                self.wfile.flush()
                seen_layer.set()
                release.wait(60)
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd, seen_layer


def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_convert_leaves_nothing_after_the_next_run(image, tmp_path):
    import hashlib
    import json

    tmp_root = tmp_path / "tmproot"
    tmp_root.mkdir()
    env = {**os.environ, "REMORA_TMPDIR": str(tmp_root)}
    layer_digest = "sha256:" + "ab" * 32
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "cd" * 32]}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": config_digest, "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": layer_digest, "size": 10_000_000}]}).encode()
    release = threading.Event()
    httpd, seen_layer = _stalling_registry(manifest, config, config_digest, layer_digest, release)
    try:
        host = f"127.0.0.1:{httpd.server_address[1]}"
        proc = subprocess.Popen(["remora", "convert", f"{host}/slow/app:1", f"oci:{tmp_path}/out:1", "--no-progress"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert seen_layer.wait(60), "convert never asked for the layer"
            left = _wait_for(lambda: [p for p in tmp_root.iterdir() if p.name.startswith("remora-convert-")], 10,
                             "the work dir")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert left[0].is_dir(), "the killed convert's work dir (the test needs it to be there)"
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()
    # the next run (of anything that takes a work dir) sweeps it, and removes its own at the end
    code = subprocess.run(["remora", "convert", f"oci:{image}/src:1", f"oci:{tmp_path}/out2:1", "--no-progress"],
                          env=env, capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    assert not left[0].exists()
    assert list(tmp_root.iterdir()) == []
