"""Metrics of lazy mounts: counted in each fs process, published as a JSON file, exported by Prometheus.

Each mount runs in its own process, so its counters cannot live in the snapshotter's memory. The fs
process keeps plain counters (:class:`remora.snapshotter.fetch.Stats`, :class:`OpLatency`, the cache's
hit/miss counts) and rewrites ``<state>/<id>.stats.json`` atomically every second and at exit
(:func:`write_stats`). The snapshotter side registers :class:`MountCollector`, which reads those
files at scrape time and yields Prometheus metric families labelled by mount, plus the shared cache's
size. A scrape therefore never talks to an fs process: a hung mount cannot stall ``/metrics``.

Exported names (all prefixed ``remora_``): ``fetch_bytes_total``, ``fetch_requests_total``,
``fetch_merged_requests_total``, ``fetch_frames_total``, ``fetch_verify_failures_total``,
``fetch_source_errors_total``, ``fetch_failures_total``, ``fetch_singleflight_waits_total``,
``cache_hits_total``, ``cache_misses_total``, ``cache_corrupt_total``, ``prefetch_files``/
``prefetch_files_done``/``prefetch_bytes_total``/``prefetch_complete``, ``fuse_op_seconds``
(histogram, label ``op``), ``mount_up``, ``cache_bytes``, ``cache_limit_bytes``, ``cache_chunks``,
``cache_partition_bytes``/``cache_partition_chunks`` (label ``partition``: one per tenant with
``--cache-isolation``);
from the snapshotter's own early prefetch (:class:`StagingCollector`): ``early_prefetch_blobs_total``,
``early_prefetch_bytes_total``, ``early_prefetch_failures_total``.
"""
from __future__ import annotations

import bisect
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class OpLatency:
    """Per-operation latency histograms (Prometheus bucket layout) for the FUSE ops of one mount."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ops: dict[str, list] = {}  # op -> [bucket counts..., +Inf count, sum]

    def observe(self, op: str, seconds: float) -> None:
        i = bisect.bisect_left(BUCKETS, seconds)
        with self._lock:
            h = self._ops.get(op)
            if h is None:
                h = self._ops[op] = [0] * (len(BUCKETS) + 1) + [0.0]
            h[i] += 1
            h[-1] += seconds

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {op: {"counts": h[:-1], "sum": h[-1]} for op, h in self._ops.items()}


def write_stats(path: Path, data: dict) -> None:
    """Atomically replace the stats file (readers never see a half-written one)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_stats(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class StatsWriter:
    """Background thread of the fs process: ``collect()`` every ``interval`` seconds into ``path``."""

    def __init__(self, path: Path, collect: Callable[[], dict], interval: float = 1.0):
        self.path, self.collect, self.interval = Path(path), collect, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats", daemon=True)

    def start(self) -> StatsWriter:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()

    def write(self) -> None:
        try:
            write_stats(self.path, {"time": time.time(), **self.collect()})
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        self.write()


_COUNTERS = {
    # stats key -> (metric name, help)
    "bytes_fetched": ("fetch_bytes", "Compressed bytes received from blob sources (including merge gaps)."),
    "requests": ("fetch_requests", "HTTP range requests made to blob sources."),
    "merged_requests": ("fetch_merged_requests", "Range requests that covered more than one frame."),
    "frames_fetched": ("fetch_frames", "Frames fetched and verified."),
    "verify_failures": ("fetch_verify_failures", "Frames rejected: corrupt zstd or chunk digest mismatch."),
    "source_errors": ("fetch_source_errors", "Failed requests (unreachable, timeout, HTTP error)."),
    "fetch_failures": ("fetch_failures", "Frames no source could deliver (reads got EIO)."),
    "singleflight_waits": ("fetch_singleflight_waits", "Frames a reader waited for instead of refetching."),
    "cache_hits": ("cache_hits", "Chunks served from the disk cache."),
    "cache_misses": ("cache_misses", "Chunk cache misses."),
    "cache_corrupt": ("cache_corrupt", "Corrupt cache entries detected and dropped."),
    "prefetch_bytes": ("prefetch_bytes", "Chunk bytes covered by background prefetch."),
}
_GAUGES = {
    "prefetch_files_total": ("prefetch_files", "Files on the prefetch list."),
    "prefetch_files_done": ("prefetch_files_done", "Prefetch list files processed."),
    "prefetch_done": ("prefetch_complete", "1 when background prefetch has finished."),
}


class MountCollector:
    """A prometheus_client collector over the stats files of the mounts ``mounts()`` returns.

    ``mounts`` yields ``(mount id, stats file, up)``; ``cache`` (optional) is a ChunkCache whose
    ``info()`` gives the shared cache's size. Register with ``REGISTRY.register(MountCollector(...))``.
    """

    def __init__(self, mounts: Callable[[], Iterable[tuple[str, Path, bool]]], cache=None, prefix: str = "remora"):
        self.mounts, self.cache, self.prefix = mounts, cache, prefix

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        p = self.prefix
        counters = {k: CounterMetricFamily(f"{p}_{n}", h, labels=["mount"]) for k, (n, h) in _COUNTERS.items()}
        gauges = {k: GaugeMetricFamily(f"{p}_{n}", h, labels=["mount"]) for k, (n, h) in _GAUGES.items()}
        up = GaugeMetricFamily(f"{p}_mount_up", "1 if the mount's fs process answers.", labels=["mount"])
        hist = HistogramMetricFamily(f"{p}_fuse_op_seconds", "Latency of FUSE operations in the fs process.",
                                     labels=["mount", "op"])
        for mount_id, stats_file, alive in self.mounts():
            up.add_metric([mount_id], 1.0 if alive else 0.0)
            data = read_stats(stats_file) or {}
            values = {**data.get("fetch", {}), **data.get("cache", {})}
            for k, fam in counters.items():
                fam.add_metric([mount_id], float(values.get(k, 0)))
            for k, fam in gauges.items():
                fam.add_metric([mount_id], float(values.get(k, 0)))
            for op, h in (data.get("ops") or {}).items():
                acc, buckets = 0, []
                for bound, n in zip(list(BUCKETS) + [float("inf")], h["counts"]):
                    acc += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
                hist.add_metric([mount_id, op], buckets, h["sum"])
        yield from counters.values()
        yield from gauges.values()
        yield up
        yield hist
        if self.cache is not None:
            info = self.cache.info()
            yield GaugeMetricFamily(f"{p}_cache_bytes", "Bytes in the shared chunk cache.", value=info["bytes"])
            yield GaugeMetricFamily(f"{p}_cache_limit_bytes", "Chunk cache size limit.", value=info["limit"])
            yield GaugeMetricFamily(f"{p}_cache_chunks", "Chunks in the shared chunk cache.", value=info["chunks"])
            by_part = GaugeMetricFamily(f"{p}_cache_partition_bytes", "Bytes in one partition of the chunk cache "
                                        "(--cache-isolation; partition \"\" is the shared one).", labels=["partition"])
            chunks = GaugeMetricFamily(f"{p}_cache_partition_chunks", "Chunks in one partition of the chunk cache.",
                                       labels=["partition"])
            for part, v in sorted(info.get("partitions", {}).items()):
                by_part.add_metric([part], v["bytes"])
                chunks.add_metric([part], v["chunks"])
            yield by_part
            yield chunks


class StagingCollector:
    """Counters of the snapshotter's early prefetch (:class:`remora.snapshotter.staging.StagingArea`):
    ``counters()`` returns ``{"blobs", "bytes", "failures"}``."""

    def __init__(self, counters: Callable[[], dict], prefix: str = "remora"):
        self.counters, self.prefix = counters, prefix

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        c = self.counters()
        p = self.prefix
        yield CounterMetricFamily(f"{p}_early_prefetch_blobs", "Hot blobs whose early prefetch was started.",
                                  value=c["blobs"])
        yield CounterMetricFamily(f"{p}_early_prefetch_bytes", "Bytes of hot blobs streamed into the staging area.",
                                  value=c["bytes"])
        yield CounterMetricFamily(f"{p}_early_prefetch_failures",
                                  "Early prefetches that no source completed (mounts then read elsewhere).",
                                  value=c["failures"])
