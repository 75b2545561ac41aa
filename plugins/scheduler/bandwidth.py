"""Bandwidth inferred from the piece reports children already send: per host pair and per host.

A peer's *declared* upload bandwidth is often missing or wrong, and RTT probes say nothing about
throughput. Every piece report already carries what is needed: parent, child, bytes (the piece size) and
the time it took (``cost_us``). This module turns those into two estimates, kept per *host* (a peer id
changes with every daemon run, a machine's link does not):

* **pair goodput** (parent host -> child host): an EWMA of what that link delivers to one transfer when
  the parent serves it alone, i.e. the sample goodput ``size / cost`` times the parent's concurrency
  (``uploads``: transfers the parent serves at report time, as the scheduler knows them, at least 1). A
  link shared by four children moves a piece four times slower without being a worse link. The child's
  side (``downloads``: parents it fetches from at that time) caps that correction, see
  :func:`correction`.
* **host upload capacity**: an EWMA of the same corrected samples over all children of the host.

Real peers report ``cost_us`` already divided by the uploads the parent said it was serving
(``X-Remora-Uploads``, docs/p2p.md): for those the parent-side correction is done, and the scheduler
passes ``normalized=True`` (factor 1). The simulation reports raw times and lets the scheduler correct.

Memory is bounded: both maps are LRU (``max_pairs``, ``max_hosts``), the least recently updated entry goes
first. Everything is plain bookkeeping on the scheduler's event loop (no locks, injectable clock).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_ALPHA = 0.3            # weight of a new sample
MAX_PAIRS = 100_000            # ~100 bytes each: ~10 MB at the cap
MAX_HOSTS = 20_000
MAX_DOWNLOAD_SHARE = 4         # see correction()


@dataclass
class Estimate:
    goodput: float             # bytes/s, corrected for concurrency
    samples: int
    updated_at: float
    raw: float                 # EWMA of the uncorrected goodput (what children actually saw)


def correction(uploads: int, downloads: int, normalized: bool) -> float:
    """Factor that turns one transfer's goodput into the link's goodput for a transfer alone.

    The parent's uplink is shared by ``uploads`` transfers, so one of them sees ~1/uploads of it. When the
    costs were already divided by the parent's uploads (``normalized``), nothing is left to correct. The
    child's downlink is shared by its ``downloads`` parents; when the child fetches from many parents at
    once its own link, not the parent's, may be the bottleneck, and then multiplying by ``uploads`` would
    credit the parent with bandwidth the child never had: the factor is capped at
    ``MAX_DOWNLOAD_SHARE * downloads`` (a loose bound; children fetch from <= 4 parents by default).
    """
    if normalized:
        return 1.0
    up = max(1, uploads)
    down = max(1, downloads)
    return float(min(up, MAX_DOWNLOAD_SHARE * down))


class BandwidthEstimator:
    """Per host pair and per host goodput estimates, bounded (LRU)."""

    def __init__(self, alpha: float = DEFAULT_ALPHA, max_pairs: int = MAX_PAIRS, max_hosts: int = MAX_HOSTS,
                 normalized: bool = True, clock: Callable[[], float] = time.monotonic):
        if not 0 < alpha <= 1 or max_pairs < 1 or max_hosts < 1:
            raise ValueError("bandwidth estimator needs 0 < alpha <= 1 and positive caps")
        self.alpha = alpha
        self.max_pairs = max_pairs
        self.max_hosts = max_hosts
        self.normalized = normalized
        self.clock = clock
        self.pairs: OrderedDict[tuple[str, str], Estimate] = OrderedDict()
        self.hosts: OrderedDict[str, Estimate] = OrderedDict()
        self.samples = 0
        self.evicted = 0

    def _update(self, table: OrderedDict, key, corrected: float, raw: float, cap: int) -> Estimate:
        now = self.clock()
        est = table.get(key)
        if est is None:
            est = table[key] = Estimate(goodput=corrected, samples=1, updated_at=now, raw=raw)
            while len(table) > cap:
                table.popitem(last=False)
                self.evicted += 1
            return est
        a = self.alpha
        est.goodput = (1 - a) * est.goodput + a * corrected
        est.raw = (1 - a) * est.raw + a * raw
        est.samples += 1
        est.updated_at = now
        table.move_to_end(key)
        return est

    def observe(self, parent_host: str, child_host: str, size: int, cost_s: float, uploads: int = 1,
                downloads: int = 1) -> float | None:
        """One successful piece of ``size`` bytes in ``cost_s`` seconds; returns the corrected sample
        (bytes/s), or None when the report says nothing (no bytes, no time, same host)."""
        if size <= 0 or not cost_s or cost_s <= 0 or not parent_host or parent_host == child_host:
            return None
        raw = size / cost_s
        corrected = raw * correction(uploads, downloads, self.normalized)
        self._update(self.pairs, (parent_host, child_host), corrected, raw, self.max_pairs)
        self._update(self.hosts, parent_host, corrected, raw, self.max_hosts)
        self.samples += 1
        return corrected

    def pair(self, parent_host: str, child_host: str) -> Estimate | None:
        return self.pairs.get((parent_host, child_host))

    def capacity(self, host: str) -> Estimate | None:
        return self.hosts.get(host)

    def expected(self, parent_host: str, child_host: str, uploads_now: int) -> float | None:
        """Goodput one more child should expect from the parent now: the pair's (else the host's)
        corrected goodput shared with the ``uploads_now`` transfers it already serves."""
        est = self.pair(parent_host, child_host) or self.capacity(parent_host)
        if est is None:
            return None
        return est.goodput / (max(0, uploads_now) + 1)

    def top_hosts(self, n: int) -> list[tuple[str, Estimate]]:
        """The ``n`` most recently updated hosts (what the metrics export: a bounded label set)."""
        out = []
        for host in reversed(self.hosts):
            out.append((host, self.hosts[host]))
            if len(out) >= n:
                break
        return out
