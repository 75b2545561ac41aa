"""Prometheus metrics of the manager, on a registry of its own (one per app, so tests can run several).

Members by state and jobs by state are read from the database at scrape time (every replica reports
the same truth); job durations and preheated bytes are counted by the job engine of this replica.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from remora.plugins.manager.db import Job, Member
from remora.plugins.manager.membership import TYPES, expiry_of


class _StateCollector:
    def __init__(self, sessions, clock, interval: float):
        self.sessions, self.clock, self.interval = sessions, clock, interval

    def collect(self):
        members = GaugeMetricFamily("remora_manager_members", "Registered members by type and state",
                                    labels=["type", "state"])
        jobs = GaugeMetricFamily("remora_manager_jobs", "Jobs by type and state", labels=["type", "state"])
        now = self.clock.now()
        with self.sessions() as session:
            counts = {(t, s): 0 for t in ("scheduler", "seed_peer", "peer") for s in ("active", "inactive", "offline")}
            for typ, offline, n in session.execute(select(Member.type, Member.offline, func.count())
                                                   .group_by(Member.type, Member.offline)):
                counts[(typ, "offline" if offline else "active")] += n
            for typ in TYPES:
                n = session.scalar(select(func.count()).where(Member.type == typ, Member.offline.is_(False),
                                                              Member.last_seen < now - expiry_of(typ, self.interval)))
                counts[(typ, "active")] -= n
                counts[(typ, "inactive")] += n
            for (typ, state), n in sorted(counts.items()):
                members.add_metric([typ, state], n)
            by_state = select(Job.type, Job.state, func.count()).group_by(Job.type, Job.state)
            for typ, state, n in session.execute(by_state):
                jobs.add_metric([typ, state], n)
            fallbacks = GaugeMetricFamily(
                "remora_manager_member_registry_fallbacks",
                "Registry fallbacks (P2P bypassed) reported by active members, by cause", labels=["cause"])
            totals: dict[str, int] = {}
            for (stats,) in session.execute(select(Member.stats).where(
                    Member.last_seen >= now - expiry_of("peer", self.interval))):
                for cause, n in ((stats or {}).get("fallbacks") or {}).items():
                    if isinstance(n, int):
                        totals[str(cause)[:64]] = totals.get(str(cause)[:64], 0) + n
            for cause, n in sorted(totals.items()):
                fallbacks.add_metric([cause], n)
        yield members
        yield jobs
        yield fallbacks


class Metrics:
    def __init__(self, sessions, clock, interval: float):
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(sessions, clock, interval))
        self.job_duration = Histogram("remora_manager_job_duration_seconds", "Time from job creation to its end",
                                      ["type", "state"], registry=self.registry,
                                      buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, float("inf")))
        self.preheated_bytes = Counter("remora_manager_preheated_bytes", "Bytes verified on nodes by preheat jobs",
                                       registry=self.registry)
        self.requests = Counter("remora_manager_api_errors", "API requests refused, by status",
                                ["status"], registry=self.registry)
