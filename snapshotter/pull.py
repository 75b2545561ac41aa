"""``remora pull``: make a remora image runnable in containerd without downloading its layers.

Why a command of our own: ``ctr images pull`` (containerd 1.6/1.7) sends no labels to the
snapshotter, so a remote snapshotter cannot tell it is being asked for a remote layer and containerd
downloads and unpacks every layer. ``remora pull`` does what containerd's unpacker does for a remote
snapshotter, through containerd's gRPC services:

1. resolve the reference (for an OCI-fallback index, the entry marked as remora's);
2. under a lease, store manifest and config in containerd's content store, with the GC labels
   that tie them together (``containerd.io/gc.ref.content.config``, ``...l.<i>``);
3. for each layer bottom-up, ``Prepare(key="extract-<random> <chainID>", parent=<parent chainID>)``
   on the snapshotter with ``containerd.io/snapshot.ref=<chainID>`` and the layer's annotations;
   remora answers ALREADY_EXISTS once the layer is mounted lazily (data blobs: an empty snapshot;
   the bootstrap layer: the FUSE mount of the merged image). A layer that is not remote is an error;
4. point the image record at the manifest and label the config with
   ``containerd.io/gc.ref.snapshot.<snapshotter>=<top chainID>`` so containerd's GC keeps the
   snapshots while the image exists; delete the lease.

After that ``ctr run --snapshotter remora IMAGE`` finds the image unpacked and starts at once.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from remora.pullapi import DEFAULT_API_ADDRESS, NoService, PullResult, pull_via_service, service_request

DESCRIPTION = """\
Pull a remora image into containerd WITHOUT downloading its layers: the remora snapshotter
mounts it lazily and file contents are fetched on first read. Only the manifest, the config
and the (small) bootstrap are fetched up front.

The image must have been converted with 'remora convert' (for an OCI-fallback index the remora
entry is used). For ordinary images use 'ctr images pull --snapshotter remora': the snapshotter
then behaves exactly like overlayfs.

The remora snapshotter must be configured in containerd as a proxy plugin (see
'remora snapshotter --help') and running.

Where the pull runs. The running snapshotter serves a pull service on a unix socket
('remora snapshotter --api-address', default /run/remora/api.sock). When --api names a socket
that accepts the connection, the snapshotter does the pull (it is already warm: gRPC, protobuf and
the registry client loaded) and this command only sends the request and relays the progress; it
imports nothing but the standard library, which saves a fresh process ~0.3-0.6 s. The service's
answer is final: an error it reports is printed with the exit code a pull in this process would
have had, and is not retried here. When no service is there (no socket, connection refused,
permission denied), the pull runs in this process, as with --local, and one line on stderr says so.
"""

EPILOG = """\
examples:
  remora pull 127.0.0.1:5000/app:1-remora
  ctr run --rm --snapshotter remora 127.0.0.1:5000/app:1-remora app1 /app/start

  remora pull --address /run/containerd/containerd.sock -n k8s.io registry.local/app:2-remora
  remora pull --annotations-only registry.local/app:2-remora   # like nerdctl: no cri.* labels
  remora pull --api /tmp/snap-api.sock REF    # the pull service of 'remora snapshotter --api-address ...'
  remora pull --local REF                     # always pull in this process

labels sent to the snapshotter on each layer's Prepare:
  containerd.io/snapshot.ref                 the layer's chain ID (the remote-snapshot handshake)
  containerd.io/snapshot/remora.*            the layer's annotations (from 'remora convert')
  containerd.io/snapshot/cri.image-ref,      where the image lives (left out by
    cri.layer-digest, cri.manifest-digest     --annotations-only: remora.repository must suffice)


exit codes: 0 ok, 2 usage (containerd unreachable, layer not remote), 3 not a remora image,
4 registry auth, 5 not found, 6 registry unreachable, 7 containerd/snapshotter error (also: the
pull service died mid-pull). The same codes whether the pull ran in the service or here.
"""


SNAPSHOT_REF = "containerd.io/snapshot.ref"
SNAPSHOT_LABEL_PREFIX = "containerd.io/snapshot/"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
GC_CONFIG = "containerd.io/gc.ref.content.config"
GC_LAYER = "containerd.io/gc.ref.content.l.{}"
GC_SNAPSHOT = "containerd.io/gc.ref.snapshot.{}"
DISTRIBUTION_SOURCE = "containerd.io/distribution.source.{}"


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ``chain[0] = diff[0]``, ``chain[i] = sha256(chain[i-1] + " " + diff[i])``.

    containerd names committed layer snapshots by chain ID; ``ctr run`` finds an image "unpacked"
    when the top one exists, so ours must be computed exactly like containerd's."""
    import hashlib

    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def resolve_remora_manifest(store, platform: str = "linux/amd64"):
    """``(descriptor, manifest bytes, Manifest)`` of the remora manifest the store's reference names."""
    from remora import oci
    from remora.errors import InvalidInput
    from remora.format import annotations as ann

    desc, data = store.resolve()
    top = oci.parse_manifest_or_index(data, desc.media_type)
    if isinstance(top, oci.Index):
        candidates = [m for m in top.manifests if ann.MANIFEST_MARKER in m.annotations]
        if not candidates:
            raise InvalidInput(f"{store.ref} is an index without a remora manifest: convert it with "
                               "'remora convert', or pull it normally with 'ctr images pull --snapshotter remora'")
        want = oci.Platform.parse(platform)
        desc = next((m for m in candidates if m.platform is None or m.platform.matches(want)), None)
        if desc is None:
            raise InvalidInput(f"{store.ref} has no remora manifest for {platform}")
        data = store.get_manifest(desc)
        top = oci.parse_manifest(data, desc.media_type)
    if not ann.is_remora_manifest(top.to_dict()):
        raise InvalidInput(f"{store.ref} is not a remora image (its layers carry no remora annotations): "
                           "pull it with 'ctr images pull --snapshotter remora', or convert it with 'remora convert'")
    return desc, data, top


def layer_labels(layer, chain_id: str, ref: str, manifest_digest: str, annotations_only: bool) -> dict[str, str]:
    """The labels of one layer's Prepare, as containerd's unpacker (with CRI's handler) sends them."""
    labels = {SNAPSHOT_REF: chain_id}
    labels.update({k: v for k, v in layer.annotations.items() if k.startswith(SNAPSHOT_LABEL_PREFIX)})
    if not annotations_only:
        labels[CRI_IMAGE_REF] = ref
        labels[CRI_LAYER_DIGEST] = layer.digest
        labels[CRI_MANIFEST_DIGEST] = manifest_digest
    return labels


class Phases:
    """The pull's own timeline in the log (INFO, logger ``remora.snapshotter.pull``): one line per
    round trip or RPC on the critical path, with its duration, so that a cold start's timeline
    (``bench_cold_start.py``) shows where the pull's time goes. Silent unless INFO is enabled (the
    CLI's in-process pull logs warnings only)."""

    def __init__(self, name: str):
        import logging

        self.log = logging.getLogger(__name__)
        self.name = name
        self.on = self.log.isEnabledFor(logging.INFO)
        self.t = time.monotonic()

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        if self.on:
            self.log.info("pull of %s: %s (%.3fs)", self.name, what, now - self.t)
        self.t = now


#: How often a pull checks its layers again when one it found present was removed under it (see pull()).
PARENT_GONE_RETRIES = 2


class Heartbeat:
    """``with Heartbeat(say, what):`` around a call that may take a while (a Prepare that fetches and
    mounts the bootstrap, a slow registry): after ``every`` seconds, and every ``every`` seconds after
    that, ``say`` gets "<what>: still waiting (Ns)". A pull never sits silent for more than a
    second, and the pull service's client sees its connection is alive. Nothing is said for a call
    that is done within ``every`` (the usual, warm case: no noise on the fast path)."""

    def __init__(self, say: Callable[[str], None], what: str, every: float = 1.0):
        import threading

        self.say, self.what, self.every = say, what, every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pull-heartbeat", daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._done.wait(self.every):
            self.say(f"{self.what}: still waiting ({time.monotonic() - t0:.0f}s)")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def pull(reference: str, *, address: str, namespace: str = "default", snapshotter: str = "remora",
         plain_http: bool = False, annotations_only: bool = False, platform: str = "linux/amd64",
         timeout: float = 120.0, say: Callable[[str], None] = lambda msg: None,
         on_manifest: Callable[[list[tuple[str, dict[str, str]]]], None] | None = None,
         mirrors: Sequence[str] = ()) -> PullResult:
    """Pull ``reference`` into containerd lazily; see the module docstring. ``say`` gets progress lines.

    ``mirrors``: peer/mirror base URLs (the snapshotter's ``--mirror``) asked for the manifest and the
    config before the registry, with the chunk reads' rules (:class:`~.sources.MirrorFirstStore`):
    after a preheat the node's peer has them and the pull reads nothing from the registry.

    ``on_manifest`` (optional) is called once, as soon as the manifest is known (before the config
    is fetched and anything is written to containerd), with ``(layer digest, labels)`` for every
    layer, bottom-up, the labels being those of the layer's Prepare (:func:`layer_labels`) except
    ``snapshot.ref``, which needs the config. The pull service uses it to let the snapshotter start
    fetching the bootstrap and the hot blob while this pull is still busy: the Prepares that follow
    then find the fetches in flight. It must not block; an exception from it fails the pull.
    """

    from remora import oci
    from remora.errors import InvalidInput, StorageError, UsageError
    from remora.reference import ImageRef, parse_reference

    from .containerd_client import ContainerdClient

    started = time.monotonic()
    ref = parse_reference(reference)
    if not isinstance(ref, ImageRef):
        raise UsageError(f"{reference}: remora pull needs a registry reference (host/repository:tag), "
                         "not an OCI layout")
    # Connect to containerd first: a missing socket is the most common mistake, say it before
    # talking to the registry.
    with ContainerdClient(address, namespace, timeout=timeout) as ctd:
        name = str(ref)
        phase = Phases(name)
        where = "mirrors/registry" if mirrors else "registry"
        with _open_store(ref, plain_http, mirrors) as store, \
                Heartbeat(say, f"{name}: resolving in the {'mirrors, then the ' if mirrors else ''}registry"):
            mdesc, mdata, manifest = resolve_remora_manifest(store, platform)
            phase(f"{where}: manifest {mdesc.digest[:19]} resolved")
            if on_manifest is not None:
                on_manifest([(layer.digest, {k: v for k, v in layer_labels(layer, "", name, mdesc.digest,
                                                                          annotations_only).items()
                                             if k != SNAPSHOT_REF}) for layer in manifest.layers])
            config_bytes = store.read_blob(manifest.config)
            phase(f"{where}: config read")
        config = oci.ImageConfig.from_bytes(config_bytes)
        diff_ids = config.diff_ids
        if len(diff_ids) != len(manifest.layers):
            raise InvalidInput(f"{ref}: config has {len(diff_ids)} diff_ids for {len(manifest.layers)} layers")
        chains = chain_ids(diff_ids)
        labels_per_layer = [layer_labels(layer, chain, name, mdesc.digest, annotations_only)
                            for layer, chain in zip(manifest.layers, chains)]
        say(f"{name}: manifest {mdesc.digest[:19]}, {len(manifest.layers)} layers "
            f"({sum(layer.size for layer in manifest.layers) / 1e6:.1f} MB in the registry, fetched lazily)")
        source = {DISTRIBUTION_SOURCE.format(ref.registry): ref.repository}
        remote = reused = 0
        try:
            ctd.stat(snapshotter, chains[-1])
            phase("containerd: Stat of the top layer")
        except InvalidInput as exc:
            if "snapshotter not loaded" not in str(exc):
                raise
            raise UsageError(f"containerd at {address} has no snapshotter named {snapshotter!r}: add "
                             f'[proxy_plugins.{snapshotter}] type = "snapshot" address = "<remora socket>" to '
                             "its config and restart it, or pass --snapshotter NAME") from None
        with ctd.leased():
            phase("containerd: lease created")
            ctd.write_content(manifest.config.digest, config_bytes, source)
            mlabels = {GC_CONFIG: manifest.config.digest, **source}
            mlabels.update({GC_LAYER.format(i): layer.digest for i, layer in enumerate(manifest.layers)})
            ctd.write_content(mdesc.digest, mdata, mlabels)
            phase("containerd: config and manifest written")
            remote, reused = _prepare_all(ctd, snapshotter, manifest, chains, labels_per_layer, name, say, phase)
            ctd.update_content_labels(manifest.config.digest, {GC_SNAPSHOT.format(snapshotter): chains[-1]})
            ctd.put_image(name, mdesc.media_type, mdesc.digest, mdesc.size)
            top = ctd.stat(snapshotter, chains[-1])
            if top is None:
                raise StorageError(f"snapshot {chains[-1]} vanished right after the pull")
            phase("containerd: GC label, image record, Stat")
        phase("containerd: lease deleted")
    return PullResult(name, mdesc.digest, chains, remote, reused, time.monotonic() - started)


def _open_store(ref, plain_http: bool, mirrors: Sequence[str]):
    """The registry store of ``ref``; with ``mirrors``, wrapped to ask them first. A mirror on this
    node may answer the registry's challenge with the node's credentials, as the registry client
    would (looked up on a 401 only); a remote one never sees them."""
    from remora.imagestore import open_store

    store = open_store(ref, plain_http=True if plain_http else None)
    if not mirrors:
        return store
    from remora.registry.auth import load_credentials

    from .sources import MirrorFirstStore

    return MirrorFirstStore(store, mirrors, lambda: load_credentials(ref.host), insecure=plain_http,
                            down=_MIRRORS_DOWN)


_MIRRORS_DOWN: dict[str, float] = {}  # the pulls' shared cool-down of unreachable mirrors (MirrorFirstStore)


def register(subparsers) -> None:
    """Add ``remora pull`` (cheap: heavy imports happen in :func:`run`)."""
    p = subparsers.add_parser("pull", help="pull a remora image into containerd lazily (no layer download)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="IMAGE", help="registry reference of a remora image (host/repo:tag)")
    p.add_argument("--address", "-a", default="/run/containerd/containerd.sock", metavar="SOCKET",
                   help="containerd's gRPC socket (default: %(default)s)")
    p.add_argument("--namespace", "-n", default="default", help="containerd namespace (default: %(default)s; "
                   "Kubernetes uses k8s.io)")
    p.add_argument("--snapshotter", default="remora",
                   help="name of the remora proxy plugin in containerd's config (default: %(default)s)")
    p.add_argument("--plain-http", action="store_true",
                   help="use plain HTTP for the registry even if it is not on loopback")
    p.add_argument("--annotations-only", action="store_true",
                   help="send only snapshot.ref and the layer annotations, no cri.* labels (what nerdctl "
                        "does for snapshotters it does not know): tests the remora.repository fallback")
    p.add_argument("--platform", default="linux/amd64", help="platform of an index to pull (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="deadline of each containerd call; the bootstrap layer's Prepare fetches the "
                        "bootstrap (default: %(default)s)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the image name and manifest digest")
    p.add_argument("--api", default=DEFAULT_API_ADDRESS, metavar="SOCKET",
                   help="the snapshotter's pull service; if nothing listens there the pull runs in this "
                        "process (default: %(default)s)")
    p.add_argument("--local", action="store_true",
                   help="always pull in this process, never through the snapshotter's pull service")
    p.set_defaults(func=run)


register_pull = register


def run(args: argparse.Namespace) -> int:
    # Plain lines on stderr, no rich: this command is on the cold-start path, and importing a
    # console library would cost more than the pull's own work on a warm registry connection.
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result, where = None, ""
    if args.api and not args.local:
        # the thin path: once the service answered, nothing in this process needs the interpreter's
        # teardown (remora.cli.exit_now); a fallback to an in-process pull exits the ordinary way
        args.exit_fast = True
        try:
            result = pull_via_service(args.api, service_request(args), say, read_timeout=args.timeout + 60)
            where = " by the snapshotter's pull service"
        except NoService as exc:
            args.exit_fast = False
            if not args.quiet:
                print(f"remora pull: no pull service at {args.api} ({exc}): pulling in this process",
                      file=sys.stderr, flush=True)
    if result is None:
        result = pull(args.image, address=args.address, namespace=args.namespace, snapshotter=args.snapshotter,
                      plain_http=args.plain_http, annotations_only=args.annotations_only, platform=args.platform,
                      timeout=args.timeout, say=say)
    say(f"pulled in {result.seconds:.2f}s{where}: {result.remote_layers} layers mounted lazily, "
        f"{result.reused_layers} already present")
    print(f"{result.name} {result.manifest_digest}")
    return 0



def _prepare_all(ctd, snapshotter: str, manifest, chains: list[str], labels_per_layer, name: str, say,
                 phase) -> tuple[int, int]:
    """:func:`_prepare_layers`, again from the first layer if one it found present went away.

    A layer found "already present" may be the leftover of a pull that failed a moment ago: its lease is
    gone, and containerd's garbage collector can remove that snapshot between our Stat and the Prepare of
    the next layer on it ("parent snapshot ... does not exist"). Nothing is lost: the layers are checked
    again from the first (the vanished one is prepared anew), at most PARENT_GONE_RETRIES times."""
    from remora.errors import NotFound

    for attempt in range(PARENT_GONE_RETRIES + 1):
        try:
            return _prepare_layers(ctd, snapshotter, manifest, chains, labels_per_layer, name, say, phase)
        except NotFound as exc:
            if "parent snapshot" not in str(exc) or attempt == PARENT_GONE_RETRIES:
                raise
            say(f"a layer went away under this pull ({exc}): checking the layers again")
    raise AssertionError("unreachable")


def _prepare_layers(ctd, snapshotter: str, manifest, chains: list[str], labels_per_layer, name: str, say,
                    phase) -> tuple[int, int]:
    """Stat or (remotely) Prepare every layer in order; returns (layers mounted lazily, layers present)."""
    import secrets

    from remora.errors import UsageError
    from remora.format import annotations as ann

    from .containerd_client import AlreadyExists, Unavailable

    remote = reused = 0
    absent = False   # a layer below was missing: this chain cannot be there (its parent was not)
    for i, (layer, chain) in enumerate(zip(manifest.layers, chains)):
        role = layer.annotations.get(ann.ROLE, "?")
        what = f"layer {i + 1}/{len(chains)} {layer.digest[:19]} ({role})"
        statted = not absent
        if statted and ctd.stat(snapshotter, chain) is not None:
            reused += 1
            say(f"{what}: already present")
            continue
        absent = True
        key = f"extract-{time.time_ns()}-{secrets.token_hex(4)} {chain}"
        t0 = time.monotonic()
        try:
            with Heartbeat(say, f"{what}: preparing" + (" (the snapshotter fetches and mounts the "
                                                         "bootstrap)" if role == "bootstrap" else "")):
                ctd.prepare(snapshotter, key, chains[i - 1] if i else "", labels_per_layer[i])
        except AlreadyExists:
            remote += 1
            say(f"{what}: remote, mounted lazily in {time.monotonic() - t0:.2f}s")
            phase(f"containerd: {'Stat + Prepare' if statted else 'Prepare'} of {what}")
            continue
        except Unavailable as exc:
            raise Unavailable(f"snapshotter {snapshotter!r} is not reachable through containerd: is "
                              "'remora snapshotter' running on the proxy plugin's address? "
                              f"({exc})") from None
        # The snapshotter made an ordinary (empty) active snapshot: it did not mount the layer.
        ctd.remove(snapshotter, key)
        raise UsageError(
            f"{what} was not mounted remotely by snapshotter {snapshotter!r} (is it the remora "
            "snapshotter, running without --no-lazy? its log says why the lazy mount failed). "
            f"To download the image instead: ctr images pull --snapshotter {snapshotter} {name}")
    return remote, reused


def main(argv: list[str] | None = None) -> int:
    """``python -m remora.snapshotter.pull IMAGE ...``: the command without the rest of the CLI."""
    from remora.errors import RemoraError

    parser = argparse.ArgumentParser(prog="remora-pull")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["pull", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.func(args)
    except RemoraError as exc:
        print(f"remora pull: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
