"""Remote-layer handler for remora images: the glue between the snapshots core and the lazy FUSE fs.

A remora image's layers are data blobs plus one bootstrap layer (docs/format.md). containerd prepares
them bottom-up, each with the layer's ``containerd.io/snapshot/remora.*`` annotations as labels:

* a **data blob** layer is committed as an empty remote snapshot: nothing to mount, its bytes are
  read through the bootstrap layer's mount;
* the **bootstrap** layer (the top one) is mounted lazily: the bootstrap is fetched once (digest
  verified, cached under the snapshotter root), and a FUSE process serves the image's whole merged
  tree from it, fetching chunks on demand from the configured mirrors/peers, then the registry.

So the container's rootfs is overlay(upper, bootstrap mount, empty blob dirs): exactly the merged
image, with no layer downloaded. Where the blobs live is taken, in order, from the labels
``containerd.io/snapshot/cri.image-ref`` (CRI, nerdctl, Docker), the stargz-style
``containerd.io/snapshot/remote/stargz.reference`` (``ctr-remote images rpull``), then remora's own
``containerd.io/snapshot/remora.repository`` annotation (any client that forwards annotations).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from remora.errors import InvalidInput
from remora.format import annotations as ann
from remora.snapshotter.remote import RemoteLayer, RemoteLayerHandler

log = logging.getLogger(__name__)

IMAGE_REF_LABELS = (
    "containerd.io/snapshot/cri.image-ref",
    "containerd.io/snapshot/remote/stargz.reference",
)


def image_location(labels: Mapping[str, str]) -> tuple[str, str]:
    """``(registry host, repository)`` of the image a layer belongs to, from its labels."""
    from remora.reference import ImageRef, parse_reference

    for key in IMAGE_REF_LABELS:
        ref = labels.get(key)
        if ref:
            parsed = parse_reference(ref)
            if isinstance(parsed, ImageRef):
                return parsed.host, parsed.repository
    where = labels.get(ann.REPOSITORY)
    if where and "/" in where:
        host, repo = where.split("/", 1)
        return host, repo
    raise InvalidInput("remora layer without an image reference: none of the labels "
                       f"{', '.join(IMAGE_REF_LABELS + (ann.REPOSITORY,))} is set")


ACCESS_CHECK_TTL = 60.0  # a passed registry access check (see _check_access) is trusted this long
PRECONNECT_TTL = 30.0  # a pre-opened registry connection older than this is not trusted to be alive
PRECONNECT_WAIT = 2.0  # longest wait for a preconnect still in progress (its timeout is 5 s)
LAYER_DIGEST_LABELS = (
    "containerd.io/snapshot/cri.layer-digest",
    "containerd.io/snapshot/remote/stargz.digest",
)


class RemoraLayerHandler(RemoteLayerHandler):
    """Mount remora images lazily. ``mirrors`` are peer/mirror base URLs tried before the registry."""

    def __init__(self, root: Path | str, mounts=None, mirrors: Sequence[str] = (), insecure: bool = False,
                 cache_limit: int = 10 << 30, standby: bool = True, early_prefetch_limit: int = 256 << 20,
                 credentials=None, cache_isolation: str = "namespace", spares: int = 2):
        from remora.snapshotter.layout import StateLayout
        from remora.snapshotter.mount import MountManager
        from remora.snapshotter.staging import StagingArea

        self.root = Path(root)
        layout = StateLayout(self.root)
        self.bootstraps = layout.bootstraps
        self.bootstraps.mkdir(parents=True, exist_ok=True)
        # standby: a warm spare fs process takes the next mount (no interpreter start on the cold path)
        self.mounts = mounts or MountManager(layout.lazy, layout.cache, cache_limit, standby=standby,
                                             cache_isolation=cache_isolation, spares=spares)
        self.mirrors = list(mirrors)
        self._mirrors_down: dict[str, float] = {}  # mirror -> when it may be asked again (MirrorFirstStore)
        self.insecure = insecure
        # a remora.snapshotter.credentials CredentialResolver: captured CRI pull auth, secrets by
        # reference; None (or nothing found): the registry client's own lookup (the node's docker config)
        self.credentials = credentials
        self._access_checked: dict[tuple[str, str, str], float] = {}  # (host, repo, bootstrap) -> when it passed
        self._access_locks: dict[tuple[str, str, str], threading.Lock] = {}  # one check in flight per key
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        # digests whose file an fs process validated (validate_bootstrap) in this run; any other file in
        # bootstraps/ is validated by the next mount's fs process before it is opened
        self._validated_bootstraps: set[str] = set()
        self._mounted_repos: set[tuple[str, str]] = set()  # (host, repo) mounted by this run: see warm()
        # early prefetch: hot blobs streamed from their layer's Prepare on (see staging.py)
        self.staging = StagingArea(layout.staging, limit=early_prefetch_limit)
        self._hot_blobs: dict[str, set[str]] = {}  # bootstrap digest -> hot blobs of that image
        self._warmed: set[tuple[str, str]] = set()
        self._preconnected: dict[str, tuple[object, float, threading.Thread]] = {}  # host -> (client, when, connecting)
        for stale in self.bootstraps.glob(".tmp-*"):  # left by a crash mid-fetch
            shutil.rmtree(stale, ignore_errors=True)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until a first pull would find everything warm: the spare fs process imported (the
        pull service opens its socket only then; see MountManager.wait_spare). Never raises: past
        ``timeout`` (a very loaded node) the first mount just pays for what is still missing."""
        wait = getattr(self.mounts, "wait_spare", None)
        if wait is None or not getattr(self.mounts, "_standby_enabled", False):
            return  # no warm spare to wait for: mounts start their own process
        t0 = time.monotonic()
        try:
            ok = wait(timeout)
        except Exception as exc:  # noqa: BLE001 - readiness is an optimisation, never a reason to fail
            log.warning("waiting for the spare fs process: %s", exc)
            ok = False
        log.info("spare fs process %s after %.3fs", "ready" if ok else "NOT ready (mounts start cold)",
                 time.monotonic() - t0)

    # -- RemoteLayerHandler ----------------------------------------------------------------------
    async def mount(self, layer: RemoteLayer) -> bool:
        info = ann.parse_labels(layer.labels)
        if info is None:
            return False
        if info.role == "blob":
            # A base layer's chain ID is its diff_id, and a data blob's diff_id is its digest: that
            # names the hot blob (always the first layer) for clients that send no digest label.
            self.warm(layer.labels, layer.target if not layer.parent else "", reason="its Prepare")
            if not layer.parent:
                # the image's first Prepare: refuse here, before anything is committed, when the
                # registry refuses us (a bootstrap refused later would leave committed layers behind
                # that containerd's GC may remove under the retry's feet); it overlaps the warm-up
                try:
                    host, repo = image_location(layer.labels)
                except InvalidInput:
                    return True
                await asyncio.to_thread(self._check_access, host, repo, info.bootstrap)
            return True
        host, repo = image_location(layer.labels)
        size = int(layer.labels.get(ann.BOOTSTRAP_SIZE, "0") or 0)
        t0 = time.monotonic()
        boot = await asyncio.to_thread(self._bootstrap_with_credentials, host, repo, info.bootstrap, size)
        t1 = time.monotonic()
        part = self._cache_partition(layer.snapshot_id, layer.namespace, host, repo)
        with self._lock:
            validate = info.bootstrap not in self._validated_bootstraps
        # Not validated yet (fetched by this run, or left by an earlier one): the fs process validates
        # it before it opens it or mounts anything, off this process's CPU and GIL; an invalid one
        # refuses the Prepare with validate's InvalidInput and is not kept.
        try:
            await asyncio.to_thread(self.mounts.mount, layer.snapshot_id, boot, layer.mountpoint,
                                    self._sources(host, repo, info.bootstrap), cache_partition=part,
                                    **({"validate_bootstrap": True} if validate else {}))
        except InvalidInput:
            if validate:
                await asyncio.to_thread(self._drop_bootstrap, info.bootstrap)
            raise
        with self._lock:
            if validate:
                self._validated_bootstraps.add(info.bootstrap)
            self._mounted_repos.add((host, repo))
        log.info("lazily mounted %s/%s (bootstrap %s) at %s: bootstrap %.3fs, mount %.3fs", host, repo,
                 info.bootstrap[:19], layer.mountpoint, t1 - t0, time.monotonic() - t1)
        return True

    def warm(self, labels: Mapping[str, str], digest: str = "", reason: str = "") -> None:
        """Start fetching, in the background, what this image's Prepares will need: its bootstrap, and
        a hot blob's bytes (``remora.prefetch-bytes``) into the staging area. Non-blocking, idempotent,
        never raises: it is a head start, and the Prepare that needs the bytes fetches or waits itself.

        Called by the data blob layers' Prepares (the bootstrap layer comes last) and by the pull
        service as soon as it has read the manifest. The layer's blob digest is taken from ``digest``
        or the labels CRI/``remora pull`` (``cri.layer-digest``) and ``ctr-remote`` send. ``reason``
        (who asks) goes into the log line."""
        try:
            info = ann.parse_labels(labels)
            if info is None:
                return
            host, repo = image_location(labels)
        except InvalidInput as exc:
            log.debug("no warm-up: %s", exc)
            return
        hot = ann.prefetch_bytes(labels) if info.role == "blob" else 0
        blob = digest or next((labels[k] for k in LAYER_DIGEST_LABELS if labels.get(k)), "")
        size = int(labels.get(ann.BOOTSTRAP_SIZE, "0") or 0)
        with self._lock:
            first = (host, info.bootstrap) not in self._warmed
            self._warmed.add((host, info.bootstrap))
        need_bootstrap = first and not self._bootstrap_path(info.bootstrap).exists()
        if first:
            # The first layer's Prepare checks the registry lets this image's repository be read (a
            # HEAD on a new connection: two round trips on the pull's critical path). Started now,
            # it is done, or in flight, when that Prepare comes; the Prepare still waits for a
            # passed check (or makes its own) before it answers.
            threading.Thread(target=self._check_access_quietly, args=(host, repo, info.bootstrap),
                             name="warm-access-check", daemon=True).start()
        with self._lock:
            # Another version of this image is mounted here: its chunks are in the cache, and a new
            # version's hot blob (a new digest as soon as one prefetched file changed) is mostly the
            # same chunks. Staging it would download all of it (8 MB for a one-line change measured
            # on bench_cold_start.py's update scenario); the mount's prefetch takes the cached chunks
            # and fetches only the changed ones.
            updating = (host, repo) in self._mounted_repos
        if hot and blob.startswith("sha256:") and updating:
            log.info("warm-up from %s: no staging of hot blob %s: %s/%s is mounted already (an update: its "
                     "prefetch reads the cached chunks)", reason or "a caller", blob[:19], host, repo)
        if hot and blob.startswith("sha256:") and not updating:
            from remora.snapshotter.sources import open_source

            # One connection: the bootstrap first (the mount waits for it; sharing the link with
            # the hot blob starved it), then the hot blob on the same kept-alive connection.
            client = self._take_client(host, repo)
            sources = [open_source(s, client) for s in self._sources(host, repo)]
            downloaded = threading.Event()
            with self._lock:
                self._hot_blobs.setdefault(info.bootstrap, set()).add(blob)
            # the hot blob's request goes out as soon as the bootstrap's bytes are in (its
            # decompression and fsync overlap the hot blob's first round trip)
            before = (lambda: downloaded.wait(60)) if need_bootstrap else None
            if self.staging.start(blob, hot, sources, first=before, scope=f"{host}/{repo}"):
                log.info("warm-up from %s: %s bytes of hot blob %s%s", reason or "a caller", hot, blob[:19],
                         f" after bootstrap {info.bootstrap[:19]}" if need_bootstrap else "")
                if need_bootstrap:
                    threading.Thread(target=self._bootstrap_quietly,
                                     args=(host, repo, info.bootstrap, size, client, downloaded.set),
                                     name="warm-bootstrap", daemon=True).start()
                return
            for source in sources:  # not staged (already, or no room): nobody else uses them
                source.close()
        if need_bootstrap:
            log.info("warm-up from %s: bootstrap %s", reason or "a caller", info.bootstrap[:19])
            client = self._take_client(host, repo)

            def fetch() -> None:
                try:
                    self._bootstrap_quietly(host, repo, info.bootstrap, size, client)
                finally:
                    client.close()
            threading.Thread(target=fetch, name="warm-bootstrap", daemon=True).start()

    def _take_client(self, host: str, repo: str = ""):
        """The registry client :meth:`preconnect` opened for ``host`` (fresh enough), else a new one;
        a new one with the repository's credentials when the resolver has some (the preconnected
        client would answer the registry's challenge with the node's)."""
        from remora.registry.client import RegistryClient

        creds = self._credentials_for(host, repo) if repo else None
        if creds is not None:
            return RegistryClient(host, plain_http=True if self.insecure else None, credentials=creds,
                                  retries=1, backoff=0.1)
        with self._lock:
            client, when, connecting = self._preconnected.pop(host, (None, 0.0, None))
        if client is not None and time.monotonic() - when <= PRECONNECT_TTL:
            # still connecting: waiting costs less than the round trip a second connection would
            connecting.join(PRECONNECT_WAIT)
            return client
        if client is not None:
            client.close()
        return RegistryClient(host, plain_http=True if self.insecure else None, retries=1, backoff=0.1)

    def preconnect(self, host: str) -> None:
        """Open a connection to registry ``host`` now, in the background, for the warm-up that will
        follow (the pull service calls this before it reads the manifest): the bootstrap request then
        skips the connection's set-up round trip. Never raises."""
        from remora.registry.client import RegistryClient

        try:
            client = RegistryClient(host, plain_http=True if self.insecure else None, retries=1, backoff=0.1)
        except Exception as exc:  # noqa: BLE001 - a bad host fails the pull itself, with its message
            log.debug("no preconnect to %s: %s", host, exc)
            return

        def connect() -> None:
            try:  # any answer (200, 401) leaves an open kept-alive connection in the client's pool
                client.session.get(f"{client.base_url}/v2/", timeout=5).close()
            except Exception as exc:  # noqa: BLE001
                log.debug("preconnect to %s: %s", host, exc)

        thread = threading.Thread(target=connect, name="preconnect", daemon=True)
        thread.start()  # before it is published: whoever takes the client may join it at once
        with self._lock:
            old = self._preconnected.pop(host, (None,))[0]
            self._preconnected[host] = (client, time.monotonic(), thread)
        if old is not None:  # never used (e.g. the image was already here)
            old.close()

    def _bootstrap_quietly(self, host: str, repo: str, digest: str, size: int, client=None,
                           on_downloaded=None) -> None:
        try:
            self._bootstrap(host, repo, digest, size, client, on_downloaded)
        except Exception as exc:  # noqa: BLE001 - the bootstrap layer's Prepare fetches again and reports
            log.info("early bootstrap fetch of %s failed: %s", digest[:19], exc)
        finally:
            if on_downloaded is not None:
                on_downloaded()  # whatever happened, whoever waits for it goes on

    def _credentials_for(self, host: str, repo: str):
        """This repository's credentials from the resolver, or None (the client's own lookup)."""
        if self.credentials is None:
            return None
        return self.credentials.resolve(host, repo)

    def _bootstrap_with_credentials(self, host: str, repo: str, digest: str, size: int) -> Path:
        """:meth:`_bootstrap` with the repository's credentials; a registry that refuses us fails the
        Prepare (:class:`RemoteLayerRefused`) instead of letting containerd apply the bootstrap layer
        as a plain tar, which would give a root fs without the application."""
        from remora.errors import AuthError
        from remora.registry.client import RegistryClient
        from remora.snapshotter.credentials.resolver import missing_credentials_message
        from remora.snapshotter.remote import RemoteLayerRefused

        # Whoever serves the bytes (this node's copy, fetched before maybe for another tenant, or a
        # mirror/peer: _bootstrap asks them first), the registry decides whether this pull may read the
        # repository, or its lazy reads would fail later, inside a running container. Usually free: the
        # image's first layer Prepare (or the warm-up) passed the same check moments ago.
        self._check_access(host, repo, digest)
        client = RegistryClient(host, plain_http=True if self.insecure else None,
                                credentials=self._credentials_for(host, repo), retries=1, backoff=0.1)
        try:
            return self._bootstrap(host, repo, digest, size, client)
        except AuthError as exc:
            raise RemoteLayerRefused(missing_credentials_message(host, repo, str(exc))) from None
        finally:
            client.close()

    def _check_access_quietly(self, host: str, repo: str, digest: str) -> None:
        try:
            self._check_access(host, repo, digest)
        except Exception as exc:  # noqa: BLE001 - the Prepare checks again and reports
            log.info("early access check of %s/%s: %s", host, repo, exc)

    def _check_access(self, host: str, repo: str, digest: str) -> None:
        """Raise :class:`RemoteLayerRefused` unless the registry lets us read ``repo`` (a HEAD of its
        bootstrap with the repository's credentials); passed checks are remembered for
        ACCESS_CHECK_TTL. A registry that cannot be reached passes: reads may come from cache/peers.
        One check per key at a time: a caller finding one in flight (the warm-up's) waits for it."""
        key = (host, repo, digest)
        with self._lock:
            if len(self._access_locks) > 4096:  # bounded: locks of checks not in flight go
                for k in [k for k, lk in self._access_locks.items() if not lk.locked()]:
                    del self._access_locks[k]
            check_lock = self._access_locks.setdefault(key, threading.Lock())
        with check_lock:  # a check already in flight (the warm-up's) is waited for, not repeated
            self._check_access_locked(host, repo, digest, key)

    def _check_access_locked(self, host: str, repo: str, digest: str, key: tuple[str, str, str]) -> None:
        from remora.errors import AuthError
        from remora.registry.client import RegistryClient
        from remora.snapshotter.credentials.criproxy import SOURCE as CAPTURED
        from remora.snapshotter.credentials.resolver import missing_credentials_message
        from remora.snapshotter.remote import RemoteLayerRefused

        with self._lock:
            if time.monotonic() - self._access_checked.get(key, -ACCESS_CHECK_TTL) < ACCESS_CHECK_TTL:
                return
        t0 = time.monotonic()
        creds = self._credentials_for(host, repo)
        if creds is not None and creds.source == CAPTURED:
            return  # a CRI pull's own credentials, which containerd has just used for this image's manifest
        try:
            with RegistryClient(host, plain_http=True if self.insecure else None, credentials=creds,
                                retries=1, backoff=0.1) as client:
                held = client.head_blob(repo, digest)
        except AuthError as exc:
            raise RemoteLayerRefused(missing_credentials_message(host, repo, str(exc))) from None
        except Exception as exc:  # noqa: BLE001 - see above
            log.info("access check of %s/%s: %s", host, repo, exc)
            return
        if held is None:  # the repository does not hold it: an image naming another's bootstrap by digest
            raise RemoteLayerRefused(f"{host}/{repo} does not hold bootstrap {digest}: refusing to mount the "
                                     "copy this node fetched for another image")
        log.info("access check of %s/%s: passed in %.3fs", host, repo, time.monotonic() - t0)
        with self._lock:
            self._access_checked[key] = time.monotonic()
            if len(self._access_checked) > 4096:  # bounded: drop the oldest half
                for old in sorted(self._access_checked, key=self._access_checked.get)[:2048]:
                    del self._access_checked[old]

    def _bootstrap_path(self, digest: str) -> Path:
        return self.bootstraps / f"{digest.replace(':', '-')}.db"

    async def unmount(self, snapshot_id: str, mountpoint: Path) -> None:
        if snapshot_id in self.mounts.ids():
            await asyncio.to_thread(self.mounts.unmount, snapshot_id)

    async def restore(self, snapshot_id: str, mountpoint: Path, labels: Mapping[str, str]) -> None:
        info = ann.parse_labels(labels)
        if info is None or info.role != "bootstrap":
            return
        if snapshot_id in self.mounts.ids():
            state = await asyncio.to_thread(self.mounts.restore_mount, snapshot_id)
            log.info("lazy mount %s: %s", snapshot_id, state)
        else:  # the record is gone (e.g. state dir wiped): mount again from the labels
            await self.mount_committed(snapshot_id, mountpoint, labels, info)

    async def mount_committed(self, snapshot_id: str, mountpoint: Path, labels: Mapping[str, str], info) -> None:
        host, repo = image_location(labels)
        size = int(labels.get(ann.BOOTSTRAP_SIZE, "0") or 0)
        boot = await asyncio.to_thread(self._bootstrap_with_credentials, host, repo, info.bootstrap, size)
        await asyncio.to_thread(self.mounts.mount, snapshot_id, boot, mountpoint, self._sources(host, repo),
                                cache_partition=self._cache_partition(snapshot_id, None, host, repo))

    async def ensure_healthy(self, snapshot_id: str, mountpoint: Path) -> None:
        """A dead or hung lazy mount is restored once from its record; if that fails: UNAVAILABLE."""
        from remora.snapshotter.remote import LayerUnavailable

        if snapshot_id not in self.mounts.ids():
            return  # a data-blob layer: nothing is mounted there
        health = await asyncio.to_thread(self.mounts.check, snapshot_id)
        if health.ok:
            return
        log.warning("lazy mount %s is %s (%s): restoring it", snapshot_id, health.state, health.detail)
        try:
            await asyncio.to_thread(self.mounts.restore_mount, snapshot_id)
            health = await asyncio.to_thread(self.mounts.check, snapshot_id)
        except Exception as exc:  # noqa: BLE001 - reported below
            health = type(health)("dead", f"restore failed: {exc}")
        if not health.ok:
            raise LayerUnavailable(f"lazily mounted layer {snapshot_id} is {health.state}: {health.detail} "
                                   f"(log: {self.mounts.log_tail(snapshot_id, 5)!r})")

    async def close(self) -> None:
        """Mounts outlive the snapshotter on purpose: running containers keep their root fs. Only the
        warm spare process goes."""
        await asyncio.to_thread(self.mounts.close)

    # -- helpers --------------------------------------------------------------------------------
    async def may_share(self, snapshot_id: str, namespace: str | None, labels: Mapping[str, str]) -> None:
        """Called before an existing remote snapshot answers another Prepare (maybe another namespace's):
        with cache isolation, a lazy mount of another partition is shared only with a tenant whose
        registry would give it the whole image (isolation.py); raises RemoteLayerRefused otherwise."""
        from remora.registry.client import RegistryClient
        from remora.snapshotter.isolation import prove_access
        from remora.snapshotter.remote import RemoteLayerRefused

        info = ann.parse_labels(labels)
        if info is None or info.role != "bootstrap" or getattr(self.mounts, "cache_isolation", "none") == "none" \
                or snapshot_id not in self.mounts.ids():
            return
        host, repo = image_location(labels)
        theirs = self.mounts.spec(snapshot_id)
        if theirs.cache_partition == self._cache_partition(snapshot_id, namespace, host, repo) \
                and not theirs.cache_partition.startswith("snap-"):
            return

        def prove() -> None:
            with RegistryClient(host, plain_http=True if self.insecure else None,
                                credentials=self._credentials_for(host, repo), retries=1, backoff=0.1) as client:
                prove_access(client, repo, info.bootstrap, theirs.bootstrap)
        try:
            await asyncio.to_thread(prove)
        except PermissionError as exc:
            raise RemoteLayerRefused(f"layer {info.bootstrap[:19]} is mounted for another tenant (cache partition "
                                     f"{theirs.cache_partition!r}) and this one may not read the image: {exc}"
                                     ) from None

    def _cache_partition(self, snapshot_id: str, namespace: str | None, host: str, repo: str) -> str:
        """The mount's chunk cache partition (--cache-isolation; MountManager.partition_for)."""
        isolation = getattr(self.mounts, "cache_isolation", "none")
        creds = self._credentials_for(host, repo) if isolation == "credential" else None
        return self.mounts.partition_for(snapshot_id, namespace, creds, host) if isolation != "none" else ""

    def _sources(self, host: str, repo: str, bootstrap: str = ""):
        """Blob sources of a mount, in order: this image's staged hot blobs (if ``bootstrap`` names an
        image being warmed), mirrors/peers, the registry."""
        from remora.snapshotter.sources import SourceSpec

        with self._lock:
            hot = sorted(self._hot_blobs.get(bootstrap, ()))
        staged = self.staging.staged(hot, scope=f"{host}/{repo}") if hot else {}  # only what this repo gave us
        creds = self._credentials_for(host, repo)
        # the repository's own credentials go to the registry and to a peer on this node (which checks
        # them against the registry before it serves a private blob), never to a remote host's peer
        secret = {} if creds is None else {"username": creds.username or "", "password": creds.password or "",
                                           "identity_token": creds.identity_token or ""}
        return ([SourceSpec.staging(str(self.staging.dir_for(f"{host}/{repo}")), staged)] if staged else []) + \
               [SourceSpec.peer(m, repo, host, plain_http=self.insecure, **(secret if _is_local_url(m) else {}))
                for m in self.mirrors] + \
               [SourceSpec.registry(host, repo, insecure=self.insecure, **secret)]

    def _bootstrap(self, host: str, repo: str, digest: str, size: int, client=None, on_downloaded=None) -> Path:
        """The bootstrap database for ``digest``, fetched and verified once, then reused.
        ``client``: a RegistryClient to fetch it with (its connection is then kept for more work);
        ``on_downloaded``: called when its bytes are in, before they are unpacked and made durable.

        Asked of the mirrors/peers first, then the registry, like the chunks (MirrorFirstStore): after
        a preheat the node's peer holds it and the registry serves no byte of it. Each source's bytes
        are spooled and checked against the digest before anything is kept; a mirror that fails or
        lies is skipped. Whether this client may read the repository is still the registry's call
        (_check_access, before the mount)."""
        from remora import oci
        from remora.errors import RemoraError
        from remora.format.bootstrap_layer import fetch_bootstrap_layer
        from remora.imagestore import RegistryStore, open_store
        from remora.reference import parse_reference
        from remora.snapshotter.sources import MirrorFirstStore

        final = self._bootstrap_path(digest)
        with self._lock:
            lock = self._fetching.setdefault(digest, threading.Lock())
        with lock:  # concurrent Prepares of one image (CRI pulls layers in parallel): fetch once
            if final.exists():  # validated, or to be validated by the mount's fs process (mount())
                return final
            where = f"{host}/{repo}@{digest}"
            store = RegistryStore(parse_reference(where), client) if client is not None else \
                open_store(where, plain_http=True if self.insecure else None)
            mirrored = MirrorFirstStore(store, self.mirrors, lambda: self._credentials_for(host, repo),
                                        insecure=self.insecure, down=self._mirrors_down)
            tmpdir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.bootstraps))
            try:
                if not size:
                    size = store.client.head_blob(repo, digest) or 0
                desc = oci.Descriptor(ann.BOOTSTRAP_MEDIA_TYPE, digest, size)
                t0 = time.monotonic()
                downloaded = [t0]

                def got_bytes() -> None:
                    downloaded[0] = time.monotonic()
                    if on_downloaded is not None:
                        on_downloaded()
                # streamed to disk and bounded (a bomb stops here): never whole in this process's
                # memory. Validated by the fs process that mounts it, before it opens it (mount()).
                for source, opener in mirrored.openers(desc):
                    try:
                        path = fetch_bootstrap_layer(opener, desc.size, tmpdir, f"bootstrap-{digest[7:19]}.db",
                                                     got_bytes, where=f"bootstrap layer {digest}")
                    except RemoraError as exc:
                        if source is None:  # the registry: its error is the Prepare's
                            raise
                        mirrored.skipped(source, f"bootstrap {digest[:19]}", exc)
                        continue
                    origin = "the registry" if source is None else source.name
                    break
                t1 = time.monotonic()
                with open(path, "rb") as f:  # durable before it becomes visible under its final name
                    os.fsync(f.fileno())
                os.replace(path, final)
                # the warm spare, which will most likely mount it, validates it now, off this
                # process's CPU and overlapping the pull's other Prepares
                early = getattr(self.mounts, "prevalidate", lambda _path: False)(final)
                log.info("bootstrap %s: %d bytes from %s downloaded in %.3fs, unpacked in %.3fs, fsync %.3fs "
                         "(validated by its fs process%s)", digest[:19], size, origin, downloaded[0] - t0,
                         t1 - downloaded[0], time.monotonic() - t1, ", the spare started now" if early else "")
            finally:
                mirrored.close_mirrors()
                if client is None:
                    store.close()
                shutil.rmtree(tmpdir, ignore_errors=True)
        return final

    def _drop_bootstrap(self, digest: str) -> None:
        """Forget a bootstrap its fs process refused: the file goes, so nothing mounts it later."""
        final = self._bootstrap_path(digest)
        with self._lock:
            lock = self._fetching.setdefault(digest, threading.Lock())
        with lock:
            with self._lock:
                if digest in self._validated_bootstraps:  # another mount validated this very file
                    return
            final.unlink(missing_ok=True)


def _is_local_url(url: str) -> bool:
    """A mirror on this node (loopback): the only kind that may see a pod's registry credentials."""
    from urllib.parse import urlsplit

    from remora.registry.auth import is_loopback

    return is_loopback(urlsplit(url).netloc)
