"""``remora peer`` (the daemon), ``remora peer hosts-toml`` and ``remora peer status``.

:func:`register_peer` only builds parsers; the daemon's modules (aiohttp, grpc) are imported when a
command runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PEER_EPILOG = """\
A per-node P2P daemon. containerd pulls through it as a registry mirror (see `remora peer hosts-toml`);
blobs are cut into pieces that peers fetch from each other, as the scheduler directs, instead of all
from the registry. Every blob is sha256-verified before containerd gets it; with no scheduler (or the
scheduler down) the peer simply fetches from the registry itself.

examples:
  # a node of a cluster: mirror for containerd on loopback, pieces served to peers on the node address
  # over mutual TLS (certificate from `remora certs issue --role peer --host-id node-17 --ip 10.0.1.17`)
  remora peer --tls-dir /etc/remora/tls --scheduler 10.0.0.5:8002 --scheduler 10.0.0.6:8002 \\
      --advertise 10.0.1.17 --registry docker.io --registry ghcr.io --label zone=eu-1a --label rack=r12

  # alone, no scheduler: a caching pull-through mirror of one registry (no mesh to protect)
  remora peer --insecure-plain-mesh --upstream registry.local:5000 --plain-http registry.local:5000 \\
      --data-dir /tmp/peer

  # keep at most 20 GiB of pieces; blobs unused for 3 days go first
  remora peer --scheduler sched:8002 --gc-high 20GiB --gc-low 16GiB --gc-ttl 3d

  # schedulers and settings from the manager (it hands out the schedulers of the best-matching cluster)
  remora peer --tls-dir /etc/remora/tls --manager https://10.0.0.2:8080 \
      --manager-token-file /etc/remora/join-token --advertise 10.0.1.17 --idc hz1 --registry docker.io

  remora peer hosts-toml --registry docker.io --registry ghcr.io      # point containerd at it
  remora peer status                                                  # what it is doing

endpoints on --listen: /v2/ (mirror), /metrics (Prometheus), /_remora/status (JSON), /healthz
endpoints on --upload-listen: /pieces/<digest>/<index> (other peers), /healthz

the mesh: with --tls-dir the upload port serves pieces only over mutual TLS to peers of the cluster CA,
and the scheduler and parents are dialled with the same certificate (rotated files are picked up
without a restart). The mirror (--listen) stays plain HTTP on loopback: containerd and the snapshotter
reach it there and do not present client certificates. --insecure-plain-mesh runs the mesh without
TLS (any host that reaches the upload port gets any piece it names): it says so in the log and in
`remora peer status` (mesh: PLAIN). One of the two is required.

listeners: the mirror on 127.0.0.1, the upload port on the --advertise address (else the address of
the route toward the scheduler, else 127.0.0.1). Nothing listens on 0.0.0.0 unless you write it.

registries: the mirror fetches only from --upstream and the --registry hosts; a request for another
(containerd's ?ns=, or the X-Remora-Upstream header) is refused with 403 before any connection is made.
"""

HOSTS_EPILOG = """\
Writes <dir>/<registry>/hosts.toml for each --registry: the peer first (pull, resolve), the registry as
the fallback server. containerd must have the directory as its registry config_path (the command
prints the stanza); `ctr images pull --hosts-dir DIR` uses it directly.

examples:
  remora peer hosts-toml --registry docker.io --registry ghcr.io
  remora peer hosts-toml --registry 10.0.0.9:5000 --plain-http 10.0.0.9:5000 --containerd 1.6
  remora peer hosts-toml --registry _default --mirror http://127.0.0.1:65001 --dir /etc/containerd/certs.d
  remora peer hosts-toml --registry docker.io --print          # show, do not write
"""

STATUS_EPILOG = """\
examples:
  remora peer status                               # the peer on 127.0.0.1:65001
  remora peer status --address 10.0.1.17:65001
  remora peer status --json | jq '.tasks[] | select(.state != "done")'
"""


PREHEAT_EPILOG = """\
examples:
  remora peer preheat registry.local:5000/app:1-remora --wait          # bootstrap + hot blob
  remora peer preheat registry.local:5000/app:1-remora --all --wait    # every blob
  remora peer preheat registry.local:5000/app:1-remora --pull --wait   # + ready in containerd (the peer
                                                                       #   runs with --runtime-pull-api)
  remora peer preheat 10.0.0.9:5000/web:2 --address 10.0.1.17:65001 --preheat-token-file /etc/remora/preheat-token
"""


def register_peer(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("peer", help="P2P peer daemon: registry mirror for containerd, pieces from peers",
                              description="Run the remora peer daemon (registry mirror + P2P piece exchange).",
                              epilog=PEER_EPILOG, formatter_class=fmt)
    net = p.add_argument_group("addresses")
    net.add_argument("--listen", default="127.0.0.1:65001", metavar="HOST:PORT",
                     help="mirror API for containerd, /metrics, status (default %(default)s)")
    net.add_argument("--upload-listen", default=":65002", metavar="HOST:PORT",
                     help="piece server for other peers (default %(default)s: the --advertise address, else the "
                          "route toward the scheduler, else 127.0.0.1; port 0 = any free port)")
    net.add_argument("--advertise", default="", metavar="IP[:PORT]",
                     help="address other peers dial for pieces (default: the upload address, or the "
                          "route toward the scheduler)")
    net.add_argument("--scheduler", action="append", default=[], metavar="HOST:PORT",
                     help="scheduler gRPC address; repeat (or comma-separate) for a cluster. None: "
                          "registry only")
    mgr = p.add_argument_group("manager (schedulers and dynamic config from `remora manager`)")
    mgr.add_argument("--manager", default="", metavar="URL",
                     help="manager URL (https:// with --tls-dir: mutual TLS with this node's certificate; http:// "
                          "only with --insecure-plain-mesh). The schedulers come from it (refreshed every keepalive "
                          "interval; --scheduler is used until its first answer) and its dynamic config applies "
                          "without restart; the last answers are kept in DATA_DIR/manager-state.json")
    mgr.add_argument("--manager-token-file", type=Path, default=None, metavar="FILE",
                     help="join token for the manager ('remora cluster join-token NAME')")
    mgr.add_argument("--seed-peer", action="store_true", help="register with the manager as a seed peer")
    mgr.add_argument("--idc", default="", help="IDC this node is in (the manager matches clusters by it)")
    mgr.add_argument("--location", default="", metavar="COUNTRY|REGION|ZONE",
                     help="location of this node (the manager matches clusters by it)")
    mesh = p.add_argument_group("mesh security (one is required)")
    sec = mesh.add_mutually_exclusive_group()
    sec.add_argument("--tls-dir", type=Path, default=None, metavar="DIR",
                     help="mutual TLS with peers and schedulers: DIR/ca.pem (cluster CA), DIR/cert.pem + "
                          "DIR/key.pem (role peer; its host id is the default --host-id); re-read on change")
    sec.add_argument("--insecure-plain-mesh", action="store_true",
                     help="no TLS between peers and with the scheduler: anyone who reaches the upload port "
                          "gets any piece (labs, a single node)")
    reg = p.add_argument_group("registry")
    reg.add_argument("--registry", action="append", default=[], metavar="REGISTRY", dest="registries",
                     help="a registry the mirror may fetch from when containerd names it (?ns=); repeat. "
                          "--upstream is always allowed; any other is refused (403)")
    reg.add_argument("--upstream", default="", metavar="REGISTRY",
                     help="registry used when a request names none (containerd names it with ?ns=)")
    reg.add_argument("--plain-http", action="append", default=[], metavar="REGISTRY",
                     help="talk plain HTTP to this registry (loopback registries always are)")
    reg.add_argument("--registry-config", type=Path, default=None, metavar="CONFIG_JSON",
                     help="docker config (file or directory) with this node's registry credentials, "
                          "helpers included (default $DOCKER_CONFIG or ~/.docker; REMORA_USERNAME/"
                          "REMORA_PASSWORD win); used only by this node, never sent to peers")
    node = p.add_argument_group("node")
    node.add_argument("--data-dir", type=Path, default=Path("/var/lib/remora/peer"),
                      help="piece store (default %(default)s)")
    node.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                      help="locality label given to the scheduler (zone=, rack=, region=...)")
    node.add_argument("--host-id", default="", help="stable machine id (default: hostname + machine-id)")
    node.add_argument("--peer-id", default="", help="peer id (default: host id + pid + random)")
    tune = p.add_argument_group("tuning")
    tune.add_argument("--upload-slots", type=int, default=16, help="concurrent uploads (default %(default)s)")
    tune.add_argument("--upload-bandwidth", default="0", metavar="SIZE",
                      help="bytes/s this node can upload, told to the scheduler (e.g. 100MiB; 0 = unknown)")
    tune.add_argument("--concurrency", type=int, default=8,
                      help="pieces fetched at once per blob from other peers, plus one from a seed that is still "
                           "streaming the blob (default %(default)s)")
    tune.add_argument("--piece-timeout", default="10s", metavar="DURATION",
                      help="a parent that does not start answering by then, or sends a piece slower than "
                           "--min-piece-rate per upload it serves, is blocklisted (default %(default)s)")
    tune.add_argument("--min-piece-rate", default="1MiB", metavar="SIZE",
                      help="bytes/s per upload below which a parent crawls (default %(default)s)")
    tune.add_argument("--max-parent-failures", type=int, default=6,
                      help="parents that failed (blocklisted or busy) before going to the registry "
                           "(default %(default)s)")
    tune.add_argument("--scheduler-timeout", default="2s", metavar="DURATION",
                      help="deadline of a scheduler RPC (default %(default)s)")
    tune.add_argument("--upstream-timeout", default="30s", metavar="DURATION",
                      help="registry read timeout (default %(default)s)")
    gc = p.add_argument_group("garbage collection")
    gc.add_argument("--gc-ttl", default="24h", metavar="DURATION",
                    help="evict blobs unused this long (default %(default)s)")
    gc.add_argument("--gc-high", default="85%", metavar="SIZE|PCT",
                    help="start evicting above this store size or filesystem usage (default %(default)s)")
    gc.add_argument("--gc-low", default="75%", metavar="SIZE|PCT", help="evict down to this (default %(default)s)")
    gc.add_argument("--gc-interval", default="60s", metavar="DURATION", help="how often GC runs (default %(default)s)")
    reg.add_argument("--offline-tag-max-age", default="24h", metavar="DURATION",
                     help="while the registry cannot be reached, answer a tag from the kept record only if the "
                          "registry confirmed it within this long (default %(default)s; 0 = never by tag; "
                          "by digest the kept manifest is always served)")
    node.add_argument("--preheat-token-file", type=Path, default=None, metavar="FILE",
                      help="bearer token that authorizes the preheat task API (/api/v1/tasks on --listen; "
                           "the manager and `remora peer preheat` present it); without it the API is off")
    rt = p.add_argument_group(
        "container runtime (a preheat with --pull also makes the image ready in containerd)",
        "Off unless --runtime-pull-api is given. A preheat task that asks for it (`remora peer\n"
        "preheat --pull`, `remora place plan --preheat --pull`, a manager job with --pull) then has\n"
        "this node's remora snapshotter pull the image into containerd once its blobs are here (the\n"
        "snapshotter's pull service, as `remora pull` does), so a kubelet with imagePullPolicy:\n"
        "IfNotPresent starts it at once. Remora images only. The sockets and the namespace are this\n"
        "node's settings; a request cannot choose them.")
    rt.add_argument("--runtime-pull-api", type=Path, default=None, metavar="SOCKET",
                    help="the snapshotter's pull service (`remora snapshotter --api-address`, usually "
                         "/run/remora/api.sock); without it a preheat with pull is refused")
    rt.add_argument("--runtime-address", default="/run/containerd/containerd.sock", metavar="SOCKET",
                    help="containerd's socket (default %(default)s)")
    rt.add_argument("--runtime-namespace", default="k8s.io", metavar="NS",
                    help="containerd namespace the image goes to (default %(default)s: the kubelet's)")
    rt.add_argument("--runtime-snapshotter", default="remora", metavar="NAME",
                    help="the remora snapshotter's proxy plugin name in containerd (default %(default)s)")
    p.set_defaults(func=run_daemon)

    sub = p.add_subparsers(dest="peer_command", metavar="SUBCOMMAND")
    h = sub.add_parser("hosts-toml", help="write containerd hosts.toml files that use the peer",
                       description="Write containerd hosts.toml files that pull through the local peer.",
                       epilog=HOSTS_EPILOG, formatter_class=fmt)
    h.add_argument("--registry", action="append", default=[], metavar="REGISTRY",
                   help="registry host[:port] to mirror (repeat); _default = every registry (containerd >= 1.7)")
    h.add_argument("--mirror", default="http://127.0.0.1:65001", help="the peer's mirror URL (default %(default)s)")
    h.add_argument("--dir", type=Path, default=Path("/etc/containerd/certs.d"),
                   help="containerd's registry config_path (default %(default)s)")
    h.add_argument("--containerd", choices=("1.6", "1.7", "2.x"), default="2.x",
                   help="containerd version the files are for (default %(default)s)")
    h.add_argument("--dial-timeout", default="200ms", help="how long containerd tries to reach the peer (1.7+)")
    h.add_argument("--plain-http", action="append", default=[], metavar="REGISTRY",
                   help="this registry's fallback server is plain HTTP")
    h.add_argument("--print", action="store_true", dest="print_only", help="print the files instead of writing them")
    h.set_defaults(func=run_hosts_toml)

    s = sub.add_parser("status", help="show what a running peer is doing",
                       description="Show a running peer's tasks, traffic and failures.",
                       epilog=STATUS_EPILOG, formatter_class=fmt)
    s.add_argument("--address", default="127.0.0.1:65001", help="the peer's --listen address (default %(default)s)")
    s.add_argument("--json", action="store_true", help="raw JSON")
    s.set_defaults(func=run_status)

    ph = sub.add_parser("preheat", help="have a running peer fetch an image into its store ahead of time",
                        description="Ask a running peer to fetch an image's blobs into its store (through the "
                                    "mesh, every blob verified). For a remora image the bootstrap and the hot "
                                    "blob come first; --all fetches the rest too. The peer must run with "
                                    "--preheat-token-file; give the same token here.",
                        epilog=PREHEAT_EPILOG, formatter_class=fmt)
    ph.add_argument("image", help="image reference, e.g. registry.local:5000/app:1-remora")
    ph.add_argument("--all", action="store_true", dest="all_blobs",
                    help="remora image: every blob, not only the bootstrap and the hot blob")
    ph.add_argument("--pull", action="store_true",
                    help="remora image: then have the node's snapshotter pull it into containerd (the peer's "
                         "--runtime-pull-api), so the first start needs no pull at all")
    ph.add_argument("--address", default="127.0.0.1:65001", help="the peer's --listen address (default %(default)s)")
    ph.add_argument("--preheat-token-file", type=Path, default=None, metavar="FILE",
                    help="the peer's preheat token (default $REMORA_PREHEAT_TOKEN)")
    ph.add_argument("--wait", action="store_true", help="show progress until the task ends (exit 1 if it fails)")
    ph.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                    help="with --wait (default %(default)s)")
    ph.add_argument("--json", action="store_true", help="print the task status as JSON")
    ph.set_defaults(func=run_preheat)


def build_config(args):
    from .config import PeerConfig, Watermark, default_host_id, parse_duration, parse_hostport, parse_labels, parse_size

    schedulers = [a.strip() for item in args.scheduler for a in item.split(",") if a.strip()]
    advertise_ip, advertise_port = parse_hostport(args.advertise, default_port=0) if args.advertise else ("", 0)
    host_id = args.host_id
    if not host_id and args.tls_dir:
        from remora.pki.tls import TLSFiles, load_material

        # The scheduler lets a peer speak only for the host its certificate names: use that name.
        host_id = load_material(TLSFiles.in_dir(args.tls_dir)).identity.host_id or ""
    return PeerConfig(
        tls_dir=args.tls_dir, insecure_plain_mesh=args.insecure_plain_mesh,
        registries=[r.strip() for item in args.registries for r in item.split(",") if r.strip()],
        data_dir=args.data_dir, listen=parse_hostport(args.listen), upload_listen=parse_hostport(args.upload_listen),
        advertise_ip=advertise_ip, advertise_port=advertise_port, schedulers=schedulers, upstream=args.upstream,
        plain_http=args.plain_http, registry_config=args.registry_config, labels=parse_labels(args.label),
        host_id=host_id or default_host_id(), peer_id=args.peer_id, upload_slots=args.upload_slots,
        upload_bandwidth=parse_size(args.upload_bandwidth), concurrency=args.concurrency,
        piece_timeout=parse_duration(args.piece_timeout), min_piece_rate=parse_size(args.min_piece_rate),
        max_parent_failures=args.max_parent_failures, scheduler_timeout=parse_duration(args.scheduler_timeout),
        upstream_timeout=parse_duration(args.upstream_timeout), gc_ttl=parse_duration(args.gc_ttl),
        gc_high=Watermark.parse(args.gc_high), gc_low=Watermark.parse(args.gc_low),
        gc_interval=parse_duration(args.gc_interval), offline_tag_max_age=parse_duration(args.offline_tag_max_age),
        preheat_token_file=args.preheat_token_file, runtime_pull_api=args.runtime_pull_api,
        runtime_address=args.runtime_address, runtime_namespace=args.runtime_namespace,
        runtime_snapshotter=args.runtime_snapshotter,
        manager=args.manager, manager_token_file=args.manager_token_file, seed_peer=args.seed_peer, idc=args.idc,
        location=args.location)


def run_daemon(args) -> int:
    from .daemon import run

    return run(build_config(args))


def run_hosts_toml(args) -> int:
    from . import hoststoml

    if args.print_only:
        for registry in args.registry or []:
            print(f"# {args.dir / registry / 'hosts.toml'}")
            print(hoststoml.render(registry, args.mirror, args.containerd, args.dial_timeout,
                                   registry in args.plain_http))
        if not args.registry:
            hoststoml.write(args.dir, [], args.mirror)  # raises the usage error
        return 0
    for path in hoststoml.write(args.dir, args.registry, args.mirror, args.containerd, args.dial_timeout,
                                args.plain_http):
        print(f"wrote {path}")
    print("\ncontainerd must use this directory; in its config.toml:\n"
          + hoststoml.CONFIG_HINT[args.containerd].format(dir=args.dir), file=sys.stderr)
    return 0


def run_status(args) -> int:
    import json

    from .status import fetch_status, render

    status = fetch_status(args.address)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        render(status)
    return 0


def run_preheat(args) -> int:
    import json
    import time

    from remora.errors import RegistryError
    from remora.taskapi import PreheatClient, new_task_id, progress_of, read_token

    client = PreheatClient(args.address, read_token(args.preheat_token_file))
    task_id = new_task_id()
    status = client.create(task_id, args.image, args.all_blobs, pull=args.pull)
    if not args.wait:
        print(json.dumps(status, indent=2) if args.json
              else f"preheat task {task_id} on {client.url}: {status['state']}")
        return 0
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    deadline = time.monotonic() + args.timeout
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  disable=args.json) as progress:
        bar = progress.add_task(f"preheat {args.image}", total=None)
        try:
            while status["state"] in ("queued", "running"):
                if time.monotonic() > deadline:
                    client.cancel(task_id)
                    raise RegistryError(f"preheat of {args.image} did not finish in {args.timeout:g}s (cancelled)")
                time.sleep(0.2)
                status = client.get(task_id)
                done, total = progress_of(status)
                progress.update(bar, completed=done, total=total or None)
        except KeyboardInterrupt:
            client.cancel(task_id)
            raise
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        done, total = progress_of(status)
        pulled = status.get("pull") or {}
        print(f"{status['state']}: {len(status.get('blobs') or [])} blobs, {done} of {total} bytes verified"
              + (f"; in containerd as {pulled['name']} ({pulled['manifest_digest'][:19]})"
                 if pulled.get("state") == "done" else "")
              + (f": {status['error']}" if status.get("error") else ""))
    return 0 if status["state"] == "succeeded" else 1
