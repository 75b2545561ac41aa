"""Bandwidth inferred from piece reports: concurrency correction, drift, LRU bounds, the state's hook, metrics."""
from __future__ import annotations

import random

from remora.plugins.scheduler.bandwidth import BandwidthEstimator, correction
from remora.plugins.scheduler.metrics import CAPACITY_HOSTS_EXPORTED, SchedulerMetrics
from remora.plugins.scheduler.selection import (
    FEATURE_NAMES,
    ParentSelector,
    WeightedScorer,
)
from remora.plugins.scheduler.state import Host, SchedulerState

TASK = "sha256:" + "cd" * 32
MIB = 1 << 20


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_goodput_is_corrected_for_the_parents_concurrency_and_capped_by_the_childs():
    est = BandwidthEstimator(normalized=False, clock=Clock())
    # 1 MiB in 1 s while the parent served 4 transfers: its link does 4 MiB/s for one transfer alone.
    assert est.observe("p", "c", MIB, 1.0, uploads=4, downloads=4) == 4 * MIB
    pair = est.pair("p", "c")
    assert pair.goodput == 4 * MIB and pair.raw == MIB and pair.samples == 1
    assert est.capacity("p").goodput == 4 * MIB
    # A child on one parent whose report says the parent served 40: the child's link caps the credit.
    assert correction(40, 1, normalized=False) == 4
    # Peers that already divided the cost by the parent's uploads (X-Remora-Uploads) are not corrected twice.
    assert correction(40, 1, normalized=True) == 1
    # Nothing to learn from: no bytes, no time, a peer on the parent's own host.
    assert est.observe("p", "c", 0, 1.0) is None
    assert est.observe("p", "c", MIB, 0.0) is None
    assert est.observe("p", "p", MIB, 1.0) is None
    assert est.samples == 1


def test_the_estimate_follows_a_link_that_gets_congested():
    est = BandwidthEstimator(normalized=True, clock=Clock())
    rng = random.Random(3)
    for _ in range(20):
        est.observe("p", "c", MIB, MIB / (100e6 * rng.lognormvariate(0, 0.1)))
    assert 80e6 < est.pair("p", "c").goodput < 120e6
    for _ in range(12):                               # cross traffic: a tenth of the link is left
        est.observe("p", "c", MIB, MIB / (10e6 * rng.lognormvariate(0, 0.1)))
    assert est.pair("p", "c").goodput < 15e6
    assert est.expected("p", "c", uploads_now=1) == est.pair("p", "c").goodput / 2
    assert est.expected("p", "other", uploads_now=0) == est.capacity("p").goodput    # host estimate
    assert est.expected("nobody", "c", 0) is None


def test_memory_is_bounded_least_recently_updated_first():
    est = BandwidthEstimator(max_pairs=3, max_hosts=2, clock=Clock())
    for i in range(5):
        est.observe(f"p{i}", "c", MIB, 0.1)
    assert list(est.pairs) == [("p2", "c"), ("p3", "c"), ("p4", "c")]
    assert list(est.hosts) == ["p3", "p4"]
    est.observe("p2", "c", MIB, 0.1)                  # refreshed: now the newest
    est.observe("p5", "c", MIB, 0.1)
    assert ("p2", "c") in est.pairs and ("p3", "c") not in est.pairs
    assert est.evicted == (2 + 3) + 1 + (1 + 1)      # p2 re-enters the hosts; p5 enters both


def _peer(state, pid, done=False):
    state.register_peer(Host(peer_id=pid, host_id=f"h-{pid}", ip="127.0.0.1", upload_port=1))
    state.join_task(pid, TASK, content_length=8 * MIB, piece_size=MIB)
    return state.announce(pid, TASK, range(8) if done else (), (), done=done)


def test_piece_reports_feed_the_estimator_with_the_concurrency_the_scheduler_knows():
    clock = Clock()
    state = SchedulerState(clock=clock)
    state.bandwidth.normalized = False                # raw times, as the simulation reports them
    _peer(state, "parent", done=True)
    for kid in ("a", "b", "c"):
        _peer(state, kid)
    task = state.tasks[TASK]
    for kid in ("a", "b", "c"):
        task.set_parents(kid, ["parent"])             # the parent serves three unfinished children
    state.report_piece("a", TASK, "parent", 0, True, 0.5, MIB)
    pair = state.bandwidth.pair("h-parent", "h-a")
    assert pair is not None and abs(pair.goodput - 3 * MIB / 0.5) < 1e-6
    assert abs(state.bandwidth.capacity("h-parent").goodput - 3 * MIB / 0.5) < 1e-6
    state.report_piece("a", TASK, "parent", 1, False, 5.0, MIB, "timeout")   # failures are not samples
    assert state.bandwidth.samples == 1
    # The selector exposes the estimates as features of the candidate (beside the probe RTT).
    state.record_probe("b", "parent", 0.004, True)
    clock.now += 2
    sel = ParentSelector(state, WeightedScorer())
    child = task.peers["b"]
    (feat,) = sel.features(task, child, [task.peers["parent"]])
    raw = dict(zip(FEATURE_NAMES, feat.raw))
    assert raw["pair_goodput"] is None                        # nothing measured parent -> b yet
    assert raw["host_capacity"] == state.bandwidth.capacity("h-parent").goodput
    assert raw["expected_goodput"] == raw["host_capacity"] / (3 + 1)
    assert raw["rtt_s"] == 0.004 and raw["parent_load"] == 3 and raw["parent_done"] == 1.0
    assert raw["estimate_age_s"] == 2


def test_estimates_are_exported_as_metrics_for_a_bounded_set_of_hosts():
    state = SchedulerState(clock=Clock())
    for i in range(CAPACITY_HOSTS_EXPORTED + 10):
        state.bandwidth.observe(f"host{i}", "c", MIB, 0.01)
    text = SchedulerMetrics(state, "weighted").render().decode()
    assert "remora_scheduler_bandwidth_samples_total %.1f" % (CAPACITY_HOSTS_EXPORTED + 10) in text
    assert f"remora_scheduler_bandwidth_hosts {CAPACITY_HOSTS_EXPORTED + 10}.0" in text
    capacity_lines = [ln for ln in text.splitlines() if ln.startswith("remora_scheduler_host_upload_capacity_bytes{")]
    assert len(capacity_lines) == CAPACITY_HOSTS_EXPORTED
    newest = f'remora_scheduler_host_upload_capacity_bytes{{host="host{CAPACITY_HOSTS_EXPORTED + 9}"}}'
    assert any(ln.startswith(newest) and abs(float(ln.split()[-1]) - MIB / 0.01) < 1 for ln in capacity_lines)
    assert not any('host="host0"' in ln for ln in capacity_lines)
