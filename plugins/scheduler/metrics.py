"""Prometheus metrics of the scheduler, served on an HTTP ``/metrics`` port.

Every scheduler instance has its own ``CollectorRegistry`` (several run in one test process). Gauges
(peers, tasks by state) are computed from the state at scrape time by a collector; the HTTP server is an
aiohttp app on the scheduler's own event loop, so a scrape never reads the state while an RPC changes it.
"""
from __future__ import annotations

from collections import Counter as Tally

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .state import SchedulerState


class _StateCollector:
    def __init__(self, state: SchedulerState):
        self.state = state

    def collect(self):
        peers = GaugeMetricFamily("remora_scheduler_peers", "Peers registered and not expired")
        peers.add_metric([], len(self.state.peers))
        tasks = GaugeMetricFamily("remora_scheduler_tasks", "Tasks (blobs) by state", labels=["state"])
        by_state = Tally(t.state for t in self.state.tasks.values())
        for name in ("pending", "running", "succeeded", "failed"):
            tasks.add_metric([name], by_state.get(name, 0))
        task_peers = GaugeMetricFamily("remora_scheduler_task_peers", "Peer memberships over all tasks")
        task_peers.add_metric([], sum(len(t.peers) for t in self.state.tasks.values()))
        yield peers
        yield tasks
        yield task_peers
        yield from _bandwidth_families(self.state)


#: Hosts whose upload capacity estimate is exported (the most recently updated): a bounded label set.
CAPACITY_HOSTS_EXPORTED = 64


def _bandwidth_families(state: SchedulerState):
    """The bandwidth estimator (plugins/scheduler/bandwidth.py), read at scrape time."""
    from prometheus_client.core import CounterMetricFamily

    bw = state.bandwidth
    samples = CounterMetricFamily("remora_scheduler_bandwidth_samples", "Piece reports turned into goodput samples")
    samples.add_metric([], bw.samples)
    evicted = CounterMetricFamily("remora_scheduler_bandwidth_evicted", "Estimates dropped by the LRU caps")
    evicted.add_metric([], bw.evicted)
    pairs = GaugeMetricFamily("remora_scheduler_bandwidth_pairs", "Host pairs with a goodput estimate")
    pairs.add_metric([], len(bw.pairs))
    hosts = GaugeMetricFamily("remora_scheduler_bandwidth_hosts", "Hosts with an upload capacity estimate")
    hosts.add_metric([], len(bw.hosts))
    cap = GaugeMetricFamily("remora_scheduler_host_upload_capacity_bytes",
                            f"Estimated upload capacity (bytes/s, corrected for concurrency) of the "
                            f"{CAPACITY_HOSTS_EXPORTED} most recently measured hosts", labels=["host"])
    for host, est in bw.top_hosts(CAPACITY_HOSTS_EXPORTED):
        cap.add_metric([host], est.goodput)
    yield from (samples, evicted, pairs, hosts, cap)


class SchedulerMetrics:
    def __init__(self, state: SchedulerState, scorer: str):
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(state))
        r = self.registry
        self.scorer = scorer
        self.parent_decisions = Counter(
            "remora_scheduler_parent_decisions", "GetParents/RegisterTask outcomes",
            ["scorer", "outcome"], registry=r)
        self.parents_returned = Counter(
            "remora_scheduler_parents_returned", "Parents handed out", ["scorer"], registry=r)
        self.candidates_dropped = Counter(
            "remora_scheduler_candidates_dropped", "Candidates dropped by a filter rule", ["reason"], registry=r)
        self.blocklist_events = Counter(
            "remora_scheduler_blocklist_events", "Parents blocklisted for a child and task", ["reason"], registry=r)
        self.back_to_source = Counter(
            "remora_scheduler_back_to_source", "Peers sent back to the registry", ["reason"], registry=r)
        self.task_resets = Counter(
            "remora_scheduler_task_resets", "Tasks whose seed failed or vanished (a new seed is elected)",
            ["reason"], registry=r)
        self.peers_expired = Counter(
            "remora_scheduler_peers_expired", "Peers forgotten after their TTL", registry=r)
        self.piece_results = Counter(
            "remora_scheduler_piece_results", "Piece results reported by children", ["outcome"], registry=r)
        self.rpc_seconds = Histogram(
            "remora_scheduler_rpc_duration_seconds", "RPC handling time", ["method"], registry=r,
            buckets=(0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0))
        self.refused = Counter(
            "remora_scheduler_refused", "Calls refused: not a cluster member, or a peer speaking for another host",
            ["method"], registry=r)
        self.mesh_tls = Gauge(
            "remora_scheduler_mesh_tls", "1: gRPC over mutual TLS (members only); 0: PLAIN (insecure)", registry=r)

        # The learned scorer (plugins/scheduler/learned.py).
        self.scorer_active = Gauge(
            "remora_scheduler_scorer", "1 for the scorer that ranked the last decision (learned, or weighted "
            "when the learned scorer falls back)", ["kind"], registry=r)
        self.scorer_fallbacks = Counter(
            "remora_scheduler_scorer_fallbacks", "Decisions the learned scorer left to the weighted scorer",
            ["reason"], registry=r)
        self.predicted_cost = Histogram(
            "remora_scheduler_predicted_cost_seconds_per_mib", "Predicted piece cost of the parents handed out",
            registry=r, buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0))
        self.model_version = Gauge(
            "remora_scheduler_model_version", "Version of the loaded cost model (0: none)", registry=r)
        self.history_rows = Counter(
            "remora_scheduler_history_rows", "Download records written to the history", registry=r)

        # The manager's dynamic config (plugins/scheduler/managed.py).
        self.config_version = Gauge(
            "remora_scheduler_config_version", "Version of the manager's dynamic config in force (0: flags only)",
            registry=r)
        self.config_value = Gauge(
            "remora_scheduler_config_value", "Values in force of the dynamic config", ["name"], registry=r)
        self.manager_up = Gauge(
            "remora_scheduler_manager_up", "1 when the manager answered the last round", registry=r)

    def config_applied(self, version: int, service) -> None:
        from remora.piecelayout import piece_bounds

        sel = service.config.selection
        lo, hi = piece_bounds()
        self.config_version.set(version)
        for name, value in (("candidate_parent_limit", sel.parent_limit), ("filter_parent_limit", sel.candidate_limit),
                            ("piece_size_min", lo), ("piece_size_max", hi),
                            ("blocklisted_digests", len(service.blocked_digests))):
            self.config_value.labels(name).set(value)

    def scorer_kind(self, kind: str, reason: str = "") -> None:
        for k in ("learned", "weighted"):
            self.scorer_active.labels(k).set(1 if k == kind else 0)
        if reason:
            self.scorer_fallbacks.labels(reason).inc()

    def decision(self, outcome: str) -> None:
        self.parent_decisions.labels(self.scorer, outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> web.AppRunner:
        """Start ``/metrics`` (and ``/healthz``) on host:port; returns the runner to ``cleanup()``."""
        async def metrics(_request):
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_request):
            return web.Response(text="ok\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner
