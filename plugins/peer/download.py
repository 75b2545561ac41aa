"""The task engine: get the pieces of a blob from parents or from the registry, verified, onto disk.

One :class:`Task` per blob digest, shared by every request for that blob (containerd's full GET, the
snapshotter's range reads, several pulls at once). A request says which pieces it needs and waits; a
single driver coroutine per task fetches what is missing. The task is the coordinator; each job is a
part of its own, as in Dragonfly's client (piece manager, dispatcher, scheduler session):

* ``picker.py`` (pure policy) picks which piece to ask from which parent: rarest first from the least
  loaded relaying child, one fresh piece at a time from the streaming seed, endgame duplicates at the end;
* ``fetcher.py`` fetches one piece from a parent, verifies it against its piece digest and judges the
  parent (blocklisted when it dies mid-piece, lies or crawls below ``min_piece_rate``);
* ``source.py`` streams missing pieces from the registry (the seed, a peer without scheduler, a child
  the mesh failed, pieces nobody in the mesh holds), hashing each as it lands;
* ``session.py`` talks to the scheduler (register, parents, reports, announcements) and sends the task
  back to the registry when the scheduler is unreachable.

The task decides between mesh and registry: children keep a pipeline of piece fetches running from the
parents the scheduler names (the view refreshed every :data:`TICK` when there is room for more); after
``max_parent_failures`` failed parents, when the scheduler says so after repeated empty scheduling
rounds, or when the mesh makes no progress for three piece timeouts, the child goes back to the registry
itself. Whole-blob reads are served only after the complete blob matched its digest; a mismatch resets
the task (all pieces dropped, the failure reported) so the next request starts clean. Downloads are
shielded from the requests that started them: a client that disconnects early does not cancel the work
other requests (or the next retry of containerd) are waiting for.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import aiohttp

from remora._proto import remora_scheduler_pb2 as pb
from remora.errors import DigestMismatch, InvalidInput, NotFound, RegistryError, RemoraError, StorageError
from remora.plugins.scheduler.client import SchedulerClient

from .access import SOURCE_HEADER, AccessChecker, AccessDenied, Grant, parse_source
from .config import PeerConfig, piece_size_for
from .fetcher import ParentFailure, PieceFetcher
from .metrics import PeerMetrics
from .offline import KeptManifests
from .picker import ENDGAME_AFTER, ENDGAME_PIECES, Holder, PiecePicker
from .pieces import BlobEntry, PieceStore, sha256_digest
from .session import SchedulerSession
from .source import Source, SourceStream
from .upstream import Upstream

__all__ = ["ENDGAME_AFTER", "ENDGAME_PIECES", "ParentFailure", "Source", "Task", "TaskManager"]

log = logging.getLogger(__name__)

#: How long wanted pieces may have no holder in the mesh (not even in flight) before this peer fetches
#: them from the registry itself (capped by the piece timeout).
ORPHAN_GRACE = 2.0
#: How often a downloading child refreshes its view of the mesh (parents and the pieces they hold): a
#: piece a sibling just finished is picked up within that much.
TICK = 0.1
#: Landed pieces are flushed to the disk in the background once this many bytes of them wait (and all of
#: them before the blob is recorded as verified; see pieces.py): the flush at the end stays short.
SYNC_BATCH_BYTES = 8 << 20
#: ... but only while it has free fetch slots and nothing to start; with every slot busy, at least this often.
MAX_VIEW_AGE = 0.5
#: Idle connections to parents are kept this long (seconds); see TaskManager.start.
PARENT_KEEPALIVE = 60.0


class Task:
    """One blob's download, shared by every request for it: decides mesh or registry, runs the driver
    that wires the parts together (picker, fetcher, source stream, scheduler session), and serves
    waiters only verified pieces (the whole blob only once it matched its digest)."""

    def __init__(self, manager: TaskManager, digest: str):
        self.m = manager
        self.cfg: PeerConfig = manager.cfg
        self.digest = digest
        self.entry: BlobEntry = manager.store.open(digest)
        self.sources: list[Source] = []
        #: the authorization of the latest client the mirror let read this blob: shown to every parent
        #: (see access.py); None until a client asked
        self.grant: Grant | None = None
        self.wanted: set[int] = set()
        self.back_to_source = False                  # decided: the registry, not the mesh
        self.source_reason = ""
        self.fetched_from_source: set[int] = set()   # pieces whose digests we publish
        self.error: BaseException | None = None
        self.started = time.time()
        self.bytes_from = {"peer": 0, "registry": 0}
        self._driver: asyncio.Task | None = None
        self._layout_lock = asyncio.Lock()
        self._verify_lock = asyncio.Lock()
        self._changed = asyncio.get_running_loop().create_future()
        self._in_flight: set[int] = set()           # pieces on their way to us (parents or the registry)
        self._progress_at = time.monotonic()
        self._seen: tuple = ()
        self._streamed_digest = ""                  # sha256 of the blob as streamed into the pieces
        # children: the whole-blob sha256 runs over the pieces as they land in order (a background task),
        # so verifying 200 MB at the end costs the few pieces that landed last, not a second pass
        self._whole: hashlib._Hash | None = None
        self._whole_next = 0                        # pieces 0.._whole_next-1 are in self._whole
        self._whole_task: asyncio.Task | None = None
        self._sync_task: asyncio.Task | None = None     # a batch of landed pieces being flushed to disk
        self._orphans_since: float | None = None    # since when wanted pieces have no holder at all
        # the child's view of the mesh (see _fetch_from_parents)
        self._parents: dict[str, pb.Parent] = {}     # peer id -> parent, with the pieces it holds
        self._holders: dict[str, Holder] = {}       # the same, as the picker sees them
        self._held: set[int] = set()                # pieces some peer of the task has or fetches
        self._view_at = 0.0
        # the parts (see the module docstring)
        self.session = SchedulerSession(manager, digest, self.entry, go_to_source=self._go_to_source,
                                        in_flight=self._in_flight, from_source=self.fetched_from_source)
        self.picker = PiecePicker(self.cfg.concurrency)
        self.fetcher = PieceFetcher(manager, digest, self.entry, picker=self.picker, session=self.session,
                                    in_flight=self._in_flight, grant=lambda: self.grant,
                                    store=lambda i, data, digest, t0: self._store(i, data, digest, "peer", t0,
                                                                                  hashed=True),
                                    go_to_source=self._go_to_source)
        self.source = SourceStream(manager.upstream, digest, self.entry, self.sources, in_flight=self._in_flight,
                                   from_source=self.fetched_from_source, announce=self.session.announce_soon,
                                   store=lambda i, data, t0, whole: self._store(i, data, "", "registry", t0, whole))

    # -- public ---------------------------------------------------------------------------------------
    @property
    def blocklist(self) -> dict[str, str]:
        """Parent peer id -> why it is not asked again for this blob."""
        return self.fetcher.blocklist

    @property
    def registered(self) -> bool:
        return self.session.registered

    @property
    def state(self) -> str:
        if self.entry.verified:
            return "done"
        if self._driver and not self._driver.done():
            return "source" if self.back_to_source else "mesh"
        return "failed" if self.error else "idle"

    async def ensure_layout(self) -> BlobEntry:
        """Learn the blob's size (scheduler, else a HEAD to the registry) and fix the piece layout."""
        if self.entry.has_layout:
            return self.entry
        self.entry.users += 1
        try:
            return await self._learn_layout()
        finally:
            self.entry.users -= 1

    async def _learn_layout(self) -> BlobEntry:
        async with self._layout_lock:
            if self.entry.has_layout:
                return self.entry
            length = piece_size = 0
            if self.session.available:
                resp = await self.session.register()
                if resp is not None:
                    length, piece_size = resp.content_length, resp.piece_size
            if not length:
                length = await self.m.head_blob(self.digest, self.sources)
            self.entry.set_layout(length, piece_size or piece_size_for(length))
            if self.back_to_source:
                self.session.announce_soon()
            return self.entry

    async def ensure(self, pieces: range | None) -> BlobEntry:
        """Wait until ``pieces`` (None: the whole blob, then verified) are on disk."""
        self.entry.users += 1  # no GC under a waiting request
        try:
            return await self._ensure(pieces)
        finally:
            self.entry.users -= 1

    async def _ensure(self, pieces: range | None) -> BlobEntry:
        entry = await self.ensure_layout()
        need = set(range(entry.n_pieces)) if pieces is None else set(pieces)
        for _ in range(3):
            driver = None
            while not need <= entry.have:
                if driver is not None and driver.done() and self.error is not None:
                    raise self.error  # the download this request waited for failed (a wake-up may be late)
                self.wanted |= need
                if self._driver is None or self._driver.done():
                    self.error = None
                    self._driver = asyncio.get_running_loop().create_task(self._drive())
                driver = self._driver
                error = await asyncio.shield(self._changed)
                if error is not None and not need <= entry.have:
                    raise error
            if pieces is None and not entry.verified and \
                    not await asyncio.shield(asyncio.ensure_future(self._verify_whole())):
                continue   # stored pieces were damaged on disk and dropped: fetch them again
            entry.touch()
            return entry
        raise StorageError(f"{self.digest}: stored pieces keep failing verification (a failing disk?)")

    async def announce(self) -> bool:
        """Tell the scheduler what we hold now (see :meth:`SchedulerSession.announce`)."""
        return await self.session.announce()

    def status(self) -> dict:
        e = self.entry
        return {"digest": self.digest, "state": self.state, "size": e.content_length, "piece_size": e.piece_size,
                "pieces": e.n_pieces, "have": len(e.have), "verified": e.verified,
                "from_peers": self.bytes_from["peer"], "from_registry": self.bytes_from["registry"],
                "back_to_source": self.source_reason if self.back_to_source else "",
                "blocklist": dict(self.blocklist), "error": str(self.error) if self.error else ""}

    # -- driver ---------------------------------------------------------------------------------------
    def _notify(self, error: BaseException | None = None) -> None:
        """Wake every waiter; ``error`` is the driver's failure (waiters not yet served raise it)."""
        waiter, self._changed = self._changed, asyncio.get_running_loop().create_future()
        waiter.set_result(error)

    async def _drive(self) -> None:
        self.entry.users += 1
        self._progress_at = time.monotonic()
        try:
            while True:
                missing = sorted(self.wanted - self.entry.have)
                if not missing:
                    break
                if self.back_to_source or not self.session.available:
                    if not self.back_to_source:
                        self._go_to_source("no_scheduler")
                    self.m.streaming.add(self.digest)
                    try:
                        await self._fetch_from_source(missing)
                    finally:
                        self.m.streaming.discard(self.digest)
                else:
                    await self._fetch_from_parents()
        except asyncio.CancelledError:
            self.error = RegistryError(f"{self.digest}: download cancelled (daemon stopping)")
            raise
        except Exception as exc:  # every waiter must learn why, whatever it is
            if not isinstance(exc, RemoraError):
                log.exception("%s: download failed", self.digest)
                exc = RegistryError(f"{self.digest}: download failed: {exc}")
            self.error = exc
            self.m.metrics.tasks.labels("failed").inc()
            if self.back_to_source:
                await self._reset(f"back-to-source failed: {exc}")
        finally:
            self.entry.users -= 1
            self.entry.flush_meta()
            self._notify(self.error)

    def _go_to_source(self, reason: str) -> None:
        if not self.back_to_source:
            log.info("%s: going back to the registry (%s)", self.digest[:19], reason)
            self.back_to_source = True
            self.source_reason = reason
            self.m.metrics.back_to_source.labels(reason).inc()

    def forget_hashes(self) -> None:
        """Drop the running whole-blob hashes (a piece they covered was dropped)."""
        self._streamed_digest = ""
        self._whole, self._whole_next = None, 0

    async def _reset(self, why: str) -> None:
        """Forget the task's pieces: the next request starts from scratch (and the scheduler knows)."""
        log.warning("%s: resetting task: %s", self.digest, why)
        self.entry.reset()
        self.forget_hashes()
        self.wanted.clear()
        self.fetched_from_source.clear()
        self.back_to_source = False
        self.session.reset()
        self.fetcher.failures = 0
        await self.session.report_result(success=False, back_to_source=True, error=why)

    # -- registry -------------------------------------------------------------------------------------
    async def _fetch_from_source(self, missing: list[int]) -> None:
        whole = await self.source.fetch(missing)
        if whole:
            self._streamed_digest = whole

    # -- mesh -----------------------------------------------------------------------------------------
    async def _fetch_from_parents(self) -> None:
        """The child's pipeline: keep up to ``concurrency`` piece fetches running, and start what the picker
        (picker.py) names whenever one lands or a tick passes, from a view of the mesh refreshed every
        :data:`TICK` (while starved) or :data:`MAX_VIEW_AGE`. Returns when nothing wanted is missing, or
        when the task went back to the registry."""
        running: dict[asyncio.Task, tuple[int, str, float]] = {}   # -> (piece, parent id, started)
        retry_ms = 0
        starved = True  # free slots and nothing to start: a fresher view of the mesh may have something
        try:
            while not self.back_to_source:
                missing = self.wanted - self.entry.have
                if not missing:
                    return
                now = time.monotonic()
                age = now - self._view_at
                tick = retry_ms / 1000 if retry_ms and not running else TICK  # the scheduler said "wait"
                if age >= MAX_VIEW_AGE or (starved and age >= tick):
                    retry_ms = await self._refresh_view()
                    if self.back_to_source:
                        return
                if await self._fetch_orphans(missing):
                    continue
                picked, starved = self.picker.pick(
                    missing, have=self.entry.have, in_flight=self._in_flight, digests=self.entry.piece_digests,
                    parents=self._holders, blocklist=self.blocklist, running=running.values(),
                    now=time.monotonic())
                for index, parent_id in picked:
                    task = asyncio.get_running_loop().create_task(self.fetcher.fetch(index, self._parents[parent_id]))
                    running[task] = (index, parent_id, time.monotonic())
                if not running:
                    # Nobody holds what we miss (yet): the seed may still be working, so wait as told. The
                    # scheduler sends us to the registry after repeated empty answers; without it noticing,
                    # no progress in the mesh for a few piece timeouts does the same.
                    if time.monotonic() - self._progress_at > 3 * self.cfg.piece_timeout:
                        self._go_to_source("stalled")
                        return
                    await asyncio.sleep(min(max(retry_ms, TICK * 1000), 1000) / 1000)
                    continue
                done, _ = await asyncio.wait(running, timeout=TICK, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    del running[task]
                    if not task.cancelled():
                        task.result()  # a piece failure is handled inside; what escapes (disk full) fails the task
                # Endgame: the other copy of a piece that just landed is no longer needed.
                for task, (index, parent_id, t0) in running.items():
                    if index in self.entry.have and not task.done():
                        self.m.metrics.piece_failures.labels("endgame_lost").inc()
                        self.fetcher.overtaken(index, self._parents.get(parent_id), t0)
                        task.cancel()
                self.session.flush()
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            self.session.flush(force=True)
            self.picker.forget_refusals()
            self._view_at = 0.0  # a later run (more pieces wanted) starts from a fresh view

    async def _refresh_view(self) -> int:
        """Ask the scheduler for parents (and what they hold); returns its retry-after in ms."""
        resp = await self.session.parents(self.blocklist)
        if resp is None or self.back_to_source:
            return 0  # scheduler down, or we are the seed / sent to the registry
        self._view_at = time.monotonic()
        self._parents = {p.host.peer_id: p for p in resp.parents
                         if p.host.peer_id not in self.blocklist and p.host.peer_id != self.m.peer_id}
        self._holders = {pid: Holder.of(p) for pid, p in self._parents.items()}
        self._held = set(resp.held)
        seen = (len(self._held), sum(len(p.pieces) for p in resp.parents),
                sum(len(p.in_flight) for p in resp.parents), sum(map(bool, self.entry.piece_digests)))
        if seen != self._seen:  # the mesh moves (the seed is still streaming): that is progress too
            self._seen, self._progress_at = seen, time.monotonic()
        return resp.retry_after_ms

    async def _fetch_orphans(self, missing: set[int]) -> bool:
        """Pieces nobody in the mesh has or is fetching (a lazy read of a part nobody read yet) come from
        the registry after a short grace, without giving up the mesh for the rest of the task. The
        scheduler's ``held`` covers every peer of the task, not only our parents: a piece the seed is
        streaming is never an orphan, even when the seed is not among the parents handed to us."""
        orphans = sorted(i for i in missing if i not in self._held and i not in self._in_flight)
        now = time.monotonic()
        if not orphans or self.session.unanswered:   # a stale view tells nothing about orphans
            self._orphans_since = None
            return False
        if self._orphans_since is None:
            self._orphans_since = now
        if now - self._orphans_since < min(ORPHAN_GRACE, self.cfg.piece_timeout):
            return False
        log.info("%s: %d piece(s) nobody holds: from the registry", self.digest[:19], len(orphans))
        self.m.metrics.back_to_source.labels("no_holder").inc()
        self._orphans_since = None
        await self._fetch_from_source(orphans)
        return True

    # -- landing and verification ---------------------------------------------------------------------
    async def _store(self, index: int, data, expected: str, source: str, t0: float, whole=None,
                     hashed: bool = False) -> str:
        """Hash a piece and, if it matches ``expected`` (``""``: whatever it hashes to, the seed's case),
        write it and record it; one trip to a worker thread for both. ``hashed``: the caller (the fetcher)
        hashed ``data`` as it arrived and it matched ``expected``; only the write is left. Returns the
        digest it hashed to (the caller treats a mismatch as a corrupt piece: nothing was written)."""
        if hashed:
            if not expected:
                raise InvalidInput(f"{self.digest}: piece {index} from a parent with no digest to check it against")
            await asyncio.to_thread(self.entry.write_piece, index, data, expected)
            digest = expected
        else:
            digest = await asyncio.to_thread(_hash_and_write, self.entry, index, data, expected, whole)
        if expected and digest != expected:
            return digest
        seconds = time.monotonic() - t0
        if index in self.entry.have:  # the endgame's other copy landed while this one was written
            return digest
        self.entry.commit_piece(index, digest)
        self._progress_at = time.monotonic()
        self.bytes_from[source] += len(data)
        mt = self.m.metrics
        mt.bytes.labels(source).inc(len(data))
        mt.pieces.labels(source).inc()
        mt.piece_seconds.labels(source).observe(seconds)
        self.session.announce_soon()
        self._notify()
        if source == "peer" and index == self._whole_next and (self._whole_task is None or self._whole_task.done()):
            self._whole_task = self.m.spawn(self._hash_ahead())
        if self.entry.unsynced * self.entry.piece_size >= SYNC_BATCH_BYTES and \
                (self._sync_task is None or self._sync_task.done()):
            self._sync_task = self.m.spawn(self._sync_batch())
        return digest

    async def _sync_batch(self) -> None:
        try:
            await asyncio.to_thread(self.entry.sync_pieces)
        except StorageError as exc:   # kept unsynced: the flush before verification tries again and fails the task
            log.warning("%s", exc)

    async def _sync(self) -> None:
        """Every landed piece on the disk: the batch being flushed in the background, then the rest."""
        if self._sync_task is not None and not self._sync_task.done():
            await asyncio.wait([self._sync_task])
        await asyncio.to_thread(self.entry.sync_pieces)

    async def _hash_ahead(self) -> str:
        """Feed the pieces that are on disk, in order from where it stopped, to the whole-blob hash;
        returns the digest once every piece is in."""
        entry = self.entry
        if self._whole is None:
            self._whole, self._whole_next = hashlib.sha256(), 0
        whole = self._whole
        buf = None  # one piece-sized buffer for every read: 200 MB of fresh memory is not free
        while self._whole_next < entry.n_pieces and self._whole_next in entry.have:
            buf = buf or bytearray(entry.piece_size)
            try:
                # Every consecutive piece already on disk in one worker-thread trip, not one trip each.
                upto = await asyncio.to_thread(_feed_pieces, entry, self._whole_next, whole, buf)
            except StorageError:  # evicted or damaged under us: the final check reads everything again
                return ""
            if whole is not self._whole:  # the task was reset meanwhile
                return ""
            self._whole_next = upto
        return "sha256:" + whole.hexdigest() if self._whole_next == entry.n_pieces else ""

    async def _whole_digest(self) -> str:
        if self._streamed_digest:
            return self._streamed_digest
        while self._whole_task is not None and not self._whole_task.done():  # one feeder at a time
            await asyncio.wait([self._whole_task])
        self._whole_task = self.m.spawn(self._hash_ahead())
        digest = await self._whole_task
        if digest == self.digest:
            return digest
        # Not the blob's digest (or a piece was replaced after it was hashed): judge on one clean pass.
        return await asyncio.to_thread(_hash_pieces, self.entry)

    async def _verify_whole(self) -> bool:
        """Check the complete blob against its digest. False: pieces damaged on disk since they were
        stored were dropped (fetch them again); a wrong blob of sound pieces resets the task and raises."""
        async with self._verify_lock:
            entry = self.entry
            if entry.verified:
                return True
            if not entry.complete:  # a concurrent verification failed and reset the task
                raise self.error or InvalidInput(f"{self.digest}: pieces went missing before verification")
            actual = await self._whole_digest()
            if actual != self.digest:
                bad = await asyncio.to_thread(entry.verify_pieces, range(entry.n_pieces))
                if bad:
                    log.error("%s: stored piece(s) %s no longer match their digests: dropped, fetching them "
                              "again", self.digest, bad[:8])
                    for index in bad:
                        self.m.drop_corrupt(self.digest, index)
                    return False
                err = self.error = DigestMismatch(f"blob {self.digest}", self.digest, actual)
                self.m.metrics.tasks.labels("digest_mismatch").inc()
                # Every piece matched the piece digest the scheduler handed out, yet the blob does not: the
                # digests are wrong. "digest_mismatch" tells the scheduler to isolate their source.
                await self._reset(f"digest_mismatch: {err}")
                raise err
            await self._sync()   # "verified" on disk promises every piece is on the disk too
            entry.mark_verified()
            self.grant = None   # nothing more to fetch: the client's credential is not kept
            self.m.metrics.tasks.labels("success").inc()
            log.info("%s: verified (%d bytes; %d from peers, %d from the registry)", self.digest[:19],
                     entry.content_length, self.bytes_from["peer"], self.bytes_from["registry"])
            # "done" announced before the result is reported: see SchedulerSession.announce_final.
            await self.session.announce_final()
            await self.session.report_result(success=True, back_to_source=self.back_to_source)
            return True


class TaskManager:
    """All tasks of the daemon, plus what they share (store, registry session, scheduler link)."""

    def __init__(self, cfg: PeerConfig, store: PieceStore, upstream: Upstream, sched: SchedulerClient | None,
                 metrics: PeerMetrics):
        self.cfg = cfg
        self.store = store
        self.upstream = upstream
        self.sched = sched
        self.metrics = metrics
        self.peer_id = cfg.peer_id
        self.tasks: dict[str, Task] = {}
        self.streaming: set[str] = set()     # digests whose pieces come from the registry right now
        self.registering: set[str] = set()   # digests whose RegisterTask is in flight
        #: the registry's answer to "may this client read that?" (mirror requests, pieces asked by peers)
        #: manifests and tag records kept for when the registry cannot be reached (offline.py)
        self.kept = KeptManifests(cfg.data_dir, cfg.offline_tag_max_age)
        self.access = AccessChecker(upstream.endpoint, timeout=min(cfg.upstream_timeout, 10.0),
                                    state_file=cfg.data_dir / "access-anonymous.json", allows=upstream.allows,
                                    plain_http=upstream.configured_plain_http, kept=self.kept.holds)
        self.warned_same_host = False
        self.peer_session: aiohttp.ClientSession | None = None
        #: the client context for parents (our member certificate) when the mesh is mutual TLS; set by
        #: the daemon before start(). None: plain HTTP (--insecure-plain-mesh).
        self.peer_ssl = None
        self._background: set[asyncio.Task] = set()

    def seeding(self, besides: str = "") -> int:
        """Blobs this peer fetches from the registry right now (seed or sent back to source), or is
        registering (it may be made their seed), other than ``besides``: told to the scheduler with every
        RegisterTask and GetParents, so that it elects a new task's seed among the peers that fetch none
        (plugins/scheduler/server.py, ``seed_elsewhere``). Registrations count so that two blobs
        registered at once with two schedulers do not both make this peer their seed."""
        busy = self.streaming | self.registering
        return len(busy) - (besides in busy)

    async def start(self) -> None:
        # One connection pool for every task and parent. Connections to a parent are kept (and reused:
        # each new one is a mutual-TLS handshake, two certificate checks) for PARENT_KEEPALIVE seconds
        # idle: a child may leave a parent alone for longer than aiohttp's default 15 s (another parent
        # had the pieces) and come back to it.
        self.peer_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=self.cfg.piece_timeout),
            connector=aiohttp.TCPConnector(limit=64, limit_per_host=8, ssl=self.peer_ssl or True,
                                           keepalive_timeout=PARENT_KEEPALIVE),
            auto_decompress=False)

    async def close(self) -> None:
        for t in list(self.tasks.values()):
            if t._driver and not t._driver.done():
                t._driver.cancel()
        for bg in list(self._background):
            bg.cancel()
        await asyncio.gather(*[t._driver for t in self.tasks.values() if t._driver], *self._background,
                             return_exceptions=True)
        if self.peer_session:
            await self.peer_session.close()
        await self.access.close()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def task(self, digest: str, source: Source | None = None, grant: Grant | None = None,
             background: bool = False) -> Task:
        """The task of ``digest`` (made if new). ``background``: nobody waits on it (a preheat); a
        foreground request for the same blob makes it foreground for good (see SchedulerSession)."""
        task = self.tasks.get(digest)
        if task is None:
            task = self.tasks[digest] = Task(self, digest)
            task.session.background = background
        elif not background:
            task.session.background = False
        if source is not None and source not in task.sources:
            task.sources.append(source)
        if grant is not None:
            task.grant = grant
        return task

    async def authorize_piece(self, digest: str, headers) -> Grant:
        """May the peer asking for a piece of ``digest`` have it? Only if the registry lets the client it
        fetches for read the blob: the child names the repository (``X-Remora-Source``) and shows that
        client's authorization (``Authorization``: none for a public repository), which is checked here
        against the registry with this peer's cache. The registry must be one this peer fetches from
        (``--upstream``/``--registry``): a peer never takes a requester's word on which registry to ask
        (a registry of the requester's would say yes to anything). Raises AccessDenied, NotFound or
        RegistryError."""
        registry, repository = parse_source(headers.get(SOURCE_HEADER, ""))
        if not self.upstream.allows(registry):
            raise AccessDenied(f"registry {registry!r} is not one this peer fetches from", status=403)
        return await self.access.check(registry, repository, "blob", digest, headers.get("Authorization"))

    def fresh_from_source(self, digest: str, index: int) -> bool:
        """Whether piece ``index`` of ``digest`` came from the registry to this peer, which is still
        downloading the blob: the upload server then sends it to one child only (see upload.py)."""
        task = self.tasks.get(digest)
        return (task is not None and self.sched is not None and not task.entry.verified
                and index in task.fetched_from_source)

    def drop_corrupt(self, digest: str, index: int) -> None:
        """A stored piece failed re-verification: forget it (the next request fetches it again) and tell
        the scheduler we no longer hold the whole blob."""
        entry = self.store.get(digest)
        if entry is None:
            return
        entry.drop_piece(index)
        self.metrics.corrupt_pieces.inc()
        task = self.tasks.get(digest)
        if task is not None:
            task.forget_hashes()
            task.fetched_from_source.discard(index)
            task.session.announce_soon()

    def forget_if_empty(self, digest: str) -> None:
        """Drop a task that never got anything (a 404, a dead registry): no state kept per bad digest."""
        task = self.tasks.get(digest)
        running = task is not None and task._driver is not None and not task._driver.done()
        if task and not task.entry.have and not task.entry.has_layout and not running:
            del self.tasks[digest]
            self.store.forget(digest)

    async def head_blob(self, digest: str, sources: list[Source]) -> int:
        """Size of a blob from the registry (HEAD with this node's credentials)."""
        last: Exception | None = None
        for source in reversed(sources):
            try:
                resp = await self.upstream.request("HEAD", source.registry, source.blob_path(digest),
                                                   scope=source.scope)
            except NotFound as exc:
                last = exc
                continue
            resp.release()
            if resp.content_length is None:
                raise RegistryError(f"{digest}: registry sent no Content-Length for the blob")
            return resp.content_length
        raise last or NotFound(f"{digest}: not in the mesh and no repository known to fetch it from")

    async def reannounce_all(self) -> bool:
        """Refresh the schedulers' soft state with what we hold: at start (blobs kept from the last
        run), when a scheduler says it forgot us, and every few keepalives (a scheduler that restarted
        while unreachable never gets to say so). An announcement joins the task implicitly and has no
        scheduling side effects. Returns False when no scheduler took it (try again later)."""
        if self.sched is None:
            return True
        for entry in self.store.entries():
            if entry.verified and entry.digest not in self.tasks:
                self.task(entry.digest)
        for task in sorted(self.tasks.values(), key=lambda t: not t.entry.verified):
            if task.entry.have and not await task.announce():
                return False
        return True


def _hash_and_write(entry: BlobEntry, index: int, data, expected: str, whole) -> str:
    """In a worker thread (hashlib and file writes let go of the GIL, so they overlap the network on a
    second core): the piece digest, feeding the running whole-blob hash on the way, and the piece on disk
    if the digest is the ``expected`` one (or nothing is expected). Only verified bytes reach the disk."""
    if whole is not None:
        whole.update(data)
    digest = sha256_digest(data)
    if not expected or digest == expected:
        entry.write_piece(index, data, digest)
    return digest


def _feed_pieces(entry: BlobEntry, index: int, whole, buf: bytearray) -> int:
    """Feed pieces ``index``, ``index + 1``, ... to ``whole`` while they are on disk (``entry.have`` is
    only tested for membership here, which is safe while the loop thread adds to it); returns the first
    piece not fed."""
    while index < entry.n_pieces and index in entry.have:
        whole.update(entry.read_piece_into(index, buf))
        index += 1
    return index


def _hash_pieces(entry: BlobEntry) -> str:
    h = hashlib.sha256()
    for i in range(entry.n_pieces):
        h.update(entry.read_piece(i))
    return "sha256:" + h.hexdigest()
