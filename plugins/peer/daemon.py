"""The peer daemon: wires store, registry session, scheduler link, task engine and the two HTTP APIs.

Two listeners: the mirror API (for containerd and the snapshotter, on 127.0.0.1 by default, plus
``/metrics`` and ``/_remora/status``) and the upload API (for other peers, on the node's address).

The mesh is mutual TLS when ``cfg.tls_dir`` is set (:mod:`remora.pki.tls`): the upload API requires a
client certificate of the cluster CA with role ``peer`` (others fail the handshake or get 403), piece
downloads from parents and the scheduler link present this node's certificate, and rotated files are
picked up without a restart. The mirror stays plain HTTP: containerd and the snapshotter reach it on
loopback and present no client certificate. The plain mode (``insecure_plain_mesh``) is logged at
WARNING and shown in the status (``mesh: PLAIN (insecure)``).
Background loops keep the scheduler registration alive (re-announcing everything if a scheduler forgot
us), measure RTTs to the peers the scheduler asks about, and run the piece-store GC.

Usable in-process (``await PeerDaemon(cfg).start()``, as the tests do with several peers in one event
loop) or as a process (``remora peer``, :func:`run`).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time

from aiohttp import web

from remora._proto import remora_scheduler_pb2 as pb
from remora.errors import StorageError, UsageError
from remora.plugins.scheduler.client import SchedulerClient

from .config import PeerConfig
from .download import TaskManager
from .metrics import PeerMetrics
from .mirror import Mirror
from .pieces import PieceStore
from .preheat import Preheater, RuntimePull, load_token
from .upload import UploadServer
from .upstream import Upstream, registry_guard

log = logging.getLogger(__name__)

PROBE_INTERVAL = 10.0
REFRESH_EVERY = 10  # keepalives between two full re-announcements


def guess_advertise_ip(bind_host: str, schedulers: list[str]) -> str:
    """The address other peers should dial: the bind address, else the source address toward the first
    scheduler (a UDP ``connect`` picks the route without sending anything), else loopback."""
    if bind_host not in ("", "0.0.0.0", "::"):
        return bind_host
    for address in schedulers:
        host = address.rsplit(":", 1)[0].strip("[]")
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((host, 9))
                return s.getsockname()[0]
        except OSError:
            continue
    return "127.0.0.1"


class PeerDaemon:
    def __init__(self, cfg: PeerConfig):
        self.cfg = cfg
        self.metrics = PeerMetrics()
        self.store: PieceStore | None = None
        self.upstream: Upstream | None = None
        self.sched: SchedulerClient | None = None
        self.tasks: TaskManager | None = None
        self._runners: list[web.AppRunner] = []
        self._loops: list[asyncio.Task] = []
        self.mirror_port = 0
        self.upload_port = 0
        self.started_at = 0.0
        self.tls = None   # remora.pki.tls.Reloader when the mesh is mutual TLS
        self.upload: UploadServer | None = None
        self.managed = None   # managed.ManagedPeer when --manager is given
        self.schedulers_source = "flags"
        self._sched_loops_started = False

    @property
    def mesh(self) -> str:
        """How the mesh is protected, as the log and the status say it."""
        if self.tls is None:
            return "PLAIN (insecure)"
        ident = self.tls.identity
        return f"mTLS (cluster {ident.cluster}, peer {ident.host_id}, expires {ident.not_after:%Y-%m-%d})"

    @property
    def mirror_url(self) -> str:
        host = self.cfg.listen[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.mirror_port}"

    def upload_bind(self) -> str:
        """Where the upload API listens when ``--upload-listen`` names no host: the advertised address,
        else the address of the route toward the scheduler, else loopback; never every address."""
        host = self.cfg.upload_listen[0]
        if host:
            return host
        if self.cfg.advertise_ip:
            return self.cfg.advertise_ip
        return guess_advertise_ip("", self._route_targets())

    def _route_targets(self) -> list[str]:
        """Addresses whose route names this node's address: the schedulers, else the manager."""
        targets = list(self.cfg.schedulers)
        if self.cfg.manager:
            targets.append(self.cfg.manager.split("://", 1)[-1].rstrip("/"))
        return targets

    async def start(self) -> PeerDaemon:
        cfg = self.cfg
        self.started_at = time.time()
        if cfg.tls_dir is not None:
            from remora.pki.tls import Reloader, TLSFiles

            self.tls = Reloader(TLSFiles.in_dir(cfg.tls_dir))
        else:
            log.warning("mesh: PLAIN (insecure): the upload port serves any piece to anyone who reaches it and "
                        "the scheduler link is unauthenticated (--insecure-plain-mesh)")
        self.store = PieceStore(cfg.data_dir)
        self.upstream = Upstream(cfg.plain_http, cfg.registry_config, cfg.upstream_timeout,
                                 allowed=[*cfg.registries, *([cfg.upstream] if cfg.upstream else [])])
        await self.upstream.start()
        upload = self.upload = UploadServer(self.store, self.metrics, cfg.upload_slots)
        upload_app = upload.app()
        ssl_context = None
        if self.tls is not None:
            from remora.pki.tls import aiohttp_member_middleware

            # Only peers download pieces: a scheduler, manager or client certificate gets 403.
            upload_app.middlewares.append(aiohttp_member_middleware(self.tls.identity.cluster, ("peer",)))
            ssl_context = self.tls.server_context()
        bind = self.upload_bind()
        self.upload_port = await self._serve(upload_app, (bind, cfg.upload_listen[1]), "upload", ssl_context)
        advertise_ip = cfg.advertise_ip or guess_advertise_ip(bind, self._route_targets())
        host = pb.PeerHost(peer_id=cfg.peer_id, host_id=cfg.host_id, ip=advertise_ip,
                           upload_port=cfg.advertise_port or self.upload_port, labels=cfg.labels,
                           upload_slots=cfg.upload_slots, upload_bandwidth=cfg.upload_bandwidth)
        self.host = host
        self.tasks = TaskManager(cfg, self.store, self.upstream, None, self.metrics)
        if self.tls is not None:
            # Parents are dialled at the address the scheduler names: the CA and the EKU are checked, the
            # address is not (a peer's certificate need not list every address it is reached at); the
            # bytes are checked against the seed's piece digests anyway.
            self.tasks.peer_ssl = self.tls.client_context(check_hostname=False)
        upload.fresh = self.tasks.fresh_from_source
        upload.on_corrupt = self.tasks.drop_corrupt
        upload.authorize = self.tasks.authorize_piece   # pieces only to peers proving access (access.py)
        if cfg.schedulers:
            self.set_schedulers(cfg.schedulers, "flags")   # until the manager (if any) says otherwise
        if cfg.manager:
            from .managed import ManagedPeer, read_join_token

            self.managed = ManagedPeer(self, cfg.manager, read_join_token(cfg.manager_token_file))
            upload.authorize = self.managed.wrap_authorize(upload.authorize)   # + the manager's blocklist
            self.managed.apply_last_known()
        await self.tasks.start()
        self.store.entries()   # open what the last run left, so the gauge below counts it
        self.metrics.store_bytes.set_function(self.store.known_usage_bytes)
        mirror = Mirror(self.tasks, self.metrics, cfg.upstream, status_cb=self.status)
        mirror_app = mirror.app()
        mirror_app.middlewares.insert(0, registry_guard(self.upstream, self.metrics))
        if self.managed is not None:
            mirror_app.middlewares.insert(1, self.managed.mirror_guard())
        # The preheat task API (bearer token; disabled without --preheat-token-file): see preheat.py.
        runtime = None if cfg.runtime_pull_api is None else RuntimePull(
            str(cfg.runtime_pull_api), cfg.runtime_address, cfg.runtime_namespace, cfg.runtime_snapshotter)
        self.preheater = Preheater(self.tasks, cfg.upstream, load_token(cfg.preheat_token_file), runtime=runtime)
        self.preheater.add_routes(mirror_app)
        self.mirror_port = await self._serve(mirror_app, (cfg.listen[0] or "127.0.0.1", cfg.listen[1]), "mirror")
        if self.managed is not None:
            self.managed.registration["api_port"] = self.mirror_port
            await self.managed.first_round()
            self._loops.append(asyncio.get_running_loop().create_task(self.managed.run()))
        self._loops.append(asyncio.get_running_loop().create_task(self._gc_loop()))
        if self.tls is not None:
            self._loops.append(asyncio.get_running_loop().create_task(self.tls.watch(5.0)))
        log.info("peer %s: mirror on %s, upload on %s:%d (listening on %s), mesh %s", cfg.peer_id, self.mirror_url,
                 advertise_ip, host.upload_port, bind, self.mesh)
        return self

    # -- the scheduler list (flags, or the manager's, changing at run time) -------------------------------
    def current_schedulers(self) -> list[str]:
        return list(self.sched.ring.addresses) if self.sched is not None and self.tasks.sched is not None else []

    def set_schedulers(self, addresses: list[str], source: str) -> None:
        """Use these schedulers from now on (an empty list: none, every pull goes to the registry)."""
        self.schedulers_source = source
        self.metrics.schedulers.set(len(addresses))
        if list(addresses) == self.current_schedulers():
            return
        if not addresses:
            log.warning("no scheduler (%s): pulls go to the registry until one is known", source)
            self.tasks.sched = None
            return
        cfg = self.cfg
        if self.sched is None:
            self.sched = SchedulerClient(addresses, self.host, timeout=cfg.scheduler_timeout, tls=self.tls)
            new = list(self.sched.ring.addresses)
        else:
            new = self.sched.set_addresses(addresses)
        self.tasks.sched = self.sched
        log.info("schedulers (%s): %s", source, ", ".join(self.sched.ring.addresses))
        loop = asyncio.get_running_loop()
        if not self._sched_loops_started:
            self._sched_loops_started = True
            self._loops.append(loop.create_task(self._announce_stored()))
            self._loops.append(loop.create_task(self._keepalive_loop()))
            self._loops.append(loop.create_task(self._probe_loop()))
        if new:
            self._loops = [t for t in self._loops if not t.done()]   # finished registrations of earlier lists
            self._loops.append(loop.create_task(self._register(new)))

    async def _serve(self, app: web.Application, address: tuple[str, int], what: str, ssl_context=None) -> int:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, address[0], address[1], reuse_address=True, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise UsageError(f"cannot listen for the {what} API on {address[0]}:{address[1]}: "
                             f"{exc.strerror or exc}") from exc
        self._runners.append(runner)
        return site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for loop_task in self._loops:
            loop_task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self.tasks:
            await self.tasks.close()
        if self.sched:
            await self.sched.leave()
            await self.sched.close()
        if self.upstream:
            await self.upstream.close()

    # -- background loops -----------------------------------------------------------------------------
    async def _register(self, addresses: list[str]) -> None:
        """Register with new schedulers at once, not at the first blob request: until then a scheduler
        cannot hand this peer out as a parent, probe it, or tell it that its host id is shared. Retried
        (every keepalive interval, at most 5 s) until each answered once or left the list; a scheduler
        that joined later also gets what this peer holds."""
        pending = set(addresses)
        while pending:
            pending &= set(self.current_schedulers())
            answered = await self.sched.register(sorted(pending)) if pending else []
            if answered:
                log.info("registered with scheduler(s) %s", ", ".join(answered))
                await self.tasks.reannounce_all()
            pending -= set(answered)
            if pending:
                await asyncio.sleep(min(self.sched.keepalive_interval, 5.0))
    async def _announce_stored(self) -> None:
        """Blobs kept from the last run make this peer a parent at once, as soon as a scheduler answers."""
        while not await self.tasks.reannounce_all():
            await asyncio.sleep(self.sched.keepalive_interval)

    async def _keepalive_loop(self) -> None:
        """RegisterPeer is the keepalive; a scheduler that forgot us gets our pieces again at once, and
        every scheduler gets them every REFRESH_EVERY keepalives anyway (soft state, refreshed)."""
        beats, interval, last = 0, float("inf"), time.monotonic()
        while True:
            # The interval is known only once a scheduler answered, and the client forgets it while that
            # scheduler is unreachable: tick at least every second and keep the shortest interval seen.
            interval = min(interval, self.sched.keepalive_interval)
            await asyncio.sleep(min(interval, 1.0))
            if self.tasks.sched is None or time.monotonic() - last < interval:
                continue
            last = time.monotonic()
            beats += 1
            try:
                forgot = await self.sched.keepalive()
                if forgot:
                    log.warning("scheduler(s) %s had forgotten this peer: re-announcing", ", ".join(forgot))
                if forgot or beats % REFRESH_EVERY == 0:
                    await self.tasks.reannounce_all()
            except Exception:  # a keepalive must never kill the daemon
                log.exception("keepalive failed")

    async def _probe_loop(self) -> None:
        """Measure TCP connect RTTs to the peers the scheduler names (it uses them to pick parents)."""
        results: list[pb.ProbeResult] = []
        while True:
            if self.tasks.sched is None:
                await asyncio.sleep(1.0)
                continue
            try:
                targets = await self.sched.sync_probes(results)
            except Exception:
                log.exception("probe sync failed")
                targets = []
            results = list(await asyncio.gather(*(_probe(t) for t in targets[:16])))
            await asyncio.sleep(PROBE_INTERVAL)

    async def _gc_loop(self) -> None:
        while True:
            await self.gc()
            await asyncio.sleep(self.cfg.gc_interval)

    async def gc(self) -> list[str]:
        cfg = self.cfg
        try:
            evicted = self.store.gc(cfg.gc_ttl, cfg.gc_high, cfg.gc_low)
            for entry in evicted:
                task = self.tasks.tasks.pop(entry.digest, None)
                if task and self.sched:
                    self.tasks.spawn(task._sched("LeaveTask", pb.LeaveTaskRequest(peer_id=cfg.peer_id,
                                                                                  task_id=entry.digest)))
            await asyncio.to_thread(self.store.delete, evicted)
        except (OSError, StorageError) as exc:
            log.error("gc failed: %s", exc)
            return []
        self.metrics.gc_evicted.labels("gc").inc(len(evicted))
        self.metrics.store_bytes.set(self.store.usage_bytes())
        return [e.digest for e in evicted]

    # -- status ---------------------------------------------------------------------------------------
    def status(self) -> dict:
        cfg = self.cfg
        tasks = [t.status() for t in self.tasks.tasks.values()]
        known = {t["digest"] for t in tasks}
        for entry in self.store.entries():
            if entry.digest not in known and entry.has_layout:
                tasks.append({"digest": entry.digest, "state": "done" if entry.verified else "partial",
                              "size": entry.content_length, "piece_size": entry.piece_size,
                              "pieces": entry.n_pieces, "have": len(entry.have), "verified": entry.verified,
                              "from_peers": 0, "from_registry": 0, "back_to_source": "", "blocklist": {},
                              "error": ""})
        samples = {}
        for metric in self.metrics.registry.collect():
            for s in metric.samples:
                if s.name.endswith("_total"):
                    key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                                    if s.labels else "")
                    samples[key] = s.value
        schedulers = self.current_schedulers()
        registered = [a for a in self.sched.registered_with() if a in schedulers] if self.sched else []
        from .managed import fallbacks

        return {"peer_id": cfg.peer_id, "host_id": cfg.host_id, "mirror": self.mirror_url, "mesh": self.mesh,
                "mesh_tls": self.tls is not None, "registries": sorted(self.upstream.allowed),
                "registered": registered, "registered_everywhere": bool(schedulers) and
                len(registered) == len(schedulers),
                "upload": f"{self.host.ip}:{self.host.upload_port}", "schedulers": schedulers,
                "schedulers_source": self.schedulers_source, "fallbacks": fallbacks(self.metrics),
                "manager": self.managed.status() if self.managed is not None else None,
                "offline": {"kept_manifests": len(self.tasks.kept.manifests), "tags": len(self.tasks.kept.tags),
                            "tag_max_age": self.tasks.kept.tag_max_age},
                "upstream": cfg.upstream, "labels": cfg.labels, "data_dir": str(cfg.data_dir),
                "uptime": time.time() - self.started_at, "store_bytes": self.store.usage_bytes(),
                "tasks": tasks, "counters": samples}


async def _probe(target: pb.PeerHost) -> pb.ProbeResult:
    t0 = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(target.ip, target.upload_port), 2.0)
        writer.close()
        return pb.ProbeResult(peer_id=target.peer_id, rtt_us=int((time.monotonic() - t0) * 1e6), success=True)
    except (TimeoutError, OSError):
        return pb.ProbeResult(peer_id=target.peer_id, success=False)


def run(cfg: PeerConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT (the ``remora peer`` command)."""

    async def main() -> None:
        daemon = await PeerDaemon(cfg).start()
        print(f"remora peer {cfg.peer_id}: mirror {daemon.mirror_url}, upload "
              f"{daemon.host.ip}:{daemon.host.upload_port}, mesh: {daemon.mesh}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await daemon.stop()

    asyncio.run(main())
    return 0
