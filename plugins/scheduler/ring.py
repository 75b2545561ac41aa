"""Consistent hashing of tasks (blob digests) onto schedulers.

Every peer must send the requests of one task to the same scheduler, or the task's view of who holds
which piece splits in two. Peers agree without talking to each other by hashing the task id onto a ring
of schedulers: each scheduler owns ``replicas`` virtual points, a task belongs to the first point at or
after its hash. Adding or removing one of N schedulers moves only about 1/N of the tasks, and when the
owner is down the next distinct scheduler clockwise is the same for every peer, so failover converges
on one scheduler too.
"""
from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

from remora.errors import UsageError

DEFAULT_REPLICAS = 160


def _hash(key: str) -> int:
    # sha256 rather than hash(): stable across processes and Python versions, which the ring must be.
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


class SchedulerRing:
    """A ring of scheduler addresses (``host:port``); :meth:`pick` gives the failover order for a task."""

    def __init__(self, addresses: Iterable[str], replicas: int = DEFAULT_REPLICAS):
        unique = []
        for address in addresses:
            address = address.strip()
            if address and address not in unique:
                unique.append(address)
        if not unique:
            raise UsageError("no scheduler address given")
        if replicas < 1:
            raise UsageError(f"replicas must be >= 1, got {replicas}")
        self.addresses: tuple[str, ...] = tuple(unique)
        points = sorted((_hash(f"{address}#{i}"), address) for address in unique for i in range(replicas))
        self._keys = [k for k, _ in points]
        self._owners = [a for _, a in points]

    def pick(self, task_id: str) -> list[str]:
        """Every scheduler, owner of ``task_id`` first, then the failover order (same for every peer)."""
        start = bisect.bisect_left(self._keys, _hash(task_id))
        order: list[str] = []
        n = len(self._keys)
        for i in range(n):
            owner = self._owners[(start + i) % n]
            if owner not in order:
                order.append(owner)
                if len(order) == len(self.addresses):
                    break
        return order

    def owner(self, task_id: str) -> str:
        """The scheduler responsible for ``task_id`` while it is up (``pick(task_id)[0]``)."""
        return self._owners[bisect.bisect_left(self._keys, _hash(task_id)) % len(self._keys)]

    def __len__(self) -> int:
        return len(self.addresses)

    def __repr__(self) -> str:
        return f"SchedulerRing({list(self.addresses)!r})"
