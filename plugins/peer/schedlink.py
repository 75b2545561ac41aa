"""The peer's async link to the scheduler cluster: sharding by task, failover, re-registration.

Every task RPC goes to the scheduler that owns the task on the consistent-hash ring
(:class:`remora.plugins.scheduler.ring.SchedulerRing`), so all peers of a task meet on one scheduler;
when it does not answer, the next one on the ring (the same for every peer) is tried. A scheduler that
answers ``NOT_FOUND`` has forgotten this peer (restart, expiry): the link registers again and retries
once, and tells the daemon so it re-announces what it holds.

Every RPC has a short deadline: a dead scheduler costs a peer at most ``timeout`` per task before it
goes back to the registry by itself (slower, never broken).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import grpc

from remora._proto import remora_scheduler_pb2 as pb
from remora._proto import remora_scheduler_pb2_grpc as pb_grpc
from remora.plugins.scheduler.ring import SchedulerRing

log = logging.getLogger(__name__)


class SchedulerUnavailable(Exception):
    """No scheduler of the ring answered: the caller goes back to the registry."""


class SchedulerLink:
    def __init__(self, addresses: list[str], host: pb.PeerHost, timeout: float = 2.0):
        self.ring = SchedulerRing(addresses)
        self.host = host
        self.timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb_grpc.SchedulerStub] = {}
        self.keepalive_interval = 5.0
        self.probe_interval = 0.0
        #: called (no arguments) when a scheduler had forgotten us: re-announce every task
        self.on_forgotten: Callable[[], Awaitable[None]] | None = None

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    def _stub(self, address: str) -> pb_grpc.SchedulerStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=[
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)])
            self._channels[address] = channel
            stub = self._stubs[address] = pb_grpc.SchedulerStub(channel)
        return stub

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()

    # -- peer lifecycle -------------------------------------------------------------------------------
    async def register_all(self) -> int:
        """RegisterPeer (also the keepalive) on every scheduler; returns how many answered."""
        answered = 0
        forgotten = False
        for address in self.ring.addresses:
            try:
                resp = await self._stub(address).RegisterPeer(pb.RegisterPeerRequest(host=self.host),
                                                              timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                log.debug("RegisterPeer on %s failed: %s", address, exc.code().name)
                continue
            answered += 1
            if resp.keepalive_interval_ms:
                self.keepalive_interval = resp.keepalive_interval_ms / 1000
            if resp.probe_interval_ms:
                self.probe_interval = resp.probe_interval_ms / 1000
            forgotten = forgotten or not resp.known
        if forgotten and self.on_forgotten:
            await self.on_forgotten()
        return answered

    async def leave(self) -> None:
        for address in self.ring.addresses:
            try:
                await self._stub(address).LeavePeer(pb.LeavePeerRequest(peer_id=self.peer_id), timeout=self.timeout)
            except grpc.aio.AioRpcError:
                pass

    async def sync_probes(self, results: list[pb.ProbeResult]) -> list[pb.PeerHost]:
        for address in self.ring.addresses:
            try:
                resp = await self._stub(address).SyncProbes(
                    pb.SyncProbesRequest(peer_id=self.peer_id, results=results), timeout=self.timeout)
            except grpc.aio.AioRpcError:
                continue
            if resp.probe_interval_ms:
                self.probe_interval = resp.probe_interval_ms / 1000
            return list(resp.targets)
        return []

    # -- task RPCs ------------------------------------------------------------------------------------
    async def call(self, task_id: str, method: str, request):
        """Send a task RPC to the task's scheduler, failing over along the ring."""
        last: Exception | None = None
        for address in self.ring.pick(task_id):
            rpc = getattr(self._stub(address), method)
            for attempt in range(2):
                try:
                    return await rpc(request, timeout=self.timeout)
                except grpc.aio.AioRpcError as exc:
                    last = exc
                    if exc.code() == grpc.StatusCode.NOT_FOUND and attempt == 0:
                        await self._reregister(address)
                        continue
                    if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                        raise SchedulerUnavailable(f"{method} rejected by {address}: {exc.details()}") from exc
                    break
        raise SchedulerUnavailable(f"{method}: no scheduler answered ({_describe(last)})")

    async def _reregister(self, address: str) -> None:
        try:
            await self._stub(address).RegisterPeer(pb.RegisterPeerRequest(host=self.host), timeout=self.timeout)
        except grpc.aio.AioRpcError:
            return
        if self.on_forgotten:
            asyncio.get_running_loop().create_task(self.on_forgotten())


def _describe(exc: Exception | None) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
