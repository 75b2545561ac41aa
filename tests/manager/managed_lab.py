"""A managed mesh in a network lab: a manager node, two schedulers and N peers that find each other
only through it (tests/manager/test_manager_netns.py, benchmarks/bench_preheat.py).

Every client runs inside a namespace: the operator's API calls inside the manager's node (a short
Python process per call), status reads inside each peer's node.
"""
from __future__ import annotations

import json
import time

from remora_testing.netlab import Lab, content
from remora_testing.netlab.mesh import PY, REMORA, SCHEDULER_PORT, Mesh, MeshOptions
from remora_testing.netlab.services import wait_port_in

MANAGER_PORT = 8080

#: the operator's client, run inside the manager's node: one API call, JSON out
API = """
import json, sys, requests
s = requests.Session(); s.trust_env = False
r = s.request(sys.argv[1], sys.argv[2], json=json.loads(sys.argv[4]) if sys.argv[4] else None, timeout=30,
              headers={"Authorization": "Bearer " + open(sys.argv[3]).read().strip()}, verify=sys.argv[5])
print(json.dumps({"status": r.status_code, "body": r.json() if r.content else None}))
"""

#: a job watcher, run inside the manager's node: one process and one keep-alive connection for the whole
#: job (a process per poll costs a core's worth of Python start-ups on a loaded 2-core machine). A JSON
#: line per poll: seconds since the job was created and, per node, its state and bytes done; then the
#: final view.
WATCH = """
import json, sys, time, requests
s = requests.Session(); s.trust_env = False
s.headers["Authorization"] = "Bearer " + open(sys.argv[2]).read().strip()
url, interval, deadline = sys.argv[1], float(sys.argv[4]), time.monotonic() + float(sys.argv[5])
while True:
    view = s.get(url, timeout=30, verify=sys.argv[3]).json()
    done = view["state"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline
    print(json.dumps({"t": round(time.time() - view["created_at"], 2), "nodes": {
        n["hostname"]: [n["state"], sum(int(b.get("done_bytes", 0)) for b in n.get("blobs") or []
                                        if isinstance(b, dict))] for n in view.get("nodes", [])}}), flush=True)
    if done:
        print(json.dumps(view), flush=True)
        break
    time.sleep(interval)
"""


class ManagedLab:
    def __init__(self, lab: Lab, image: content.Image | None = None, interval: float = 2.0, peers: int = 4,
                 node_rate: str | None = None, registry_rate: str | None = None, job_poll: float = 0.2):
        self.lab, self.image, self.interval = lab, image, interval
        self.work = lab.workdir
        self.join_file, self.preheat_file = self.work / "join-token", self.work / "preheat-token"
        self.preheat_file.write_text("lab-preheat-token-0123456789\n")
        self.manager_node = lab.add_node("manager")
        url = f"https://{self.manager_node.ip}:{MANAGER_PORT}"
        self.url = url
        manager_args = ["--manager", url, "--manager-token-file", str(self.join_file)]
        self.mesh = Mesh(lab, MeshOptions(
            peers=peers, containerd=False, tls=True, node_rate=node_rate, registry_rate=registry_rate,
            # the manager's job engine calls the peers' task API (on the mirror listener) from its node
            peer_args=[*manager_args, "--idc", "lab", "--listen", "0.0.0.0:65001",
                       "--preheat-token-file", str(self.preheat_file)],
            scheduler_args=[*manager_args, "--manager-state", str(self.work / "sched-manager.json")]))
        self.sched2_node = lab.add_node("sched2")
        from remora.pki.ca import load_ca, write_member

        ca = load_ca(self.work / "pki" / "ca")
        self.ca_pem = self.work / "pki" / "manager" / "ca.pem"
        write_member(self.work / "pki" / "manager", ca.issue("manager", "manager", ips=[self.manager_node.ip]),
                     ca.bundle_pem)
        write_member(self.work / "pki" / "sched2", ca.issue("scheduler", "sched2", ips=[self.sched2_node.ip]),
                     ca.bundle_pem)
        self.root_file = self.work / "root-token"
        self.manager = lab.spawn(self.manager_node, [
            *REMORA, "-v", "manager", "--db", f"sqlite:///{self.work}/manager.db",
            "--listen", f"{self.manager_node.ip}:{MANAGER_PORT}", "--tls-dir", str(self.work / "pki" / "manager"),
            "--root-token-file", str(self.root_file), "--keepalive-interval", str(interval),
            "--peer-token-file", str(self.preheat_file), "--job-poll", str(job_poll), "--job-backoff", "0.5"],
            log_name="manager.log")
        wait_port_in(self.manager_node, self.manager_node.ip, MANAGER_PORT, timeout=60, daemon=self.manager)
        self.api("POST", "/api/v1/clusters", {"name": "lab", "is_default": True, "scopes": {"idc": ["lab"]}})
        self.join_file.write_text(self.api("POST", "/api/v1/join-tokens", {"name": "nodes"})["token"])
        self.sched2 = None

    def api(self, method: str, path: str, body: dict | None = None, ok: bool = True) -> dict:
        out = self.manager_node.run([PY, "-c", API, method, self.url + path, str(self.root_file),
                                     json.dumps(body) if body is not None else "", str(self.ca_pem)],
                                    check=False, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        answer = json.loads(out.stdout.strip().splitlines()[-1])
        if ok:
            assert answer["status"] < 300, (method, path, answer)
        return answer["body"]

    def watch_job(self, job_id: int, timeout: float, interval: float = 0.5) -> tuple[dict, list[dict]]:
        """Poll job ``job_id`` from one process in the manager's node until it ends or ``timeout`` passes:
        (the final view, the samples ``{"t": seconds since created, "nodes": {host: [state, bytes done]}}``)."""
        out = self.manager_node.run([PY, "-c", WATCH, f"{self.url}/api/v1/jobs/{job_id}", str(self.root_file),
                                     str(self.ca_pem), str(interval), str(timeout)],
                                    check=False, timeout=timeout + 60)
        assert out.returncode == 0, out.stderr[-2000:]
        lines = [json.loads(x) for x in out.stdout.strip().splitlines()]
        return lines[-1], lines[:-1]

    def start(self) -> None:
        self.mesh.start()
        sched_args = self.mesh.scheduler_argv()
        sched_args = [a.replace(self.mesh.sched_node.ip, self.sched2_node.ip).replace(
            str(self.mesh.tls_dirs["scheduler"]), str(self.work / "pki" / "sched2"))
            .replace("sched-manager.json", "sched2-manager.json") for a in sched_args]
        self.sched2 = self.lab.spawn(self.sched2_node, sched_args, log_name="scheduler2.log")
        wait_port_in(self.sched2_node, self.sched2_node.ip, SCHEDULER_PORT, daemon=self.sched2)

    @property
    def sched_addrs(self) -> tuple[str, str]:
        return f"{self.mesh.sched_node.ip}:{SCHEDULER_PORT}", f"{self.sched2_node.ip}:{SCHEDULER_PORT}"

    def status(self, p) -> dict:
        code = ("import urllib.request,sys;o=urllib.request.build_opener(urllib.request.ProxyHandler({}));"
                f"sys.stdout.write(o.open('{p.mirror}/_remora/status',timeout=10).read().decode())")
        out = p.node.run([PY, "-c", code], check=False, timeout=30)
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout else {}

    def metrics(self, p, prefix: str = "remora_peer_") -> dict[str, float]:
        """A peer's Prometheus samples whose names start with ``prefix`` (read inside its node)."""
        code = ("import urllib.request,sys;o=urllib.request.build_opener(urllib.request.ProxyHandler({}));"
                f"sys.stdout.write(o.open('{p.mirror}/metrics',timeout=10).read().decode())")
        out = p.node.run([PY, "-c", code], check=False, timeout=30)
        samples = {}
        for line in out.stdout.splitlines() if out.returncode == 0 else ():
            if line.startswith(prefix) and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    samples[name] = float(value)
                except ValueError:
                    pass
        return samples

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}\n"
                             f"{self.mesh.log_tails(12)}")


