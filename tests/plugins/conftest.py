"""Fixtures of the peer and scheduler tests.

The peer's mirror fetches only from registries it is configured for (``--registry``/``--upstream``;
issue 10). The test registries of tests/conftest.py are wrapped here so that every peer a test starts
with :func:`peer_util.start_peer` may fetch from the registries that test uses, and from no other.
"""
from __future__ import annotations

import pytest

import peer_util


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
