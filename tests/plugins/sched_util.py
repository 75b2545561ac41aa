"""A scheduler in this process on loopback (plain gRPC) with a few registered peers, for tests that drive
its RPCs directly."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable

import grpc

from remora._proto import remora_scheduler_pb2 as pb
from remora._proto import remora_scheduler_pb2_grpc as pb_grpc
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerServer


@contextlib.asynccontextmanager
async def plain_scheduler(peers: Iterable[str], random_seed: int = 0) -> AsyncIterator[tuple[SchedulerServer,
                                                                                              pb_grpc.SchedulerStub]]:
    """(server, stub) with ``peers`` registered (host id ``host-<peer>``, upload port 4000 on 127.0.0.1)."""
    server = await SchedulerServer(SchedulerConfig(random_seed=random_seed), "127.0.0.1:0",
                                   insecure_plain=True).start()
    channel = grpc.aio.insecure_channel(server.address)
    stub = pb_grpc.SchedulerStub(channel)
    try:
        for pid in peers:
            await stub.RegisterPeer(pb.RegisterPeerRequest(host=pb.PeerHost(
                peer_id=pid, host_id=f"host-{pid}", ip="127.0.0.1", upload_port=4000)))
        yield server, stub
    finally:
        await channel.close()
        await server.stop(0)
