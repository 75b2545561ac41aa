"""Fixtures of the peer and scheduler tests.

The peer's mirror fetches only from registries it is configured for (``--registry``/``--upstream``;
issue 10). The test registries of tests/conftest.py are wrapped here so that every peer a test starts
with :func:`peer_util.start_peer` may fetch from the registries that test uses, and from no other.
"""
from __future__ import annotations

import peer_util
import pytest

from remora.plugins.scheduler.server import SchedulerConfig, SchedulerServer


def _allowing(reg):
    peer_util.REGISTRIES.append(reg.host)
    try:
        yield reg
    finally:
        peer_util.REGISTRIES.remove(reg.host)


@pytest.fixture(scope="session")
def registry(registry):
    yield from _allowing(registry)


@pytest.fixture(scope="session")
def auth_registry(auth_registry):
    yield from _allowing(auth_registry)


@pytest.fixture
def fresh_registry(fresh_registry):
    yield from _allowing(fresh_registry)


@pytest.fixture
async def scheduler():
    """A plain-mode scheduler on 127.0.0.1 (mutual TLS has its own tests: test_mesh_tls.py)."""
    server = await SchedulerServer(SchedulerConfig(random_seed=7), "127.0.0.1:0", insecure_plain=True).start()
    yield server
    await server.stop(0)


@pytest.fixture
async def peers(tmp_path):
    """``await peers(name, schedulers, **kw)`` starts a peer (peer_util.start_peer); all stop at the end."""
    started = []

    async def make(name, schedulers, **kw):
        p = await peer_util.start_peer(tmp_path, name, schedulers, **kw)
        started.append(p)
        return p

    yield make
    for p in started:
        await p.stop()
