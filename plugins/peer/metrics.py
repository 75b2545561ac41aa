"""Prometheus metrics of one peer daemon (served at ``/metrics`` on the mirror address).

A private :class:`prometheus_client.CollectorRegistry` per daemon, so several peers can run in one
process (tests) without their counters mixing.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class PeerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.bytes = Counter("remora_peer_download_bytes_total",
                             "Blob bytes downloaded, by source (peer or registry)", ["source"], registry=r)
        self.pieces = Counter("remora_peer_pieces_total", "Pieces downloaded, by source", ["source"], registry=r)
        self.piece_failures = Counter("remora_peer_piece_failures_total",
                                      "Pieces that failed to download, by reason", ["reason"], registry=r)
        self.blocklisted = Counter("remora_peer_blocklist_total",
                                   "Parents blocklisted for a task, by reason", ["reason"], registry=r)
        self.back_to_source = Counter("remora_peer_back_to_source_total",
                                      "Tasks that went to the registry, by reason", ["reason"], registry=r)
        self.tasks = Counter("remora_peer_tasks_total", "Download tasks finished, by result", ["result"], registry=r)
        self.upload_bytes = Counter("remora_peer_upload_bytes_total", "Piece bytes served to other peers",
                                    registry=r)
        self.upload_pieces = Counter("remora_peer_upload_pieces_total", "Pieces served to other peers, by result",
                                     ["result"], registry=r)
        self.served_bytes = Counter("remora_peer_served_bytes_total", "Bytes served to clients (containerd)",
                                    ["kind"], registry=r)
        self.requests = Counter("remora_peer_mirror_requests_total", "Mirror API requests, by kind and status",
                                ["kind", "status"], registry=r)
        self.piece_seconds = Histogram("remora_peer_piece_seconds", "Time to download one piece, by source",
                                       ["source"], registry=r,
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.store_bytes = Gauge("remora_peer_store_bytes", "Bytes of pieces on disk", registry=r)
        self.corrupt_pieces = Counter("remora_peer_store_corrupt_pieces_total",
                                      "Stored pieces that failed re-verification (dropped, fetched again)",
                                      registry=r)
        self.gc_evicted = Counter("remora_peer_gc_evicted_total", "Blobs evicted by the GC", ["reason"], registry=r)
        self.scheduler_errors = Counter("remora_peer_scheduler_errors_total", "Scheduler RPCs that failed",
                                        ["method"], registry=r)

        self.offline = Counter("remora_peer_offline_manifests_total",
                               "Manifest requests met while the registry was unreachable, by what was asked "
                               "(tag or digest) and the result (served from the kept copy, or why not)",
                               ["ref", "result"], registry=r)

        self.schedulers = Gauge("remora_peer_schedulers", "Schedulers in use (from the flags or the manager)",
                                registry=r)
        self.config_version = Gauge("remora_peer_config_version",
                                    "Version of the manager's dynamic config in force (0: flags only)", registry=r)
        self.manager_up = Gauge("remora_peer_manager_up", "1 when the manager answered the last round", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
