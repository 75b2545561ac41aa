"""``remora snapshotter``: run the containerd proxy snapshotter."""
from __future__ import annotations

import argparse
import logging

DESCRIPTION = """\
Serve containerd's snapshots API on a unix socket: an overlayfs snapshotter (same mounts as
containerd's built-in one) with crash-safe metadata, onto which remora mounts lazily loaded remote
layers. containerd uses it through a proxy plugin in its config.toml (version 2):

  [proxy_plugins.remora]
    type = "snapshot"
    address = "/run/remora/snapshotter.sock"

then `ctr images pull --snapshotter remora IMAGE`, `ctr run --snapshotter remora ...`, or for
Kubernetes [plugins."io.containerd.grpc.v1.cri".containerd] snapshotter = "remora" with
disable_snapshot_annotations = false.

It also serves the pull service on --api-address: `remora pull IMAGE` hands the pull to this
already-warm process instead of loading gRPC and the registry client itself (a fresh process spends
~0.3-0.6 s on that), and the snapshotter starts fetching the image's bootstrap as soon as the
manifest is known. HTTP on a unix socket, mode 0600: POST /v1/pull (NDJSON progress, then the
result), GET /v1/version. See docs/snapshotter.md, "Pull service".

State lives under --root: metadata.db (SQLite, WAL) and snapshots/<id>/{fs,work}. A crash
(even kill -9) at any moment leaves every snapshot either as before or as after the operation;
directories left behind are removed at the next start.
"""

EPILOG = """\
examples:
  remora snapshotter --root /var/lib/remora --address /run/remora/snapshotter.sock
  remora snapshotter --root /tmp/snap --address /tmp/snap.sock --api-address /tmp/snap-api.sock
  remora snapshotter --root /tmp/snap --address /tmp/snap.sock --api-address '' --log-level debug
  curl --unix-socket /run/remora/api.sock http://remora/v1/version     # is the pull service up?

stop it with SIGTERM (in-flight requests finish first). Start it before containerd and stop it
after; containerd reconnects with backoff if it restarts.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("snapshotter", help="run the containerd remote snapshotter",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/var/lib/remora/snapshotter", metavar="DIR",
                   help="state directory (default: %(default)s)")
    p.add_argument("--address", default="/run/remora/snapshotter.sock", metavar="SOCKET",
                   help="unix socket to serve on; containerd's proxy_plugins address (default: %(default)s)")
    p.add_argument("--api-address", default="/run/remora/api.sock", metavar="SOCKET",
                   help="unix socket (mode 0600) of the pull service that 'remora pull' uses so that it "
                        "need not load gRPC itself; '' turns it off (default: %(default)s)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None,
                   help="log level of the snapshotter (default: warning, or as -v/-vv say)")
    p.add_argument("--mirror", action="append", default=[], metavar="URL",
                   help="peer or registry mirror tried before the registry for lazy range reads, bootstraps, "
                        "and the manifests and config of a pull (every byte digest-checked; tags only from a "
                        "mirror on this node; e.g. http://127.0.0.1:65001, a local 'remora peer'); repeatable")
    p.add_argument("--cache-size", default="10G", metavar="SIZE",
                   help="chunk cache size limit, shared by all lazily mounted images (default 10G)")
    p.add_argument("--cache-isolation", choices=["none", "namespace", "credential"], default="namespace",
                   help="who may read a chunk another image put in the cache: 'namespace' (default) gives each "
                        "containerd namespace its own cache partition, 'credential' each registry identity, "
                        "'none' shares one cache by digest (fewest bytes; any image naming a digest reads it)")
    p.add_argument("--early-prefetch-limit", default="256M", metavar="SIZE",
                   help="bytes of hot blobs (the layer marked remora.prefetch-bytes) streamed into "
                        "ROOT/staging from that layer's Prepare on, before the bootstrap is mounted; "
                        "0 turns early prefetch off (default 256M)")
    p.add_argument("--fs-spares", type=int, default=2, metavar="N",
                   help="warm fs processes kept started (imports done) for the next lazy mounts, 1-16: a "
                        "burst of N containers starting at once on this node pays no interpreter start "
                        "(default 2; each idle spare is a Python process of ~40 MB)")
    p.add_argument("--plain-http", action="store_true",
                   help="fetch lazily mounted images over plain HTTP even from non-loopback registries")
    p.add_argument("--metrics-address", metavar="HOST:PORT", default="",
                   help="serve Prometheus metrics (lazy mounts, fetches, cache, FUSE latency) at "
                        "http://HOST:PORT/metrics (default: off)")
    p.add_argument("--no-lazy", action="store_true",
                   help="never mount remora images lazily (behave exactly like the overlayfs snapshotter)")
    p.add_argument("--cri-proxy", metavar="SOCKET", default="",
                   help="serve a CRI pass-through on this unix socket (mode 0600) for kubelet's "
                        "--image-service-endpoint: each PullImage's credentials (imagePullSecrets) are kept "
                        "in memory for that repository's lazy mounts, then the call goes to --cri-upstream "
                        "(default: off; docs/credentials.md)")
    p.add_argument("--cri-upstream", metavar="SOCKET", default="/run/containerd/containerd.sock",
                   help="containerd's CRI socket the --cri-proxy forwards to (default: %(default)s)")
    p.add_argument("--credentials-config", metavar="FILE", default="",
                   help="JSON/YAML naming Kubernetes dockerconfigjson secrets to read registry credentials "
                        "from: {\"secrets\": [\"NS/NAME\"], \"kubeconfig\": PATH (default: in-cluster)}")
    p.add_argument("--credentials-ttl", metavar="SECONDS", type=float, default=3600.0,
                   help="how long credentials captured by --cri-proxy are kept (default: %(default)s)")
    p.set_defaults(func=run)
    from .stats import register as register_stats

    register_stats(subparsers)
    from .credentials.credprovider import register as register_credential_provider

    register_credential_provider(subparsers)


def _serve_metrics(address: str, handler) -> None:
    """Prometheus /metrics on a thread of its own: a scrape reads stats files, never an fs process."""
    from prometheus_client import CollectorRegistry, start_http_server

    from remora.cache import ChunkCache
    from remora.errors import UsageError

    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise UsageError(f"--metrics-address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9128")
    registry = CollectorRegistry()
    if handler is not None:
        registry.register(handler.mounts.collector(ChunkCache(handler.mounts.cache_dir, handler.mounts.cache_limit)))
        from .metrics import StagingCollector

        registry.register(StagingCollector(handler.staging.counters))
    start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)


#: The GIL switch interval of the snapshotter process. Python's default (5 ms) favours throughput; here
#: many threads mostly wait on sockets (gRPC handlers, the pull service, bootstrap and hot-blob fetches)
#: and a thread woken by data should not wait up to 5 ms for a busy one to yield: measured on a cold
#: start, 0.5 ms brings the bootstrap and the hot blob in ~40 ms sooner (benchmarks/README.md).
SWITCH_INTERVAL = 0.0005


def run(args: argparse.Namespace) -> int:
    import asyncio
    import sys

    from remora.format.chunker import parse_size

    from .server import serve

    if args.log_level:
        logging.getLogger().setLevel(args.log_level.upper())
    if not 1 <= args.fs_spares <= 16:
        from remora.errors import UsageError

        raise UsageError(f"--fs-spares {args.fs_spares}: expected 1 to 16 warm fs processes")
    sys.setswitchinterval(SWITCH_INTERVAL)
    handler = None
    from .credentials.resolver import CredentialResolver, keychains_from_config
    from .credentials.store import CredentialStore

    store = CredentialStore(ttl=args.credentials_ttl)
    resolver = CredentialResolver(store, keychains_from_config(args.credentials_config))
    if not args.no_lazy:
        from .lazy_layers import RemoraLayerHandler

        handler = RemoraLayerHandler(args.root, mirrors=args.mirror, insecure=args.plain_http,
                                     cache_limit=parse_size(args.cache_size),
                                     cache_isolation=args.cache_isolation, spares=args.fs_spares,
                                     early_prefetch_limit=parse_size(args.early_prefetch_limit),
                                     credentials=resolver)
    if args.metrics_address:
        _serve_metrics(args.metrics_address, handler)
    proxy = None
    if args.cri_proxy:  # before the snapshots socket: kubelet's first pull may come at once
        from .credentials.criproxy import CRIProxy

        proxy = CRIProxy(args.cri_proxy, args.cri_upstream, store).start()
    try:
        asyncio.run(serve(args.root, args.address, handler, api_address=args.api_address or None))
    finally:
        if proxy is not None:
            proxy.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m remora.snapshotter.cli --root DIR --address SOCKET``: the command without the
    rest of the ``remora`` CLI (what test harnesses and service managers start)."""
    parser = argparse.ArgumentParser(prog="remora-snapshotter")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["snapshotter", *(argv if argv is not None else __import__("sys").argv[1:])])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
