"""The snapshotter's pull service (snapshotter/pull_service.py) and the thin ``remora pull`` in front of it.

Real parts throughout: the ``remora snapshotter`` process serving gRPC and the pull API, a private
containerd 1.6 using it as a proxy plugin, a real registry, ``ctr run``. One stack serves the whole
module (each test pulls into containerd namespaces of its own, so every pull is a full one); the
stack's teardown reaps containers, stops the daemons and detaches every mount.

What is checked: a pull through the service gives a runnable image; the client loads no gRPC,
protobuf or HTTP library; errors exit exactly as the in-process pull does; no service means an
in-process pull; pulls run concurrently; a client that hangs up mid-pull neither stops its pull nor
hurts the service.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from lazy_support import CountingProxy, converted_busybox
from test_remote_e2e import Stack

from remora.procutil import wait_until
from remora.registry.client import RegistryClient

pytestmark = pytest.mark.timeout(180)

HEAVY_MODULES = ("grpc", "google.protobuf", "requests", "urllib3", "oras", "rich", "aiohttp", "http.client")


@pytest.fixture(scope="module")
def image(registry) -> str:
    """A converted busybox image (its remora reference)."""
    return converted_busybox(registry, "pull-api")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    st = Stack(tmp_path_factory.mktemp("pull-api"))
    yield st
    st.close()


def _ns(st: Stack) -> str:
    """A fresh containerd namespace (a full pull), reaped with the stack."""
    ns = f"pull-api-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    st.namespaces.append(ns)
    return ns


def _pull(st: Stack, ns: str, ref: str, *args: str, entry: str = "remora.cli", python_args: tuple = (),
          address: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, *(python_args or ("-m", entry)), *(["pull"] if entry == "remora.cli" else []),
            "--address", address or str(st.ctd.address), "-n", ns, *args, ref]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _api(st: Stack) -> tuple[str, str]:
    return "--api", str(st.snap.api_address)


def _http(path: Path, raw: bytes) -> tuple[int, bytes]:
    """One raw HTTP exchange on the API socket: (status, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_pull_through_service_then_run(stack, image):
    st = stack
    ns = _ns(st)
    proc = _pull(st, ns, image, *_api(st))
    assert proc.returncode == 0, proc.stderr + st.snap_log()
    name, digest = proc.stdout.split()
    assert name == image and digest.startswith("sha256:")
    # Progress came from the service, line by line, and the service did the pull.
    assert re.search(r"layer 2/2 \S+ \(bootstrap\): remote, mounted lazily", proc.stderr), proc.stderr
    assert "by the snapshotter's pull service" in proc.stderr and "pulling in this process" not in proc.stderr
    assert f"pulled {image} ({digest[:19]})" in st.snap_log(200)
    assert st.run(image, "sh", "-c", "echo served-$((6*7))", namespace=ns).stdout == "served-42\n"
    # The socket is the daemon's, root-only; /v1/version answers with its pid.
    assert stat.S_IMODE(st.snap.api_address.stat().st_mode) == 0o600
    status, body = _http(st.snap.api_address, b"GET /v1/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    info = json.loads(body)
    assert status == 200 and info["api"] == 1 and info["lazy"] is True and info["pid"] == st.snap.daemon.pid


def test_service_starts_the_hot_blob_before_the_prepares(stack, image, registry, tmp_path):
    """Through the service, the bootstrap and the hot blob are on their way as soon as the manifest
    is read: the warm-up is the service's, not the first Prepare's, and the registry serves the hot
    blob once, whole."""
    hot_list = tmp_path / "hot.txt"
    hot_list.write_text("/bin/busybox\n")
    src = image.removesuffix("-remora")
    ref = src + "-hot"
    subprocess.run([sys.executable, "-m", "remora.cli", "convert", "--no-progress", "--prefetch-list", str(hot_list),
                    src, ref], check=True, capture_output=True, timeout=240)
    st = stack
    ns = _ns(st)
    with RegistryClient(registry.host) as c:
        manifest = json.loads(c.get_manifest(ref.split("/", 1)[1].rsplit(":", 1)[0], "1-hot")[0])
    hot, boot = manifest["layers"][0]["digest"], manifest["layers"][-1]["digest"]
    with CountingProxy(registry.url) as proxy:
        proxied = ref.replace(registry.host, proxy.host, 1)
        proc = _pull(st, ns, proxied, *_api(st))
        assert proc.returncode == 0, proc.stderr + st.snap_log()
        log = st.snap_log(400)
        warmups = re.findall(r"warm-up from (.+?): (\d+) bytes of hot blob", log)
        assert warmups and warmups[-1][0] == "the pull service", log
        assert "early prefetch of" in log
        assert st.run(proxied, "sh", "-c", "echo warm-$((6*7))", namespace=ns).stdout == "warm-42\n"
        conns = list(proxy.by_connection)
    # One connection, opened while the manifest was read: the ping, then the bootstrap, then the hot
    # blob (whose request waits for the bootstrap: it would starve the bootstrap's new connection).
    port = next(p for p, path in conns if path == "/v2/")
    on_it = [path.rsplit("/", 1)[-1] for p, path in conns if p == port]
    assert on_it == ["", boot, hot], conns
    assert sum(1 for _, path in conns if path.endswith(hot)) == 1, conns


# Runs a module as __main__ and, at exit, writes every module the process loaded (sys.modules is the
# truth: -X importtime does not see modules loaded through importlib.import_module, as remora.cli does).
_RECORD_MODULES = """
import atexit, json, runpy, sys
out, entry = sys.argv[1], sys.argv[2]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = [entry, *sys.argv[3:]]
runpy.run_module(entry, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("entry", ["remora.cli", "remora.snapshotter.pull"])
def test_thin_client_imports_only_the_standard_library(stack, image, entry, tmp_path):
    """The console script's path (which registers every command) and the module's own entry point."""
    st = stack
    record = tmp_path / "modules.json"
    proc = _pull(st, _ns(st), image, *_api(st), entry=entry, python_args=("-c", _RECORD_MODULES, str(record), entry))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "by the snapshotter's pull service" in proc.stderr  # the thin path, not the fallback
    loaded = json.loads(record.read_text())
    assert "remora.snapshotter" in loaded and "remora.errors" in loaded  # the recording saw the run
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY_MODULES))
    assert heavy == [], heavy


def test_errors_exit_as_the_local_pull_does(stack, image, registry, tmp_path):
    st = stack
    ns = _ns(st)
    not_remora = image.removesuffix("-remora")
    for args, code, words in [((not_remora,), 3, "is not a remora image"),
                              ((image, str(tmp_path / "no-containerd.sock")), 2, "does not exist")]:
        ref, *address = args
        outcomes = []
        for mode in (_api(st), ("--local",)):
            proc = _pull(st, ns, ref, *mode, address=address[0] if address else None)
            errors = [line for line in proc.stderr.splitlines() if line.startswith("remora pull: error:")]
            outcomes.append((proc.returncode, errors))
        assert outcomes[0] == outcomes[1], outcomes
        assert outcomes[0][0] == code and len(outcomes[0][1]) == 1 and words in outcomes[0][1][0], outcomes
    assert f"pull of {not_remora} failed (exit code 3)" in st.snap_log(200)
    # A request the service cannot honour (an option it does not know) is refused whole, as a usage error.
    body = json.dumps({"reference": image, "address": str(st.ctd.address), "squash": True}).encode()
    status, answer = _http(st.snap.api_address, b"POST /v1/pull HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    err = json.loads(answer)["error"]
    assert status == 400 and err["exit_code"] == 2 and "squash" in err["message"], answer


def test_no_service_means_in_process_pull(stack, image, tmp_path):
    st = stack
    stale = tmp_path / "stale.sock"  # a socket file nobody listens on: connection refused
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    for api, why in [(tmp_path / "absent.sock", "No such file or directory"), (stale, "Connection refused")]:
        proc = _pull(st, _ns(st), image, "--api", str(api))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[0] == image
        assert f"remora pull: no pull service at {api} ({why}): pulling in this process" in proc.stderr
        assert "by the snapshotter's pull service" not in proc.stderr
    # --quiet: not a word on stderr, the fallback included.
    proc = _pull(st, _ns(st), image, "--api", str(tmp_path / "absent.sock"), "--quiet")
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.split()[0] == image
    # --local with a live service: the service is not asked.
    before = st.snap_log(400).count(f"pulled {image} ")
    proc = _pull(st, _ns(st), image, *_api(st), "--local")
    assert proc.returncode == 0 and "pull service" not in proc.stderr, proc.stderr
    assert st.snap_log(400).count(f"pulled {image} ") == before


class _ManifestBarrier:
    """Stands in for CountingProxy's upstream session: every manifest GET waits until ``n`` of them
    are waiting. So the pulls provably overlap: a service that ran them one at a time would leave
    the first one at the barrier until it breaks (a failed pull)."""

    def __init__(self, session, n: int):
        self.session, self.barrier = session, threading.Barrier(n, timeout=30)

    def get(self, url: str, **kw):
        if "/manifests/" in url:
            self.barrier.wait()
        return self.session.get(url, **kw)


def test_concurrent_pulls(stack, image, registry):
    st = stack
    namespaces = [_ns(st) for _ in range(3)]
    with CountingProxy(registry.url) as proxy:
        proxy._session = _ManifestBarrier(proxy._session, len(namespaces))
        ref = image.replace(registry.host, proxy.host, 1)
        procs = [subprocess.Popen([sys.executable, "-m", "remora.cli", "pull", "--address", str(st.ctd.address),
                                   "-n", ns, *_api(st), ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for ns in namespaces]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err + st.snap_log()
            assert out.split()[0] == ref and "by the snapshotter's pull service" in err
        for ns in namespaces:
            assert st.ctd.ctr("images", "ls", "-q", namespace=ns).stdout.split() == [ref]
        assert st.run(ref, "echo", "concurrent-ok", namespace=namespaces[-1]).stdout == "concurrent-ok\n"


def test_client_gone_mid_pull(stack, image, registry):
    """The client hangs up right after its request; the registry (behind a slow proxy) keeps the pull
    going for a while. The pull still completes, the service logs the lost client, and serves the
    next pull."""
    st = stack
    ns = _ns(st)
    with CountingProxy(registry.url, delay=0.3) as proxy:
        slow_ref = image.replace(registry.host, proxy.host, 1)
        body = json.dumps({"reference": slow_ref, "address": str(st.ctd.address), "namespace": ns}).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(st.snap.api_address))
            s.sendall(b"POST /v1/pull HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: f"pulled {slow_ref} " in st.snap_log(400), 60, what="the abandoned pull to finish")
    log = st.snap_log(400)
    assert f"pull of {slow_ref}: client gone" in log, log
    assert st.ctd.ctr("images", "ls", "-q", namespace=ns).stdout.split() == [slow_ref]
    proc = _pull(st, _ns(st), image, *_api(st))
    assert proc.returncode == 0 and "by the snapshotter's pull service" in proc.stderr, proc.stderr


def test_on_manifest_sees_every_layer_before_any_prepare(stack, image):
    """The hook the service uses to warm the snapshotter up: called once, before the first layer is
    prepared, with each layer's digest and the labels its Prepare carries (but snapshot.ref, which
    needs the config), bottom-up."""
    from remora.snapshotter.pull import SNAPSHOT_REF, pull

    st = stack
    ns = _ns(st)
    events: list = []
    result = pull(image, address=str(st.ctd.address), namespace=ns, say=lambda m: events.append(m),
                  on_manifest=lambda layers: events.append(layers))
    hooks = [i for i, e in enumerate(events) if isinstance(e, list)]
    first_layer = next(i for i, e in enumerate(events) if isinstance(e, str) and e.startswith("layer 1/"))
    assert len(hooks) == 1 and hooks[0] < first_layer, events
    layers = events[hooks[0]]
    manifest = json.loads(st.ctd.ctr("content", "get", result.manifest_digest, namespace=ns).stdout)
    assert [digest for digest, _ in layers] == [layer["digest"] for layer in manifest["layers"]]
    assert len(layers) == len(result.chain_ids)
    for (_, labels), chain in zip(layers, result.chain_ids):  # the labels each snapshot was committed with
        info = json.loads(st.ctd.ctr("snapshots", "--snapshotter", "remora", "info", chain, namespace=ns).stdout)
        committed = info.get("Labels", {})
        assert SNAPSHOT_REF not in labels and committed[SNAPSHOT_REF] == chain
        assert labels.items() <= committed.items(), (labels, committed)


def test_sigterm_lets_a_pull_in_flight_finish(image, registry, tmp_path):
    """Stopping the snapshotter mid-pull: the socket closes at once, the pull finishes (gRPC still
    answers its Prepares), its client gets the result, and the daemon exits cleanly."""
    st = Stack(tmp_path / "stack")
    try:
        with CountingProxy(registry.url, delay=0.3) as proxy:
            ref = image.replace(registry.host, proxy.host, 1)
            client = subprocess.Popen([sys.executable, "-m", "remora.cli", "pull", "--address", str(st.ctd.address),
                                       "-n", st.ns, *_api(st), ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
            wait_until(lambda: len(proxy.requests) > 0, 30, what="the pull to reach the registry")
            st.snap.daemon.proc.send_signal(signal.SIGTERM)
            out, err = client.communicate(timeout=60)
            assert client.returncode == 0 and out.split()[0] == ref, err + st.snap_log()
            assert "by the snapshotter's pull service" in err
            assert st.snap.daemon.proc.wait(30) == 0
        assert not st.snap.api_address.exists()
        log = st.snap_log(100)
        assert log.index("waiting up to 10s for 1 pull(s) in flight") < log.index(f"pulled {ref} "), log
    finally:
        st.close()


def test_service_module_loads_no_http_framework():
    """The pull service is a small stdlib server: importing it (on the daemon's start-up path, before
    the socket can open) loads no aiohttp (its import was 0.2-0.45 s of the daemon's start)."""
    proc = subprocess.run([sys.executable, "-c", "import sys, remora.snapshotter.pull_service; "
                           "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_bad_requests_get_clear_http_errors(stack):
    """Unknown endpoint 404, wrong method 405, oversized body 413, garbage 400: each with one JSON
    error line (exit code 2), and the service keeps serving."""
    api = stack.snap.api_address
    status, body = _http(api, b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404 and json.loads(body)["error"]["exit_code"] == 2
    status, body = _http(api, b"GET /v1/pull HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and json.loads(body)["error"]["exit_code"] == 2
    status, body = _http(api, b"POST /v1/pull HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
    assert status == 413 and json.loads(body)["error"]["exit_code"] == 2
    status, body = _http(api, b"BLAH\r\n\r\n")
    assert status == 400 and json.loads(body)["error"]["exit_code"] == 2
    status, body = _http(api, b"POST /v1/pull HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{nope")
    assert status == 400 and "not JSON" in json.loads(body)["error"]["message"]
    status, body = _http(api, b"GET /v1/version HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and json.loads(body)["api"] == 1


def _first_layer_labels(image: str) -> tuple[str, str, str, dict[str, str]]:
    """(host, repo, bootstrap digest, labels of the first layer's Prepare as remora pull sends them)."""
    from remora import oci
    from remora.format import annotations as ann
    from remora.reference import parse_reference
    from remora.snapshotter.pull import layer_labels

    ref = parse_reference(image)
    with RegistryClient(ref.host) as client:
        data, media_type, digest = client.get_manifest(ref.repository, ref.tag)[:3]
    manifest = oci.parse_manifest(data, media_type)
    first = manifest.layers[0]
    labels = layer_labels(first, "", image, digest, False)
    return ref.host, ref.repository, first.annotations[ann.BOOTSTRAP], labels


def test_warm_up_runs_the_access_check_before_any_prepare(image, tmp_path):
    """The first Prepare's registry access check is started by the warm-up (the pull service calls it
    as soon as the manifest is read): it has passed with no Prepare at all. And it is not weakened: for
    a repository that does not hold the bootstrap the early check fails quietly and the Prepare's own
    check still refuses."""
    from remora.snapshotter.lazy_layers import RemoraLayerHandler
    from remora.snapshotter.remote import RemoteLayerRefused

    host, repo, bootstrap, labels = _first_layer_labels(image)
    handler = RemoraLayerHandler(tmp_path / "root", standby=False, early_prefetch_limit=0)
    try:
        handler.warm(labels, reason="the test")
        wait_until(lambda: (host, repo, bootstrap) in handler._access_checked, 30,
                   what="the warm-up's access check to pass")
        other = f"pull-api-empty-{uuid.uuid4().hex[:6]}/nothing"
        wrong = {**labels, "containerd.io/snapshot/cri.image-ref": f"{host}/{other}:1"}
        handler.warm(wrong, reason="the test")  # warmed already for this bootstrap: no early check
        with pytest.raises(RemoteLayerRefused, match="does not hold bootstrap"):
            handler._check_access(host, other, bootstrap)
        assert (host, other, bootstrap) not in handler._access_checked
    finally:
        handler.mounts.close()
