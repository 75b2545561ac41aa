"""The task engine: get the pieces of a blob from parents or from the registry, verified, onto disk.

One :class:`Task` per blob digest, shared by every request for that blob (containerd's full GET, the
snapshotter's range reads, several pulls at once). A request says which pieces it needs and waits; a
single driver coroutine per task fetches what is missing:

* **children** keep a pipeline of piece fetches running over HTTP from the upload endpoints of the
  parents the scheduler names (refreshed every 100 ms when there is room for more): a piece only the
  streaming seed has is asked from it by one child (the seed refuses second copies, see upload.py), every
  other piece comes from the least loaded other child holding it, rarest first, so children relay to
  each other what they got first. Every piece is checked against the piece digest published by the peer
  that fetched it from the registry. A parent that fails (dies mid-piece,
  returns corrupt bytes, crawls below ``min_piece_rate``) is blocklisted for the task and the piece is
  fetched elsewhere; after ``max_parent_failures`` failed parents, when the scheduler says so after
  repeated empty scheduling rounds, or when the mesh makes no progress for three piece timeouts, the
  child goes back to the registry itself.
* **the seed** (told so by the scheduler), or any peer whose scheduler is down, streams the missing
  ranges from the registry with this node's credentials, cuts them into pieces, hashes each piece and
  announces pieces and digests to the scheduler as they land, so children start before it is done.

Whole-blob reads are served only after the complete blob matched its digest; a mismatch resets the task
(all pieces dropped, the failure reported) so the next request starts clean. Downloads are shielded from
the requests that started them: a client that disconnects early does not cancel the work other
requests (or the next retry of containerd) are waiting for.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp

from remora._proto import remora_scheduler_pb2 as pb
from remora.errors import DigestMismatch, InvalidInput, NotFound, RegistryError, RemoraError, StorageError
from remora.plugins.scheduler.client import SchedulerClient, SchedulerRequestError, SchedulerUnavailable

from .access import SOURCE_HEADER, AccessChecker, AccessDenied, Grant, parse_source
from .config import RELAYED_HEADER, UPLOADS_HEADER, PeerConfig, piece_size_for
from .metrics import PeerMetrics
from .pieces import BlobEntry, PieceStore, sha256_digest
from .upstream import Upstream

log = logging.getLogger(__name__)

#: How long wanted pieces may have no holder in the mesh (not even in flight) before this peer fetches
#: them from the registry itself (capped by the piece timeout).
ORPHAN_GRACE = 2.0
#: How often a downloading child refreshes its view of the mesh (parents and the pieces they hold): a
#: piece a sibling just finished is picked up within that much.
TICK = 0.1
#: ... but only while it has free fetch slots and nothing to start; with every slot busy, at least this often.
MAX_VIEW_AGE = 0.5
#: A parent that answered 503 (no free upload slot) is left alone this long.
BUSY_BACKOFF = 0.2
#: A seed that refused a fresh piece (it sent it to another child moments ago) is not asked for that piece
#: again before this; meanwhile the piece comes from that child.
RELAYED_BACKOFF = 0.5
#: Endgame: once every missing piece is being fetched and at most this many are missing, a piece whose
#: fetch has run this long is also asked from a second parent; the first copy to arrive wins, the other
#: fetch is cancelled.
ENDGAME_PIECES = 8
ENDGAME_AFTER = 0.5
#: Results are reported in batches of this many, or at least every FLUSH_EVERY seconds.
FLUSH_BATCH = 16
FLUSH_EVERY = 0.5


@dataclass(frozen=True)
class Source:
    """Where the registry has the blob: the repository a client asked for it through."""

    registry: str
    repository: str

    def blob_path(self, digest: str) -> str:
        return f"/v2/{self.repository}/blobs/{digest}"

    @property
    def scope(self) -> str:
        return f"repository:{self.repository}:pull"


class ParentFailure(Exception):
    """A piece could not be had from a parent; ``reason`` is what the scheduler is told."""

    def __init__(self, reason: str, detail: str, blocklist: bool = True):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.blocklist = blocklist


class Task:
    def __init__(self, manager: "TaskManager", digest: str):
        self.m = manager
        self.cfg: PeerConfig = manager.cfg
        self.digest = digest
        self.entry: BlobEntry = manager.store.open(digest)
        self.sources: list[Source] = []
        #: the authorization of the latest client the mirror let read this blob: shown to every parent
        #: (see access.py); None until a client asked
        self.grant: Grant | None = None
        self.wanted: set[int] = set()
        self.blocklist: dict[str, str] = {}          # parent peer id -> reason
        self.back_to_source = False                  # decided: the registry, not the mesh
        self.source_reason = ""
        self.fetched_from_source: set[int] = set()   # pieces whose digests we publish
        self.registered = False
        self.failures = 0
        self.error: BaseException | None = None
        self.started = time.time()
        self.bytes_from = {"peer": 0, "registry": 0}
        self._driver: asyncio.Task | None = None
        self._layout_lock = asyncio.Lock()
        self._verify_lock = asyncio.Lock()
        self._changed = asyncio.get_running_loop().create_future()
        self._announce_task: asyncio.Task | None = None
        self._announce_dirty = False
        self._results: list[pb.PieceResult] = []
        self._in_flight: set[int] = set()
        self._fetching: Counter = Counter()         # piece -> our fetches of it running (2 in the endgame)
        self._reading: dict[tuple[int, str], tuple] = {}  # (piece, parent id) -> (body stream, since, sharing)
        self._progress_at = time.monotonic()
        self._seen: tuple = ()
        self._streamed_digest = ""                  # sha256 of the blob as streamed into the pieces
        # children: the whole-blob sha256 runs over the pieces as they land in order (a background task),
        # so verifying 200 MB at the end costs the few pieces that landed last, not a second pass
        self._whole: "hashlib._Hash | None" = None
        self._whole_next = 0                        # pieces 0.._whole_next-1 are in self._whole
        self._whole_task: asyncio.Task | None = None
        self._orphans_since: float | None = None    # since when wanted pieces have no holder at all
        # the child's view of the mesh (see _fetch_from_parents)
        self._parents: dict[str, pb.Parent] = {}     # peer id -> parent, with the pieces it holds
        self._held: set[int] = set()                # pieces some peer of the task has or fetches
        self._view_at = 0.0
        self._load: Counter = Counter()             # parent peer id -> our requests in flight to it
        self._busy_until: dict[str, float] = {}     # parent peer id -> no request before (503 busy)
        self._refused: dict[tuple[str, int], float] = {}  # (source parent, piece) -> not before (relayed)
        self._flushed_at = 0.0
        self._rng = random.Random()

    # -- public ---------------------------------------------------------------------------------------
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
            if self.m.sched is not None:
                resp = await self._register_task()
                if resp is not None:
                    length, piece_size = resp.content_length, resp.piece_size
            if not length:
                length = await self.m.head_blob(self.digest, self.sources)
            self.entry.set_layout(length, piece_size or piece_size_for(length))
            if self.back_to_source:
                self._announce_soon()
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
                if self.back_to_source or self.m.sched is None:
                    if not self.back_to_source:
                        self._go_to_source("no_scheduler")
                    await self._fetch_from_source(missing)
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
        self.registered = False
        self.failures = 0
        await self._sched("ReportTaskResult", pb.ReportTaskResultRequest(
            peer_id=self.m.peer_id, task_id=self.digest, success=False, back_to_source=True, error=why[:500]))

    # -- registry -------------------------------------------------------------------------------------
    async def _fetch_from_source(self, missing: list[int]) -> None:
        if not self.sources:
            raise NotFound(f"{self.digest}: not in the mesh and no repository known to fetch it from")
        runs = _runs(missing)
        for first, last in runs:
            await self._stream_run(first, last)
        self._announce_soon()

    async def _stream_run(self, first: int, last: int) -> None:
        """GET pieces ``first..last`` (inclusive) from the registry in one ranged request."""
        entry = self.entry
        start, end = entry.piece_span(first)[0], entry.piece_span(last)[1]
        headers = {}
        whole = start == 0 and end == entry.content_length
        if not whole:
            headers["Range"] = f"bytes={start}-{end - 1}"
        last_error: Exception | None = None
        for source in list(reversed(self.sources)):
            try:
                resp = await self.m.upstream.request("GET", source.registry, source.blob_path(self.digest),
                                                     headers, scope=source.scope)
            except NotFound as exc:
                last_error = exc
                continue
            try:
                skip = start if resp.status == 200 and not whole else 0  # registry ignored Range
                await self._cut_pieces(resp, first, last, skip)
                return
            finally:
                resp.release()
        raise last_error or NotFound(f"{self.digest}: blob unknown to the registry")

    async def _cut_pieces(self, resp: aiohttp.ClientResponse, first: int, last: int, skip: int) -> None:
        entry = self.entry
        index = first
        # Two piece-sized buffers, filled straight from the stream and reused (no joins, slices or fresh
        # memory per piece): while one piece is hashed and written (fsync included) in a worker thread, the
        # next one is read. A seed that stopped reading for every write would let the socket buffer fill
        # and the registry's stream stall, a few milliseconds per piece, on the link every child waits on.
        views = [memoryview(bytearray(entry.piece_size)) for _ in range(2)]
        view = views[0]
        storing: asyncio.Task | None = None   # the previous piece, landing
        filled = 0
        want = entry.piece_span(index)[1] - entry.piece_span(index)[0]
        t0 = time.monotonic()
        run = set(range(first, last + 1))
        self._in_flight |= run  # the whole run is on its way: children line up behind it at once
        self._announce_soon()
        # Streaming the blob from its first byte, the whole-blob digest comes for free: no second pass.
        whole = hashlib.sha256() if first == 0 and last == entry.n_pieces - 1 else None
        try:
            async for chunk in resp.content.iter_any():
                chunk = memoryview(chunk)
                if skip:
                    drop = min(skip, len(chunk))
                    chunk, skip = chunk[drop:], skip - drop
                while chunk and index <= last:
                    n = min(len(chunk), want - filled)
                    view[filled:filled + n] = chunk[:n]
                    filled += n
                    chunk = chunk[n:]
                    if filled < want:
                        break
                    if storing is not None:
                        await storing  # in order: the whole-blob hash is fed piece after piece
                    storing = asyncio.ensure_future(self._land_from_source(index, view[:want], t0, whole))
                    view = views[1] if view is views[0] else views[0]
                    filled = 0
                    index += 1
                    if index <= last:
                        want = entry.piece_span(index)[1] - entry.piece_span(index)[0]
                        t0 = time.monotonic()
                if index > last:
                    break
            if storing is not None:
                await storing
                storing = None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise RegistryError(f"{self.digest}: registry stream broke at piece {index}: {exc or type(exc).__name__}") \
                from exc
        finally:
            if storing is not None:  # the stream failed (or we are cancelled) while a piece was landing
                if not storing.done():
                    storing.cancel()
                await asyncio.gather(storing, return_exceptions=True)
            self._in_flight -= run
        if index <= last:
            raise RegistryError(f"{self.digest}: registry sent a truncated blob (stopped in piece {index} of "
                                f"{entry.n_pieces})")
        if whole is not None:
            self._streamed_digest = "sha256:" + whole.hexdigest()

    async def _land_from_source(self, index: int, data, t0: float, whole) -> None:
        await self._store(index, data, "", "registry", t0, whole)
        log.debug("%s: piece %d from the registry in %.3fs", self.digest[:19], index, time.monotonic() - t0)
        self.fetched_from_source.add(index)
        self._in_flight.discard(index)

    # -- mesh -----------------------------------------------------------------------------------------
    async def _fetch_from_parents(self) -> None:
        """The child's pipeline: keep up to ``concurrency`` piece fetches running, and pick the next piece
        whenever one lands or a tick passes, from a view of the mesh refreshed every :data:`TICK`.

        Picking (:meth:`_pick`) follows the capacity of the mesh rather than piece order: a piece that only
        a *source* parent (the seed, still streaming from the registry) has is asked from it by one child at
        a time (at most one such request per child; the seed refuses a second copy while the first is on
        its way, see upload.py), and everyone else gets it from that child. Pieces other children hold come
        from the least loaded of them, rarest first, so each child's uplink relays what it got first.
        Returns when nothing wanted is missing, or when the task went back to the registry.
        """
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
                picked, starved = self._pick(missing, running.values())
                for index, parent in picked:
                    task = asyncio.get_running_loop().create_task(self._fetch_piece(index, parent))
                    running[task] = (index, parent.host.peer_id, time.monotonic())
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
                        self._overtaken(index, parent_id, t0)
                        task.cancel()
                self._flush_results()
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            self._flush_results(force=True)
            self._refused.clear()
            self._view_at = 0.0  # a later run (more pieces wanted) starts from a fresh view

    async def _refresh_view(self) -> int:
        """Ask the scheduler for parents (and what they hold); returns its retry-after in ms."""
        if not self.registered:
            resp = await self._register_task()
            if resp is None or self.back_to_source:
                return 0  # scheduler down or we are the seed: _register_task went back to source
        else:
            try:
                resp = await self.m.sched.call(self.digest, "GetParents", pb.GetParentsRequest(
                    peer_id=self.m.peer_id, task_id=self.digest, exclude=sorted(self.blocklist), limit=8,
                    known_digests=sum(map(bool, self.entry.piece_digests))))
            except (SchedulerUnavailable, SchedulerRequestError) as exc:
                self._scheduler_down("GetParents", exc)
                return 0
            if resp.piece_digests:
                self.entry.set_piece_digests(list(resp.piece_digests))
            if resp.back_to_source:
                self._go_to_source(resp.reason or "scheduler")
                return 0
        if "same_host=" in resp.reason and not self.m.warned_same_host:
            self.m.warned_same_host = True
            log.warning("%s: the scheduler drops peers as parents because they share this peer's host id %r "
                        "(%s): peers on one machine never serve each other; give each its own --host-id if "
                        "they are meant to", self.digest[:19], self.cfg.host_id, resp.reason)
        self._view_at = time.monotonic()
        self._parents = {p.host.peer_id: p for p in resp.parents
                         if p.host.peer_id not in self.blocklist and p.host.peer_id != self.m.peer_id}
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
        if not orphans:
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

    def _pick(self, missing: set[int], running) -> tuple[list[tuple[int, pb.Parent]], bool]:
        """(piece, parent) pairs to start now, given the ``running`` (piece, parent id) fetches: up to
        ``concurrency`` from non-source parents, plus one from each source parent; and whether slots were
        left free for lack of candidates (then the view of the mesh is worth refreshing).

        * A piece some non-source parent has finished comes from one of those, the one we have the fewest
          requests running to (at most ``per_parent`` each, so every relaying child gets asked), rarest
          piece first so that what one child got first spreads fastest.
        * A piece only a source parent has is asked from it with at most one request of ours in flight
          to that parent (every child then takes a different fresh piece, and the seed's uplink carries
          each piece about once); pieces another child is already fetching come last.
        The request to a source does not take one of the ``concurrency`` slots: the source's uplink is
        the bottleneck of the mesh while it streams and must never idle because our slots are full of
        (slower) relays.
        """
        if not self._parents:
            return [], True
        running = list(running)
        slots = self.cfg.concurrency - sum(1 for _, pid, _ in running
                                           if not (pid in self._parents and self._parents[pid].source))
        now = time.monotonic()
        usable = [p for pid, p in self._parents.items()
                  if pid not in self.blocklist and self._busy_until.get(pid, 0.0) <= now]
        if not usable:
            return [], True
        per_parent = max(2, -(-self.cfg.concurrency // len(usable)))
        load = self._load
        relays: dict[int, list[pb.Parent]] = {}
        sources: dict[int, list[pb.Parent]] = {}
        elsewhere: set[int] = set()   # in flight at a non-source parent: it will relay them soon
        for p in usable:
            if p.source:
                for i in p.pieces:
                    sources.setdefault(i, []).append(p)
            else:
                elsewhere.update(p.in_flight)
                for i in p.pieces:
                    relays.setdefault(i, []).append(p)
        digests = self.entry.piece_digests
        have = self.entry.have  # ``missing`` may be a few awaits old: pieces landed meanwhile
        candidates = [i for i in missing if i not in self._in_flight and i not in have and digests[i]]
        rng = self._rng
        rng.shuffle(candidates)  # ties break differently on every child: fewer collisions on one parent
        plan: list[tuple[int, pb.Parent]] = []
        fresh = sorted((i for i in candidates if i not in relays and i in sources), key=lambda i: i in elsewhere)
        for i in fresh:
            options = [p for p in sources[i] if load[p.host.peer_id] < 1
                       and self._refused.get((p.host.peer_id, i), 0.0) <= now]
            if options:
                parent = options[0]
                plan.append((i, parent))
                load[parent.host.peer_id] += 1  # provisional: _fetch_piece counts it for real
        relayable = sorted((i for i in candidates if i in relays), key=lambda i: len(relays[i]))
        for i in relayable:
            if slots <= 0:
                break
            options = [p for p in relays[i] if load[p.host.peer_id] < per_parent]
            if options:
                parent = min(options, key=lambda p: load[p.host.peer_id])
                plan.append((i, parent))
                load[parent.host.peer_id] += 1
                slots -= 1
        if slots > 0 and not plan and all(i in self._in_flight for i in missing if i not in have):
            left = {i for i in missing if i not in have}
            for i, parent in self._endgame(left, running, relays, sources, per_parent, now)[:slots]:
                plan.append((i, parent))
                load[parent.host.peer_id] += 1
                slots -= 1
        for _, parent in plan:  # undo the provisional counts
            load[parent.host.peer_id] -= 1
        source_idle = any(p.source and not load[p.host.peer_id] for p in usable) and \
            not any(parent.source for _, parent in plan)
        return plan, slots > 0 or source_idle

    def _endgame(self, missing: set[int], running: list, relays: dict, sources: dict, per_parent: int,
                 now: float) -> list[tuple[int, pb.Parent]]:
        """Second fetches for the last pieces (BitTorrent's endgame): a download ends with its slowest
        piece, and near the end that is often one asked from a parent whose uplink is shared by many
        children. When at most :data:`ENDGAME_PIECES` are missing and all are being fetched, each piece
        fetched for longer than :data:`ENDGAME_AFTER` by one request only is also asked from another
        parent holding it (the least loaded); whichever copy lands first wins and the other request is
        cancelled (see :meth:`_fetch_from_parents`). Oldest fetches first."""
        if len(missing) > ENDGAME_PIECES:
            return []
        load = self._load
        started: dict[int, float] = {}
        asked: dict[int, set[str]] = {}
        for index, pid, t0 in running:
            started[index] = min(started.get(index, t0), t0)
            asked.setdefault(index, set()).add(pid)
        plan = []
        for index in sorted(missing, key=lambda i: started.get(i, now)):
            if self._fetching[index] != 1 or len(asked.get(index, ())) != 1 or now - started[index] < ENDGAME_AFTER:
                continue
            options = [p for p in relays.get(index, []) if p.host.peer_id not in asked[index]
                       and load[p.host.peer_id] < per_parent]
            options += [p for p in sources.get(index, []) if p.host.peer_id not in asked[index]
                        and load[p.host.peer_id] < 1 and self._refused.get((p.host.peer_id, index), 0.0) <= now]
            if options:
                parent = min(options, key=lambda p: load[p.host.peer_id])
                plan.append((index, parent))
                load[parent.host.peer_id] += 1  # provisional, undone by the caller with the rest of its plan
        for _, parent in plan:
            load[parent.host.peer_id] -= 1
        return plan

    async def _fetch_piece(self, index: int, parent: pb.Parent) -> None:
        host = parent.host
        start, end = self.entry.piece_span(index)
        size = end - start
        expected = self.entry.piece_digests[index]
        scheme = "https" if self.m.peer_ssl is not None else "http"   # mutual TLS in the mesh (daemon.py)
        url = f"{scheme}://{_url_host(host.ip)}:{host.upload_port}/pieces/{self.digest}/{index}"
        self._load[host.peer_id] += 1
        t0 = time.monotonic()
        self._in_flight.add(index)
        self._fetching[index] += 1
        try:
            data, sharing = await self._get_piece(url, size, self._load[host.peer_id], (index, host.peer_id))
            if index in self.entry.have:  # the endgame's other copy landed first
                return
            actual = await self._store(index, data, expected, "peer", t0)
            if actual != expected:
                raise ParentFailure("corrupt", f"piece digest {actual[:19]}, expected {expected[:19]}")
            log.debug("%s: piece %d from %s in %.3fs (its uploads: %d)", self.digest[:19], index, host.ip,
                      time.monotonic() - t0, sharing)
            # The cost the scheduler learns is per unit of the parent's uplink: a piece that took 2 s
            # while the parent served 8 uploads says the parent moves a piece every 0.25 s. Raw times
            # swing with the load of a swarm and made the scheduler's slow-peer rule hide busy parents.
            self._results.append(pb.PieceResult(parent_id=host.peer_id, piece=index, success=True,
                                                cost_us=int((time.monotonic() - t0) / sharing * 1e6), size=size))
        except ParentFailure as exc:
            if exc.reason == "busy":
                # A parent with no free upload slot is healthy, just loaded: no failure, nothing reported
                # to the scheduler (which would count it against the parent); left alone for a moment.
                self.m.metrics.piece_failures.labels("busy").inc()
                self._busy_until[host.peer_id] = time.monotonic() + BUSY_BACKOFF
                return
            if exc.reason == "relayed":
                # The seed already sent this fresh piece to another child: get it from that child.
                self.m.metrics.piece_failures.labels("relayed").inc()
                self._refused[(host.peer_id, index)] = time.monotonic() + RELAYED_BACKOFF
                return
            self._parent_failed(host, index, exc, t0)
        finally:
            self._reading.pop((index, host.peer_id), None)
            self._fetching[index] -= 1
            if self._fetching[index] <= 0:
                del self._fetching[index]
                self._in_flight.discard(index)
            self._load[host.peer_id] -= 1

    def _parent_failed(self, host: pb.PeerHost, index: int, exc: ParentFailure, t0: float) -> None:
        """Count a failed piece against its parent: reported, blocklisted if the failure says so, and back
        to the registry after too many failed parents."""
        # One bad parent counts once however many of its pieces were in flight when it failed.
        if not (exc.blocklist and host.peer_id in self.blocklist):
            self.failures += 1
        self.m.metrics.piece_failures.labels(exc.reason).inc()
        self._results.append(pb.PieceResult(parent_id=host.peer_id, piece=index, success=False,
                                            cost_us=int((time.monotonic() - t0) * 1e6), error=exc.reason))
        if exc.blocklist and host.peer_id not in self.blocklist:
            log.warning("%s: blocklisting parent %s (%s:%d) for piece %d: %s", self.digest[:19], host.peer_id,
                        host.ip, host.upload_port, index, exc)
            self.blocklist[host.peer_id] = exc.reason
            self.m.metrics.blocklisted.labels(exc.reason).inc()
        if self.failures >= self.cfg.max_parent_failures:
            self._go_to_source("parent_failures")

    def _overtaken(self, index: int, parent_id: str, t0: float) -> None:
        """The endgame's other copy of ``index`` landed while the fetch from ``parent_id`` still ran: that
        fetch is about to be cancelled. A parent slower than ``min_piece_rate`` even if its uplink were
        shared by as many uploads as it admits (its upload slots) is a crawling one and blocklisted as if
        its deadline had passed: the endgame must not hide it. A busy one is not blamed: the uploads it
        reported when the piece started say little about how many joined since (a seed that has just
        finished serves every child at once)."""
        reading = self._reading.get((index, parent_id))
        parent = self._parents.get(parent_id)
        if reading is None or parent is None:
            return
        stream, body_t0, sharing = reading
        elapsed = time.monotonic() - body_t0
        shared_by = max(sharing, parent.host.upload_slots, 1)
        if elapsed > 0.25 and stream.total_bytes < self.cfg.min_piece_rate * elapsed / shared_by:
            self._parent_failed(parent.host, index, ParentFailure(
                "timeout", f"{stream.total_bytes} bytes in {elapsed:.1f}s (overtaken in the endgame)"), t0)

    async def _get_piece(self, url: str, size: int, mine: int, key: tuple[int, str]) -> tuple[bytes, int]:
        """One piece from a parent, within a deadline that accounts for the parent's load, and the number
        of uploads the parent shared its uplink with.

        The answer must start within ``piece_timeout``. The parent says how many uploads it is serving
        (``X-Remora-Uploads``); its uplink is shared among them, so the body gets ``size * uploads /
        min_piece_rate`` (at least ``piece_timeout``): a busy, healthy parent is not mistaken for a
        crawling one, while a parent slower than ``min_piece_rate`` per upload still is.
        """
        cfg = self.cfg
        try:
            async with asyncio.timeout(cfg.piece_timeout) as budget:
                proof = self.grant.headers() if self.grant else {}
                async with self.m.peer_session.get(url, headers=proof) as resp:
                    if resp.status == 403:
                        raise ParentFailure("denied", "the parent does not accept this blob's authorization")
                    if resp.status == 503:
                        if resp.headers.get(RELAYED_HEADER):
                            raise ParentFailure("relayed", "the seed sent this piece to another child",
                                                blocklist=False)
                        raise ParentFailure("busy", "parent has no free upload slot", blocklist=False)
                    if resp.status != 200:
                        raise ParentFailure("http", f"parent answered {resp.status}")
                    if resp.content_length is None:
                        raise ParentFailure("http", "parent sent a piece without Content-Length")
                    if resp.content_length != size:  # no need to read a lie
                        raise ParentFailure("corrupt", f"piece has {resp.content_length} bytes, expected {size}")
                    try:
                        sharing = max(1, mine, int(resp.headers.get(UPLOADS_HEADER, "1")))
                    except ValueError:
                        sharing = max(1, mine)
                    seconds = max(cfg.piece_timeout, size * sharing / max(cfg.min_piece_rate, 1))
                    budget.reschedule(asyncio.get_running_loop().time() + seconds)
                    self._reading[key] = (resp.content, time.monotonic(), sharing)  # see _overtaken
                    data = await resp.read()  # one buffer, joined in C: no Python per chunk
        except TimeoutError:
            raise ParentFailure("timeout", "no complete piece within its deadline (crawling parent)") from None
        except (aiohttp.ClientError, ConnectionError, OSError) as exc:
            raise ParentFailure("connection", f"{type(exc).__name__}: {exc}") from exc
        if len(data) != size:
            raise ParentFailure("connection" if len(data) < size else "corrupt",
                                f"piece has {len(data)} bytes, expected {size}")
        return data, sharing

    # -- shared ---------------------------------------------------------------------------------------
    async def _store(self, index: int, data, expected: str, source: str, t0: float, whole=None) -> str:
        """Hash a piece and, if it matches ``expected`` (``""``: whatever it hashes to, the seed's case),
        write it and record it; one trip to a worker thread for both. Returns the digest it hashed to
        (the caller treats a mismatch as a corrupt piece: nothing was written)."""
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
        self._announce_soon()
        self._notify()
        if source == "peer" and index == self._whole_next and (self._whole_task is None or self._whole_task.done()):
            self._whole_task = self.m.spawn(self._hash_ahead())
        return digest

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
                await asyncio.to_thread(_feed_piece, entry, self._whole_next, whole, buf)
            except StorageError:  # evicted or damaged under us: the final check reads everything again
                return ""
            if whole is not self._whole:  # the task was reset meanwhile
                return ""
            self._whole_next += 1
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
            entry.mark_verified()
            self.grant = None   # nothing more to fetch: the client's credential is not kept
            self.m.metrics.tasks.labels("success").inc()
            log.info("%s: verified (%d bytes; %d from peers, %d from the registry)", self.digest[:19],
                     entry.content_length, self.bytes_from["peer"], self.bytes_from["registry"])
            self._announce_soon()
            await self._sched("ReportTaskResult", pb.ReportTaskResultRequest(
                peer_id=self.m.peer_id, task_id=self.digest, success=True, back_to_source=self.back_to_source))
            return True

    async def _register_task(self) -> pb.RegisterTaskResponse | None:
        entry = self.entry
        try:
            resp = await self.m.sched.call(self.digest, "RegisterTask", pb.RegisterTaskRequest(
                peer_id=self.m.peer_id, task_id=self.digest, content_length=entry.content_length,
                piece_size=entry.piece_size))
        except (SchedulerUnavailable, SchedulerRequestError) as exc:
            self._scheduler_down("RegisterTask", exc)
            return None
        self.registered = True
        if resp.content_length and resp.piece_size and not entry.has_layout:
            entry.set_layout(resp.content_length, resp.piece_size)
        if resp.piece_digests and entry.has_layout:
            entry.set_piece_digests(list(resp.piece_digests))
        if resp.back_to_source and not entry.verified:
            self._go_to_source(resp.reason or "seed")
        if entry.have:
            self._announce_soon()
        return resp

    def _scheduler_down(self, method: str, exc: Exception) -> None:
        log.warning("%s: %s; fetching from the registry", self.digest[:19], exc)
        self.m.metrics.scheduler_errors.labels(method).inc()
        self._go_to_source("scheduler_down")

    async def _sched(self, method: str, request) -> bool:
        """Best-effort scheduler RPC (reports, announcements): a failure only costs the scheduler some
        accuracy, so it is counted and logged, not raised. Returns whether a scheduler took it."""
        if self.m.sched is None:
            return False
        try:
            await self.m.sched.call(self.digest, method, request)
            return True
        except (SchedulerUnavailable, SchedulerRequestError) as exc:
            self.m.metrics.scheduler_errors.labels(method).inc()
            log.debug("%s: %s", method, exc)
            return False

    def _flush_results(self, force: bool = False) -> None:
        """Report piece results to the scheduler, batched (a child lands dozens of pieces a second)."""
        if not self._results or self.m.sched is None:
            return
        if force or len(self._results) >= FLUSH_BATCH or time.monotonic() - self._flushed_at >= FLUSH_EVERY:
            self._flushed_at = time.monotonic()
            results, self._results = self._results, []
            self.m.spawn(self._sched("ReportPieceResults", pb.ReportPieceResultsRequest(
                peer_id=self.m.peer_id, task_id=self.digest, results=results)))

    def _announce_soon(self) -> None:
        """Coalesce announcements: at most one in flight, one more queued with the latest state."""
        if self.m.sched is None or not self.entry.has_layout:
            return
        self._announce_dirty = True
        if self._announce_task is None or self._announce_task.done():
            self._announce_task = self.m.spawn(self._announce_loop())

    async def _announce_loop(self) -> None:
        while self._announce_dirty:
            self._announce_dirty = False
            await self.announce()

    async def announce(self) -> bool:
        entry = self.entry
        if not entry.has_layout:
            return True
        # Digests go out as they are learned ("" = not yet; the scheduler fills the gaps from later
        # announcements), from the peer that hashed them from the registry, or from one whose whole blob
        # matched its digest: children start on the seed's first pieces while it still downloads.
        digests = entry.piece_digests if (self.fetched_from_source or entry.verified) \
            and any(entry.piece_digests) else []
        return await self._sched("AnnouncePieces", pb.AnnouncePiecesRequest(
            peer_id=self.m.peer_id, task_id=self.digest, finished=sorted(entry.have),
            in_flight=sorted(self._in_flight - entry.have), content_length=entry.content_length,
            piece_size=entry.piece_size, piece_digests=digests, done=entry.verified))

    def status(self) -> dict:
        e = self.entry
        return {"digest": self.digest, "state": self.state, "size": e.content_length, "piece_size": e.piece_size,
                "pieces": e.n_pieces, "have": len(e.have), "verified": e.verified,
                "from_peers": self.bytes_from["peer"], "from_registry": self.bytes_from["registry"],
                "back_to_source": self.source_reason if self.back_to_source else "",
                "blocklist": dict(self.blocklist), "error": str(self.error) if self.error else ""}


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
        #: the registry's answer to "may this client read that?" (mirror requests, pieces asked by peers)
        self.access = AccessChecker(upstream.endpoint, timeout=min(cfg.upstream_timeout, 10.0),
                                    state_file=cfg.data_dir / "access-anonymous.json", allows=upstream.allows)
        self.warned_same_host = False
        self.peer_session: aiohttp.ClientSession | None = None
        #: the client context for parents (our member certificate) when the mesh is mutual TLS; set by
        #: the daemon before start(). None: plain HTTP (--insecure-plain-mesh).
        self.peer_ssl = None
        self._background: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.peer_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=self.cfg.piece_timeout),
            connector=aiohttp.TCPConnector(limit=64, limit_per_host=8, ssl=self.peer_ssl or True),
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

    def task(self, digest: str, source: Source | None = None, grant: Grant | None = None) -> Task:
        task = self.tasks.get(digest)
        if task is None:
            task = self.tasks[digest] = Task(self, digest)
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
            task._announce_soon()

    def forget_if_empty(self, digest: str) -> None:
        """Drop a task that never got anything (a 404, a dead registry): no state kept per bad digest."""
        task = self.tasks.get(digest)
        if task and not task.entry.have and not task.entry.has_layout and not (task._driver and not task._driver.done()):
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


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Sorted piece indexes -> contiguous ``(first, last)`` runs."""
    runs: list[tuple[int, int]] = []
    for i in indexes:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


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


def _feed_piece(entry: BlobEntry, index: int, whole, buf: bytearray) -> None:
    whole.update(entry.read_piece_into(index, buf))


def _hash_pieces(entry: BlobEntry) -> str:
    h = hashlib.sha256()
    for i in range(entry.n_pieces):
        h.update(entry.read_piece(i))
    return "sha256:" + h.hexdigest()


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
