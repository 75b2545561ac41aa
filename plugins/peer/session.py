"""One task's conversation with the scheduler: register, ask for parents, report pieces and the result,
announce what we hold.

Like the scheduler session of Dragonfly's client, it is the only part of the download engine that talks
to the scheduler, and it never lets the scheduler's health decide whether a download works: when the
scheduler cannot be reached, the task goes back to the registry (``go_to_source("scheduler_down")``)
instead of failing. Reports and announcements are best effort (a lost one costs the scheduler some
accuracy, not the download) and are batched or coalesced, because a child lands dozens of pieces a
second. Registration happens again after a reset (:meth:`reset`); re-registering the *peer* with a
scheduler that forgot it is the scheduler client's job (``SchedulerClient.call``).

Best-effort calls go out with ``best_effort=True``: one that misses its deadline (a busy scheduler) is
dropped without making the client hold the scheduler down, which would send the downloads that still
need it (GetParents) to the registry. Announcements and result reports carry a ``seq`` that grows with
every one sent, so the scheduler ignores one that arrives after a newer one; announcements also list the
piece transfers running from parents (``transfers``): the scheduler's measure of a parent's load.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable

from remora._proto import remora_scheduler_pb2 as pb
from remora.plugins.scheduler.client import SchedulerRequestError, SchedulerUnavailable

from .pieces import BlobEntry

log = logging.getLogger(__name__)

#: Results are reported in batches of this many, or at least every FLUSH_EVERY seconds.
FLUSH_BATCH = 16
FLUSH_EVERY = 0.5
#: A scheduler that stops answering GetParents in the middle of a download (an overloaded one: deadlines
#: exceeded, after which the client holds it "down" for a few seconds) is given this long, at least, before
#: the task goes to the registry: the parents it named keep serving meanwhile, and the registry is spared
#: a second copy of the blob per impatient child (egress 3x in a 16-node run whose scheduler was starved of
#: CPU for a moment). The piece timeout counts too: a longer one is a more patient peer.
SCHEDULER_GRACE = 5.0
#: Announcements of a downloading peer go out at most this often (each carries the peer's whole state, so
#: a later one replaces the ones skipped). Announcing every landed piece (dozens a second per peer, 16
#: peers) only fed the scheduler and the peers' gRPC stacks CPU the links then missed; every 0.1 s was
#: still 3,100 announcements (~2 ms of scheduler CPU each) for an 8-node preheat of eight 25 MiB blobs on a
#: machine the mesh keeps CPU-bound, 0.25 s is 1,350. Children see a landed piece at their next view of the
#: mesh (``download.TICK``, 0.1 s, while starved), so the lag a relay adds grows by at most 0.15 s.
ANNOUNCE_EVERY = 0.25
#: ``seq`` of announcements and result reports: one sequence for the process, started at the wall clock in
#: nanoseconds so that it also grows across restarts of a peer that keeps its peer id (--peer-id).
_SEQ = itertools.count(time.time_ns())


def next_seq() -> int:
    return next(_SEQ)


class SchedulerSession:
    """The scheduler side of one task. ``manager`` gives the scheduler client (``sched``, None without a
    scheduler), ``peer_id``, ``metrics``, ``spawn`` and the daemon-wide ``warned_same_host`` flag;
    ``in_flight`` and ``from_source`` are the task's sets (pieces on their way to us, pieces we hashed
    from the registry: only their digests are ours to publish before the blob is verified)."""

    def __init__(self, manager, digest: str, entry: BlobEntry, *, go_to_source: Callable[[str], None],
                 in_flight: set[int], from_source: set[int]):
        self.m = manager
        self.digest = digest
        self.entry = entry
        self.registered = False
        #: nobody waits on the blob (a preheat): the scheduler may take a moment to find a better seed
        self.background = False
        self._go_to_source = go_to_source
        self._in_flight = in_flight
        self._from_source = from_source
        self._results: list[pb.PieceResult] = []
        self._flushed_at = 0.0
        self._announce_task: asyncio.Task | None = None
        self._announce_dirty = False
        self._announced_at = 0.0
        self._unanswered_since: float | None = None   # GetParents failing since (see SCHEDULER_GRACE)

    @property
    def available(self) -> bool:
        return self.m.sched is not None

    @property
    def unanswered(self) -> bool:
        """GetParents is failing and the task waits for the scheduler (see SCHEDULER_GRACE): the view of
        the mesh is stale, so "nobody holds that piece" cannot be told apart from "nobody told us"."""
        return self._unanswered_since is not None

    def reset(self) -> None:
        """The task starts over: register again before asking for parents."""
        self.registered = False
        self._unanswered_since = None

    # -- scheduling -----------------------------------------------------------------------------------
    async def register(self) -> pb.RegisterTaskResponse | None:
        """RegisterTask: learns the layout and piece digests the scheduler knows, and whether we are the
        seed (then back to the registry). None: the scheduler is down (and the task went to the registry)."""
        entry = self.entry
        self.m.registering.add(self.digest)
        try:
            resp = await self.m.sched.call(self.digest, "RegisterTask", pb.RegisterTaskRequest(
                peer_id=self.m.peer_id, task_id=self.digest, content_length=entry.content_length,
                piece_size=entry.piece_size, seeding=self.m.seeding(self.digest), background=self.background))
        except (SchedulerUnavailable, SchedulerRequestError) as exc:
            self.down("RegisterTask", exc)
            return None
        finally:
            self.m.registering.discard(self.digest)
        self.registered = True
        if resp.content_length and resp.piece_size and not entry.has_layout:
            entry.set_layout(resp.content_length, resp.piece_size)
        if resp.piece_digests and entry.has_layout:
            entry.set_piece_digests(list(resp.piece_digests))
        if resp.back_to_source and not entry.verified:
            self._go_to_source(resp.reason or "seed")
        if entry.have:
            self.announce_soon()
        return resp

    async def parents(self, exclude: Iterable[str]):
        """The parents the scheduler gives us now (registering first when not registered), with the
        piece digests it learned on the way. None when there is no mesh to use: the scheduler is down,
        or it made us the seed or sent us to the registry (the task went back to source)."""
        if not self.registered:
            resp = await self.register()
            if resp is None or resp.back_to_source:
                return None
        else:
            try:
                resp = await self.m.sched.call(self.digest, "GetParents", pb.GetParentsRequest(
                    peer_id=self.m.peer_id, task_id=self.digest, exclude=sorted(exclude), limit=8,
                    known_digests=sum(map(bool, self.entry.piece_digests)),
                    seeding=self.m.seeding(self.digest), background=self.background))
            except SchedulerUnavailable as exc:
                now = time.monotonic()
                if self._unanswered_since is None:
                    self._unanswered_since = now
                if now - self._unanswered_since < max(SCHEDULER_GRACE, self.m.cfg.piece_timeout):
                    # Keep fetching from the parents we know; ask again on the next tick.
                    self.m.metrics.scheduler_errors.labels("GetParents").inc()
                    log.debug("%s: GetParents: %s (waiting for the scheduler)", self.digest[:19], exc)
                    return None
                self.down("GetParents", exc)
                return None
            except SchedulerRequestError as exc:
                self.down("GetParents", exc)
                return None
            self._unanswered_since = None
            if resp.piece_digests:
                self.entry.set_piece_digests(list(resp.piece_digests))
            if resp.back_to_source:
                self._go_to_source(resp.reason or "scheduler")
                return None
        if "same_host=" in resp.reason and not self.m.warned_same_host:
            self.m.warned_same_host = True
            log.warning("%s: the scheduler drops peers as parents because they share this peer's host id %r "
                        "(%s): peers on one machine never serve each other; give each its own --host-id if "
                        "they are meant to", self.digest[:19], self.m.cfg.host_id, resp.reason)
        return resp

    def down(self, method: str, exc: Exception) -> None:
        """The scheduler could not answer a call the download depends on: use the registry."""
        log.warning("%s: %s; fetching from the registry", self.digest[:19], exc)
        self.m.metrics.scheduler_errors.labels(method).inc()
        self._go_to_source("scheduler_down")

    # -- best-effort reports --------------------------------------------------------------------------
    async def call(self, method: str, request) -> bool:
        """Best-effort scheduler RPC (reports, announcements): a failure only costs the scheduler some
        accuracy, so it is counted and logged, not raised. Returns whether a scheduler took it."""
        if self.m.sched is None:
            return False
        try:
            await self.m.sched.call(self.digest, method, request, best_effort=True)
            return True
        except (SchedulerUnavailable, SchedulerRequestError) as exc:
            self.m.metrics.scheduler_errors.labels(method).inc()
            log.debug("%s: %s", method, exc)
            return False

    def report(self, result: pb.PieceResult) -> None:
        """Queue a piece result; :meth:`flush` sends them."""
        self._results.append(result)

    def flush(self, force: bool = False) -> None:
        """Report piece results to the scheduler, batched (a child lands dozens of pieces a second)."""
        if not self._results or self.m.sched is None:
            return
        if force or len(self._results) >= FLUSH_BATCH or time.monotonic() - self._flushed_at >= FLUSH_EVERY:
            self._flushed_at = time.monotonic()
            results, self._results = self._results, []
            self.m.spawn(self.call("ReportPieceResults", pb.ReportPieceResultsRequest(
                peer_id=self.m.peer_id, task_id=self.digest, results=results)))

    async def report_result(self, success: bool, back_to_source: bool, error: str = "") -> bool:
        return await self.call("ReportTaskResult", pb.ReportTaskResultRequest(
            peer_id=self.m.peer_id, task_id=self.digest, success=success, back_to_source=back_to_source,
            error=error[:500], seq=next_seq()))

    def announce_soon(self) -> None:
        """Coalesce announcements: at most one in flight, one more queued with the latest state."""
        if self.m.sched is None or not self.entry.has_layout:
            return
        self._announce_dirty = True
        if self._announce_task is None or self._announce_task.done():
            self._announce_task = self.m.spawn(self._announce_loop())

    async def _announce_loop(self) -> None:
        while self._announce_dirty:
            wait = self._announced_at + ANNOUNCE_EVERY - time.monotonic()
            if wait > 0 and not self.entry.verified:   # "done" goes out at once (see announce_final)
                await asyncio.sleep(wait)
            self._announce_dirty = False
            self._announced_at = time.monotonic()
            await self.announce()

    async def announce_final(self) -> None:
        """Announce the current state and return once the scheduler has it, after every announcement
        queued before. The task's result is reported only after this: an announcement still in flight
        from before the blob was complete ("not done") reaching the scheduler after the success report
        made the scheduler think the finished seed had lost pieces and elect a second seed, which fetched
        the rest of the blob from the registry again (registry egress 1.3x with 16 nodes)."""
        if self.m.sched is None or not self.entry.has_layout:
            return
        self._announce_dirty = True
        if self._announce_task is None or self._announce_task.done():
            self._announce_task = self.m.spawn(self._announce_loop())
        await asyncio.shield(self._announce_task)

    async def announce(self) -> bool:
        entry = self.entry
        if not entry.has_layout:
            return True
        # Digests go out as they are learned ("" = not yet; the scheduler fills the gaps from later
        # announcements), from the peer that hashed them from the registry, or from one whose whole blob
        # matched its digest: children start on the seed's first pieces while it still downloads.
        digests = entry.piece_digests if (self._from_source or entry.verified) and any(entry.piece_digests) else []
        return await self.call("AnnouncePieces", pb.AnnouncePiecesRequest(
            peer_id=self.m.peer_id, task_id=self.digest, finished=sorted(entry.have),
            in_flight=sorted(self._in_flight - entry.have), content_length=entry.content_length,
            piece_size=entry.piece_size, piece_digests=digests, done=entry.verified, seq=next_seq(),
            transfers=[] if entry.verified else self.transfers(), transfers_known=True))

    def transfers(self) -> list[pb.Transfer]:
        """The piece bodies being read from parents now: what this child adds to their load. Read from
        the task's fetcher (pieces whose parent answered and is sending; a parent that answered "busy"
        carries no load of ours)."""
        task = getattr(self.m, "tasks", {}).get(self.digest)
        fetcher = getattr(task, "fetcher", None)
        reading = fetcher.transfers() if fetcher is not None else []
        return [pb.Transfer(parent_id=parent, piece=piece) for piece, parent in reading]
