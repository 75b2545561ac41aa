"""Fuzzing in CI: hypothesis-driven, bounded in time and memory.

Every test under ``tests/fuzz`` runs with the process's address space capped (soft RLIMIT_AS, put
back after the test), so an input that makes a parser allocate without bound fails the test with a
MemoryError instead of taking the machine down. The ``ci`` profile (chosen when ``CI`` is set) is
derandomized: a CI failure reproduces by running the same test again; locally each run explores new
inputs. Each parser under fuzz must answer every input with a clean ``RemoraError`` (or the exception
type the test names), never a traceback of another kind.
"""
from __future__ import annotations

import os
import resource

import pytest
from hypothesis import HealthCheck, settings

# Headroom above what the process already maps (pytest, grpc, numpy...): a parser may use this much.
FUZZ_HEADROOM = 1 << 30

settings.register_profile(
    "ci", max_examples=300, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("REMORA_FUZZ_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


@pytest.fixture(autouse=True)
def address_space_limit():
    """Cap the address space at what is mapped now plus FUZZ_HEADROOM for the test's duration."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + FUZZ_HEADROOM
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
