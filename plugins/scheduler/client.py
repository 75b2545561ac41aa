"""The peer's side of the scheduler API: consistent-hash routing, failover, transparent (re)registration.

    client = SchedulerClient(["10.0.0.1:8002", "10.0.0.2:8002"], host=pb.PeerHost(peer_id=..., ...))
    resp = await client.register_task(pb.RegisterTaskRequest(peer_id=..., task_id=digest))
    ...
    except SchedulerUnavailable:   # every scheduler is down: fetch from the registry yourself

Every task RPC goes to the task's owner on the :class:`.ring.SchedulerRing`; when that scheduler does not
answer (UNAVAILABLE, DEADLINE_EXCEEDED) the next one in the ring's order is tried, and the dead one is
skipped for ``down_for`` seconds. Every peer computes the same order, so peers fail over to the same
scheduler. The client registers the peer with a scheduler before its first call there, and again when
the scheduler answers FAILED_PRECONDITION ("unknown peer": it restarted or expired the peer). A
scheduler that takes over a task learns it from the peer's next RegisterTask/AnnouncePieces/GetParents
(an unknown task is joined implicitly, and elects a seed if nobody has the blob).

Best-effort calls (``call(..., best_effort=True)``: piece reports, announcements, result reports) mark a
scheduler down only on a connectivity error (UNAVAILABLE). A best-effort call that misses its deadline,
or is refused for load (RESOURCE_EXHAUSTED), says the scheduler is busy, not gone: it is given up (the
next report or announcement carries the news) without failing over, and the scheduler stays usable for
the calls a download depends on (RegisterTask, GetParents). Holding it down for ``down_for`` seconds
after one slow announcement sent every download on the peer to the registry.

With ``tls`` (a :class:`remora.pki.tls.Reloader`) every channel is mutual TLS: the peer presents its
member certificate and accepts only a scheduler of the cluster CA whose certificate names the address
dialled (IP or DNS SAN). When the certificate files rotate, channels are re-made with the new
credentials (grpc channels keep theirs for life); calls in flight finish on the old ones.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

import grpc

from remora._proto import remora_scheduler_pb2 as pb
from remora._proto import remora_scheduler_pb2_grpc as pb_grpc
from remora.errors import RemoraError

from .ring import SchedulerRing

log = logging.getLogger(__name__)

FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                  grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED)
#: What a scheduler that is not there answers: only these mark it down after a best-effort call.
CONNECTIVITY_CODES = (grpc.StatusCode.UNAVAILABLE,)
CHANNEL_OPTIONS = [
    # A restarted scheduler must be usable again within seconds, not grpc's default 2-minute backoff.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class SchedulerUnavailable(RemoraError):
    """No scheduler answered: the peer should fetch from the registry itself."""

    exit_code = 6


class SchedulerRequestError(RemoraError):
    """A scheduler rejected the request (INVALID_ARGUMENT, NOT_FOUND, ...): retrying elsewhere won't help."""

    def __init__(self, address: str, method: str, code: grpc.StatusCode, details: str):
        super().__init__(f"scheduler {address}: {method}: {code.name}: {details}")
        self.code = code


class SchedulerClient:
    def __init__(self, addresses: Iterable[str] | SchedulerRing, host: pb.PeerHost, timeout: float = 3.0,
                 down_for: float = 5.0, clock: Callable[[], float] = time.monotonic, tls=None):
        self.ring = addresses if isinstance(addresses, SchedulerRing) else SchedulerRing(addresses)
        self.host = host
        self.timeout = timeout
        self.down_for = down_for
        self.clock = clock
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb_grpc.SchedulerStub] = {}
        self._registered: dict[str, pb.RegisterPeerResponse] = {}   # registered and not failed since
        self._used: set[str] = set()          # every scheduler we ever registered with
        self._forgot: set[str] = set()        # ... that later answered known=False: re-announce there
        self._down_until: dict[str, float] = {}
        self.last_address: dict[str, str] = {}   # task id -> scheduler that answered last
        self.tls = tls
        self._generation = tls.generation if tls is not None else 0
        self._retired: list[grpc.aio.Channel] = []   # channels of old credentials, closed at close()

    # -- plumbing ----------------------------------------------------------------------------------------

    def _stub(self, address: str) -> pb_grpc.SchedulerStub:
        if self.tls is not None:
            self.tls.check()   # cheap (stats, at most once a second)
            if self.tls.generation != self._generation:
                # New certificate or CA bundle: new channels. The old ones are closed later, not now: a
                # call may still be running on them.
                log.info("TLS files changed: new channels to the schedulers")
                self._generation = self.tls.generation
                self._retired.extend(self._channels.values())
                self._channels.clear()
                self._stubs.clear()
        stub = self._stubs.get(address)
        if stub is None:
            if self.tls is not None:
                channel = grpc.aio.secure_channel(address, self.tls.grpc_channel_credentials(), options=CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
            stub = self._stubs[address] = pb_grpc.SchedulerStub(channel)
        return stub

    def order(self, task_id: str) -> list[str]:
        """Schedulers to try for ``task_id``: the ring's order without those marked down recently."""
        now = self.clock()
        return [a for a in self.ring.pick(task_id) if self._down_until.get(a, 0) <= now]

    async def _register(self, address: str) -> pb.RegisterPeerResponse:
        resp = await self._stub(address).RegisterPeer(pb.RegisterPeerRequest(host=self.host), timeout=self.timeout)
        if not resp.known and address in self._used:
            self._forgot.add(address)
        self._used.add(address)
        self._registered[address] = resp
        return resp

    async def _call_at(self, address: str, method: str, request):
        if address not in self._registered:
            await self._register(address)
        try:
            return await getattr(self._stub(address), method)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.info("scheduler %s forgot peer %s: registering again", address, self.host.peer_id)
            self._registered.pop(address, None)
            await self._register(address)
            return await getattr(self._stub(address), method)(request, timeout=self.timeout)

    async def call(self, task_id: str, method: str, request, best_effort: bool = False):
        """Call ``method`` for ``task_id`` on its scheduler, failing over along the ring. ``best_effort``:
        only a connectivity error marks the scheduler down (see the module doc)."""
        # A scheduler that failed is skipped for ``down_for`` seconds; when all are, give up at once:
        # waiting on dead schedulers would only delay the peer's fallback to the registry.
        now = self.clock()
        errors = [f"{a}: down (retry in {self._down_until[a] - now:.1f}s)"
                  for a in self.ring.pick(task_id) if self._down_until.get(a, 0) > now]
        for address in self.order(task_id):
            try:
                resp = await self._call_at(address, method, request)
            except grpc.aio.AioRpcError as exc:
                if best_effort and exc.code() in FAILOVER_CODES and exc.code() not in CONNECTIVITY_CODES:
                    # Busy, not gone: give this report up, keep the scheduler for download calls.
                    log.debug("scheduler %s: best-effort %s failed (%s): dropped, the scheduler stays in use",
                              address, method, exc.code().name)
                    raise SchedulerUnavailable(f"best-effort {method} for {task_id} not taken by {address}: "
                                               f"{exc.code().name}: {exc.details()}") from exc
                if exc.code() in FAILOVER_CODES:
                    errors.append(f"{address}: {exc.code().name}: {exc.details()}")
                    self._down_until[address] = self.clock() + self.down_for
                    self._registered.pop(address, None)   # re-register when it is back (it may have restarted)
                    log.warning("scheduler %s failed %s (%s); trying the next one", address, method,
                                exc.code().name)
                    continue
                raise SchedulerRequestError(address, method, exc.code(), exc.details()) from exc
            self._down_until.pop(address, None)
            self.last_address[task_id] = address
            return resp
        raise SchedulerUnavailable(f"no scheduler answered {method} for {task_id}: " + "; ".join(errors))

    # -- task RPCs ---------------------------------------------------------------------------------------

    async def register_task(self, request: pb.RegisterTaskRequest) -> pb.RegisterTaskResponse:
        return await self.call(request.task_id, "RegisterTask", request)

    async def announce_pieces(self, request: pb.AnnouncePiecesRequest) -> pb.Empty:
        return await self.call(request.task_id, "AnnouncePieces", request)

    async def get_parents(self, request: pb.GetParentsRequest) -> pb.GetParentsResponse:
        return await self.call(request.task_id, "GetParents", request)

    async def report_piece_results(self, request: pb.ReportPieceResultsRequest) -> pb.Empty:
        return await self.call(request.task_id, "ReportPieceResults", request)

    async def report_task_result(self, request: pb.ReportTaskResultRequest) -> pb.Empty:
        return await self.call(request.task_id, "ReportTaskResult", request)

    async def leave_task(self, request: pb.LeaveTaskRequest) -> pb.Empty:
        return await self.call(request.task_id, "LeaveTask", request)

    async def stat_task(self, task_id: str) -> pb.StatTaskResponse:
        return await self.call(task_id, "StatTask", pb.StatTaskRequest(task_id=task_id))

    # -- peer-wide RPCs ----------------------------------------------------------------------------------

    async def register(self, addresses: Iterable[str] | None = None) -> list[str]:
        """Register with every scheduler of the ring (or ``addresses``) now; the daemon does at start-up.

        Task calls would register lazily, but only at the first download: until then the scheduler could
        neither hand the peer out as a parent nor probe it. Returns the schedulers that answered; the
        others are logged.
        """
        answered = []
        for address in (self.ring.addresses if addresses is None else addresses):
            try:
                await self._register(address)
                answered.append(address)
            except grpc.aio.AioRpcError as exc:
                log.warning("registering with scheduler %s failed: %s: %s", address, exc.code().name,
                            exc.details())
        return answered

    def set_addresses(self, addresses: Iterable[str]) -> list[str]:
        """Replace the ring (the manager's list changed); returns the schedulers that are new.

        Schedulers that left are forgotten (no keepalives, probes or failover to them); their channels
        are closed at :meth:`close` (a call may still run on them). Tasks move to their new owners on
        the next call: scheduler state is soft, the peer re-announces what it holds.
        """
        ring = SchedulerRing(addresses)
        old = set(self.ring.addresses)
        self.ring = ring
        for address in old - set(ring.addresses):
            self._registered.pop(address, None)
            self._used.discard(address)
            self._forgot.discard(address)
            self._down_until.pop(address, None)
            self._stubs.pop(address, None)
            channel = self._channels.pop(address, None)
            if channel is not None:
                self._retired.append(channel)
        return [a for a in ring.addresses if a not in old]

    def registered_with(self) -> list[str]:
        """Schedulers this peer is registered with now (answered and not failed since)."""
        return sorted(self._registered)

    async def keepalive(self) -> list[str]:
        """RegisterPeer again on every scheduler we ever used; returns those that had forgotten us.

        Run it every :attr:`keepalive_interval` seconds. A scheduler "forgot" us when it answered
        ``known = false`` to a registration after an earlier one (it restarted or expired us), here or
        in a transparent re-registration since the last keepalive. For each returned address the peer
        should re-announce the pieces of its tasks whose ring owner that is (see ``last_address``).
        """
        for address in sorted(self._used):
            try:
                await self._register(address)
            except grpc.aio.AioRpcError as exc:
                log.warning("keepalive to scheduler %s failed: %s", address, exc.code().name)
                self._registered.pop(address, None)
        forgot = sorted(self._forgot)
        self._forgot.clear()
        return forgot

    @property
    def keepalive_interval(self) -> float:
        """Seconds between keepalives: the smallest any scheduler asked for (20 s before any answered)."""
        values = [r.keepalive_interval_ms / 1000 for r in self._registered.values() if r.keepalive_interval_ms]
        return min(values, default=20.0)

    async def sync_probes(self, results: list[pb.ProbeResult]) -> list[pb.PeerHost]:
        """Send RTT results to every scheduler we use; returns the union of the hosts to probe next."""
        targets: dict[str, pb.PeerHost] = {}
        request = pb.SyncProbesRequest(peer_id=self.host.peer_id, results=results)
        for address in list(self._registered):
            try:
                resp = await self._call_at(address, "SyncProbes", request)
            except grpc.aio.AioRpcError as exc:
                log.warning("SyncProbes to scheduler %s failed: %s", address, exc.code().name)
                continue
            for t in resp.targets:
                targets.setdefault(t.peer_id, t)
        return list(targets.values())

    async def leave(self) -> None:
        """LeavePeer on every scheduler we registered with (best effort: they expire us anyway)."""
        for address in list(self._registered):
            try:
                await self._stub(address).LeavePeer(pb.LeavePeerRequest(peer_id=self.host.peer_id),
                                                    timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                log.warning("LeavePeer on scheduler %s failed: %s", address, exc.code().name)
        self._registered.clear()

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in [*self._channels.values(), *self._retired]),
                             return_exceptions=True)
        self._channels.clear()
        self._retired.clear()
        self._stubs.clear()

    async def __aenter__(self) -> SchedulerClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
