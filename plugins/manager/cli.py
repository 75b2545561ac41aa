"""``remora manager`` (run the manager), ``remora job`` and ``remora cluster`` (its REST API).

Parsing only at import time: the server stack (FastAPI, SQLAlchemy, uvicorn) is imported when
``remora manager`` runs, and the operator commands need only ``requests`` and ``rich``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from remora.errors import AuthError, InvalidInput, NotFound, RemoraError, UsageError

DEFAULT_DIR = Path("/var/lib/remora/manager")
DEFAULT_URL = "http://127.0.0.1:8080"

MANAGER_EPILOG = """\
examples:
  remora manager --tls-dir /etc/remora/manager-tls   SQLite under /var/lib/remora/manager, https://127.0.0.1:8080
  remora manager --tls-dir DIR --listen 10.0.0.2:8080 --db postgresql://remora:pw@db/remora  (HA: replicas)
  remora manager --insecure-plain-http               plain HTTP on loopback (labs)

On first start (empty database) user 'root' and a token with every scope are created; the token is
written to --root-token-file (mode 0600). Console: http://HOST:PORT/console/  API: /openapi.json
"""

CLIENT_EPILOG = """\
the manager and token come from --manager/--token or REMORA_MANAGER / REMORA_MANAGER_TOKEN
(or --token-file); every command prints a table, or JSON with --json.
"""


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manager", default=os.environ.get("REMORA_MANAGER", DEFAULT_URL), metavar="URL",
                   help="manager base URL (default: $REMORA_MANAGER or %(default)s)")
    p.add_argument("--token", default=os.environ.get("REMORA_MANAGER_TOKEN"), help="personal access token")
    p.add_argument("--token-file", type=Path, help="read the token from this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(subparsers) -> None:
    m = subparsers.add_parser("manager", help="run the manager (control plane, REST API, console)",
                              description="Run the remora manager: clusters, membership, dynamic config, jobs.",
                              epilog=MANAGER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--db", default=f"sqlite:///{DEFAULT_DIR}/manager.db", metavar="URL",
                   help="sqlite:///PATH or postgresql://USER:PW@HOST/DB (default: %(default)s)")
    m.add_argument("--listen", type=_hostport, default=("127.0.0.1", 8080), metavar="HOST:PORT",
                   help="HTTP address (default: 127.0.0.1:8080)")
    m.add_argument("--keepalive-interval", type=float, default=10.0, metavar="SECONDS",
                   help="members keep alive this often; 3 missed = inactive (default: %(default)s)")
    m.add_argument("--root-token-file", type=Path, default=DEFAULT_DIR / "root-token", metavar="PATH",
                   help="where the first root token is written (default: %(default)s)")
    sec = m.add_argument_group("transport (one is required)").add_mutually_exclusive_group()
    sec.add_argument("--tls-dir", type=Path, metavar="DIR",
                     help="HTTPS with DIR/cert.pem + key.pem (role manager, 'remora certs issue --role manager') "
                          "and DIR/ca.pem; schedulers and peers must present member certificates of that CA")
    sec.add_argument("--insecure-plain-http", action="store_true",
                     help="serve plain HTTP: anyone who reaches the port and holds a join token can register "
                          "and keep alive in any node's name (labs, loopback)")
    m.add_argument("--ca-dir", type=Path, metavar="DIR",
                   help="cluster CA (ca.pem + ca-key.pem, 'remora certs init'): issue member certificates "
                        "to joined schedulers and peers")
    m.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes (each a full replica; use the number of cores) (default: %(default)s)")
    m.add_argument("--peer-token-file", default=None, metavar="FILE",
                   help="bearer token sent to the peers' preheat task API (the file each peer reads with "
                        "--preheat-token-file); without it, peers answer preheat jobs with 401")
    m.add_argument("--job-poll", type=float, default=1.0, metavar="SECONDS", help="peer task status poll interval")
    m.add_argument("--job-backoff", type=float, default=2.0, metavar="SECONDS", help="first retry delay (doubles)")
    m.add_argument("--job-backoff-max", type=float, default=60.0, metavar="SECONDS", help="longest retry delay")
    m.set_defaults(func=run_manager)

    j = subparsers.add_parser("job", help="preheat, sync-peers, delete-task and gc jobs (manager API)",
                              epilog=CLIENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    js = j.add_subparsers(dest="job_command", metavar="ACTION", required=True)
    c = js.add_parser("create", help="create a job")
    c.add_argument("type", choices=("preheat", "sync-peers", "delete-task", "gc"))
    c.add_argument("--image", help="image reference (preheat, delete-task)")
    c.add_argument("--blob", action="append", default=[], metavar="DIGEST:SIZE",
                   help="sha256:HEX:SIZE, repeatable (instead of --image; needs --repository)")
    c.add_argument("--repository", metavar="REGISTRY/REPO",
                   help="the repository the --blob digests are in (peers fetch and authorize per repository)")
    c.add_argument("--pull", action="store_true",
                   help="preheat of a remora --image: then each node's snapshotter pulls it into containerd "
                        "(peers run with --runtime-pull-api), so its first start pulls nothing")
    c.add_argument("--scope", choices=("one_seed_peer", "all_seed_peers", "all_peers", "nodes"), default="all_peers")
    c.add_argument("--cluster", help="cluster name")
    c.add_argument("--node", action="append", default=[], help="node hostname or id (scope nodes), repeatable")
    c.add_argument("--nodes-file", type=Path, help="node list, one per line (e.g. 'remora place' output)")
    c.add_argument("--max-attempts", type=int, default=3)
    c.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS")
    c.add_argument("--wait", action="store_true", help="show progress until the job ends")
    for name, helptext in (("list", "list jobs"), ("show", "show one job with per-node progress"),
                           ("cancel", "cancel a job"), ("retry", "retry the failed nodes of a job")):
        sp = js.add_parser(name, help=helptext)
        if name != "list":
            sp.add_argument("id", type=int)
        if name == "show":
            sp.add_argument("--wait", action="store_true", help="show progress until the job ends")
        _client_args(sp)
    _client_args(c)
    j.set_defaults(func=run_job)

    k = subparsers.add_parser("cluster", help="scheduler clusters, members, dynamic config (manager API)",
                              epilog=CLIENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ks = k.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    sp = ks.add_parser("list", help="list clusters")
    _client_args(sp)
    sp = ks.add_parser("create", help="create a cluster")
    sp.add_argument("name")
    sp.add_argument("--idc", action="append", default=[])
    sp.add_argument("--location", default="")
    sp.add_argument("--cidr", action="append", default=[])
    sp.add_argument("--hostname", action="append", default=[], help="hostname regex, repeatable")
    sp.add_argument("--default", action="store_true", help="peers matching no cluster use this one")
    sp.add_argument("--description", default="")
    _client_args(sp)
    for name in ("show", "delete"):
        sp = ks.add_parser(name, help=f"{name} a cluster")
        sp.add_argument("id", type=int)
        _client_args(sp)
    sp = ks.add_parser("members", help="list schedulers, seed peers and peers")
    sp.add_argument("--type", choices=("scheduler", "seed_peer", "peer"))
    sp.add_argument("--cluster-id", type=int)
    _client_args(sp)
    sp = ks.add_parser("offline", help="take a member offline by hand")
    sp.add_argument("member", type=int)
    sp.add_argument("--reason", default="taken offline by operator")
    _client_args(sp)
    sp = ks.add_parser("online", help="put a member back online")
    sp.add_argument("member", type=int)
    _client_args(sp)
    sp = ks.add_parser("config", help="show the dynamic config, or set it from a JSON file")
    sp.add_argument("--cluster-id", type=int, help="cluster (default: global)")
    sp.add_argument("--set", type=Path, metavar="FILE", help="new config (JSON), becomes the next version")
    sp.add_argument("--expected-version", type=int, help="refuse unless this is the current version")
    _client_args(sp)
    sp = ks.add_parser("join-token", help="create a join token for schedulers and peers")
    sp.add_argument("name")
    sp.add_argument("--cluster-id", type=int)
    sp.add_argument("--ttl", type=float, metavar="SECONDS")
    _client_args(sp)
    k.set_defaults(func=run_cluster)


# ------------------------------------------------------------------ server
def run_manager(args) -> int:
    from remora.plugins.manager.api import Settings, serve
    from remora.plugins.manager.jobs import EngineSettings

    if args.keepalive_interval <= 0 or args.keepalive_interval > 3600:
        raise UsageError("--keepalive-interval must be in (0, 3600] seconds")
    for name in ("job_poll", "job_backoff", "job_backoff_max"):
        if not 0 < getattr(args, name) <= 3600:
            raise UsageError(f"--{name.replace('_', '-')} must be in (0, 3600] seconds")
    if not 1 <= args.workers <= 64:
        raise UsageError("--workers must be 1..64")
    if args.peer_token_file:
        from remora.plugins.manager.jobs import read_peer_token
        read_peer_token(args.peer_token_file)  # a bad file is a usage error now, not 401s per job later
    if args.tls_dir is None and not args.insecure_plain_http:
        raise UsageError("the manager needs HTTPS with a manager certificate of the cluster CA (--tls-dir DIR) "
                         "or, knowingly, --insecure-plain-http")
    host, port = args.listen
    if args.tls_dir is not None:
        from remora.plugins.manager.tls import reloader

        reloader(args.tls_dir)  # a bad or wrong-role certificate is a usage error now
    else:
        import logging

        logging.getLogger("remora.manager").warning(
            "PLAIN HTTP (insecure, --insecure-plain-http): join tokens and member registrations travel in clear "
            "and no client certificate is asked for")
    settings = Settings(db_url=args.db, keepalive_interval=args.keepalive_interval,
                        root_token_file=args.root_token_file,
                        ca_dir=args.ca_dir, tls_dir=args.tls_dir,
                        engine=EngineSettings(tick=min(0.2, args.job_poll), poll=args.job_poll,
                                              backoff_base=args.job_backoff, backoff_max=args.job_backoff_max,
                                              peer_token_file=args.peer_token_file))
    scheme = "https" if args.tls_dir else "http"
    print(f"remora manager: listening on {scheme}://{host}:{port} (console /console/, API /openapi.json)"
          + ("" if args.tls_dir else " -- PLAIN HTTP (insecure)"), file=sys.stderr, flush=True)
    serve(settings, host, port, args.workers)
    return 0


# ------------------------------------------------------------------ API client
class Api:
    def __init__(self, args):
        import requests

        token = args.token
        if args.token_file:
            try:
                token = args.token_file.read_text().strip()
            except OSError as exc:
                raise UsageError(f"cannot read --token-file: {exc}") from None
        if not token:
            raise UsageError("a token is needed: --token, --token-file or REMORA_MANAGER_TOKEN")
        self.base = args.manager.rstrip("/")
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.headers["Authorization"] = f"Bearer {token}"

    def __call__(self, method: str, path: str, **kw):
        import requests

        try:
            r = self.http.request(method, self.base + path, timeout=30, **kw)
        except requests.RequestException as exc:
            raise RemoraError(f"manager {self.base} unreachable: {exc}") from None
        if r.status_code == 204:
            return None
        try:
            body = r.json()
        except ValueError:
            body = {"detail": r.text[:300]}
        if r.status_code < 400:
            return body
        detail = body.get("detail") if isinstance(body, dict) else body
        if isinstance(detail, list):  # pydantic errors: name each field
            detail = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" for e in detail)
        if r.status_code in (401, 403):
            raise AuthError(f"HTTP {r.status_code}: {detail}")
        if r.status_code == 404:
            raise NotFound(str(detail))
        if r.status_code in (400, 409, 422):
            raise InvalidInput(f"HTTP {r.status_code}: {detail}")
        raise RemoraError(f"manager answered HTTP {r.status_code}: {detail}")


def _print(args, data, columns: list[tuple[str, str]], title: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    rows = data if isinstance(data, list) else [data]
    table = Table(title=title)
    for header, _ in columns:
        table.add_column(header)
    for row in rows:
        table.add_row(*[_fmt(row, key) for _, key in columns])
    Console().print(table)


def _fmt(row: dict, key: str) -> str:
    if key == "progress":
        total, done = row.get("bytes_total") or 0, row.get("bytes_verified") or 0
        return f"{done}/{total} B" + (f" ({100 * done / total:.0f}%)" if total else "")
    if key == "counts":
        return " ".join(f"{k}={v}" for k, v in sorted((row.get("counts") or {}).items()))
    value = row.get(key)
    if key.endswith("_at") or key == "last_seen":
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value)) if value else ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else str(value)


JOB_COLS = [("id", "id"), ("type", "type"), ("state", "state"), ("nodes", "counts"), ("by", "created_by"),
            ("created", "created_at"), ("error", "error")]
NODE_COLS = [("node", "hostname"), ("state", "state"), ("attempts", "attempts"), ("verified", "progress"),
             ("error", "error")]


def _show_job(args, api, job_id: int, wait: bool) -> int:
    job = api("GET", f"/api/v1/jobs/{job_id}")
    if wait and not args.json:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[state]}"))
        with Progress(*columns) as prog:
            tasks = {n["id"]: prog.add_task(n["hostname"], total=n["bytes_total"] or None, state=n["state"])
                     for n in job["nodes"]}
            while True:
                for n in job["nodes"]:
                    prog.update(tasks[n["id"]], completed=n["bytes_verified"], total=n["bytes_total"] or None,
                                state=n["state"] + (f" ({n['error'][:60]})" if n["error"] else ""))
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(1.0)  # UI refresh cadence of a human-facing progress display
                job = api("GET", f"/api/v1/jobs/{job_id}")
    elif wait:
        while job["state"] == "running":
            time.sleep(1.0)
            job = api("GET", f"/api/v1/jobs/{job_id}")
    if args.json:
        print(json.dumps(job, indent=2, sort_keys=True))
    else:
        _print(args, job, JOB_COLS, f"job {job_id}")
        _print(args, job["nodes"], NODE_COLS, "nodes")
    return 0 if job["state"] in ("running", "succeeded") else 1


def run_job(args) -> int:
    api = Api(args)
    cmd = args.job_command
    if cmd == "list":
        _print(args, api("GET", "/api/v1/jobs"), JOB_COLS, "jobs")
        return 0
    if cmd == "show":
        return _show_job(args, api, args.id, args.wait)
    if cmd in ("cancel", "retry"):
        job = api("POST", f"/api/v1/jobs/{args.id}/{cmd}")
        _print(args, job, JOB_COLS, f"job {args.id}")
        return 0
    blobs = []
    for item in args.blob:
        digest, _, size = item.rpartition(":")
        if not digest or not size.isdigit():
            raise UsageError(f"--blob {item!r}: expected sha256:HEX:SIZE")
        blobs.append({"digest": digest, "size": int(size)})
    nodes = list(args.node)
    if args.nodes_file:
        try:
            nodes += [ln.strip() for ln in args.nodes_file.read_text().splitlines()
                      if ln.strip() and not ln.startswith("#")]
        except OSError as exc:
            raise UsageError(f"cannot read --nodes-file: {exc}") from None
    body = {"type": args.type, "image": args.image, "repository": args.repository, "blobs": blobs,
            "max_attempts": args.max_attempts, **({"pull": True} if args.pull else {}),
            "timeout": args.timeout, "scope": {"kind": args.scope, "cluster": args.cluster, "nodes": nodes}}
    job = api("POST", "/api/v1/jobs", json=body)
    if args.wait:
        return _show_job(args, api, job["id"], True)
    if args.json:
        print(json.dumps(job, indent=2, sort_keys=True))
    else:
        _print(args, job, JOB_COLS, f"job {job['id']} created")
        _print(args, job["nodes"], NODE_COLS, "nodes")
    return 0


CLUSTER_COLS = [("id", "id"), ("name", "name"), ("default", "is_default"), ("scopes", "scopes"),
                ("description", "description")]
MEMBER_COLS = [("id", "id"), ("type", "type"), ("hostname", "hostname"), ("ip", "ip"), ("port", "port"),
               ("cluster", "cluster_id"), ("state", "state"), ("version", "version"), ("stats", "stats"),
               ("last seen", "last_seen")]


def run_cluster(args) -> int:
    api = Api(args)
    cmd = args.cluster_command
    if cmd == "list":
        _print(args, api("GET", "/api/v1/clusters"), CLUSTER_COLS, "clusters")
    elif cmd == "create":
        body = {"name": args.name, "description": args.description, "is_default": args.default,
                "scopes": {"idc": args.idc, "location": args.location, "cidrs": args.cidr, "hostnames": args.hostname}}
        _print(args, api("POST", "/api/v1/clusters", json=body), CLUSTER_COLS, "cluster created")
    elif cmd == "show":
        c = api("GET", f"/api/v1/clusters/{args.id}")
        if args.json:
            print(json.dumps(c, indent=2, sort_keys=True))
        else:
            _print(args, c, CLUSTER_COLS, f"cluster {args.id}")
            _print(args, c["members"], MEMBER_COLS, "members")
    elif cmd == "delete":
        api("DELETE", f"/api/v1/clusters/{args.id}")
        _print(args, {"id": args.id, "deleted": True}, [("id", "id"), ("deleted", "deleted")], "cluster deleted")
    elif cmd == "members":
        params = {k: v for k, v in (("type", args.type), ("cluster_id", args.cluster_id)) if v is not None}
        _print(args, api("GET", "/api/v1/members", params=params), MEMBER_COLS, "members")
    elif cmd in ("offline", "online"):
        kw = {"json": {"reason": args.reason}} if cmd == "offline" else {}
        _print(args, api("POST", f"/api/v1/members/{args.member}/{cmd}", **kw), MEMBER_COLS, f"member {cmd}")
    elif cmd == "config":
        params = {"cluster_id": args.cluster_id} if args.cluster_id else {}
        if args.set:
            try:
                cfg = json.loads(args.set.read_text())
            except (OSError, ValueError) as exc:
                raise InvalidInput(f"--set {args.set}: {exc}") from None
            out = api("PUT", "/api/v1/config", params=params,
                      json={"config": cfg, "expected_version": args.expected_version})
        else:
            out = api("GET", "/api/v1/config", params=params)
        if args.json:
            print(json.dumps(out, indent=2, sort_keys=True))
        else:
            _print(args, out, [("scope", "scope"), ("version", "version")], "dynamic config")
            from rich.console import Console
            from rich.json import JSON

            Console().print(JSON(json.dumps(out["config"])))
    elif cmd == "join-token":
        body = {"name": args.name, "cluster_id": args.cluster_id, "ttl_seconds": args.ttl}
        out = api("POST", "/api/v1/join-tokens", json=body)
        _print(args, out, [("id", "id"), ("name", "name"), ("cluster", "cluster_id"), ("expires", "expires_at"),
                           ("token (shown once)", "token")], "join token")
    return 0
