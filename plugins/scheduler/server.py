"""The gRPC service (grpc.aio) of ``remora scheduler``.

Handlers translate messages into :class:`.state.SchedulerState` transitions and :class:`.selection.
ParentSelector` decisions. The scheduling policy lives in :meth:`SchedulerService.schedule`:

1. a peer that is the seed (or was already sent to the registry) keeps being told so;
2. parents the caller blocklisted join the task's blocklist for that caller, for good;
3. a task with no working seed and no complete peer elects the caller as its seed (back to source),
   unless the caller's own registry fetch failed for this task and another peer can try instead, or
   the caller already fetches another blob from the registry while a peer of the task that fetches none
   has asked lately (or, for a preheat, a peer that fetches none is preheating too): that one is elected
   when it asks next (the caller hears "retry"), for at most :data:`SEED_SPREAD_WAIT` (see
   :meth:`SchedulerService.seed_elsewhere`);
4. otherwise the selector's best parents are returned — possibly the seed itself while it still
   downloads, since peers announce the pieces they have in flight;
5. no usable parent: "retry after N ms"; after ``max_schedule_failures`` such answers in a row, the
   peer is sent to the registry itself so a stuck mesh never blocks a container start.

Everything runs on one event loop and no handler awaits in the middle of a state change: no locks.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import random
import time
from dataclasses import dataclass, field

import grpc

from remora._proto import remora_scheduler_pb2 as pb
from remora._proto import remora_scheduler_pb2_grpc as pb_grpc
from remora.errors import UsageError

from . import validate as v
from .bandit import BanditScorer
from .metrics import SchedulerMetrics
from .selection import ParentSelector, Scorer, SelectionConfig, WeightedScorer
from .state import Exhausted, Host, SchedulerState, Task, TaskPeer, UnknownPeer
from .validate import BadRequest

log = logging.getLogger(__name__)

#: How long a task may wait for a peer that fetches nothing from the registry to ask (and be elected seed)
#: before a busy peer is elected after all; children ask every ~100 ms, so the free one asks well before.
SEED_SPREAD_WAIT = 1.0
#: "Ask again" delay for a busy peer whose election was put off.
SEED_SPREAD_RETRY_MS = 100
#: Peers of a task looked at for a free one (a task may have thousands).
SEED_SPREAD_SCAN = 64


@dataclass
class SchedulerConfig:
    peer_ttl: float = 60.0               # forget a peer silent this long (seconds)
    keepalive_interval: float = 0.0      # told to peers; 0 = peer_ttl / 3
    probe_interval: float = 30.0
    probe_count: int = 5                 # hosts a peer probes per SyncProbes round
    retry_after_ms: int = 200            # "no parent yet, ask again" delay
    max_schedule_failures: int = 25      # parentless answers in a row before back-to-source (~5 s)
    max_piece_failures: int = 3          # failed pieces in a row before a parent is blocklisted
    scorer: str = "weighted"             # "weighted", "bandit", "learned" or "random"
    bandit_c: float = 0.05
    bandit_gamma: float = 0.99
    bandit_prior_weight: float = 8.0
    random_seed: int | None = None
    model_dir: str | None = None         # learned scorer: where `remora trainer` publishes models
    model_max_age: float = 7 * 24 * 3600.0   # older models are not used (weighted fallback)
    model_max_error: float = 0.5         # nor models with a larger validation median relative error
    model_min_advantage: float = 0.2     # nor models not this much better than the naive predictor (learned.py)
    model_separation: float = 2.0        # decisions the model cannot tell apart go to the weighted scorer
    history_dir: str | None = None       # download history for the trainer (plugins/scheduler/history.py)
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def __post_init__(self):
        if self.peer_ttl <= 0:
            raise UsageError(f"peer TTL must be > 0, got {self.peer_ttl}")
        if self.scorer not in SCORERS:
            raise UsageError(f"unknown scorer {self.scorer!r} (use one of {', '.join(SCORERS)})")
        if self.scorer == "learned" and not self.model_dir:
            raise UsageError("the learned scorer needs a model directory (--model-dir)")
        if self.model_max_age <= 0 or self.model_max_error <= 0:
            raise UsageError("--model-max-age and --model-max-error must be > 0")
        if not 0 <= self.model_min_advantage < 1 or self.model_separation < 0:
            raise UsageError("--model-min-advantage must be in [0, 1) and --model-separation >= 0")
        if self.max_schedule_failures < 1 or self.max_piece_failures < 1:
            raise UsageError("max schedule/piece failures must be >= 1")
        if not self.keepalive_interval:
            self.keepalive_interval = self.peer_ttl / 3


SCORERS = ("weighted", "bandit", "learned", "random")


def make_scorer(config: SchedulerConfig, clock=time.monotonic) -> Scorer:
    """The scorer ``config`` names; ``clock`` paces the learned scorer's model polls (the service's clock,
    so that a test's injected clock decides when a new model file is looked at)."""
    if config.scorer == "learned":
        from .learned import LearnedScorer, ModelWatcher

        return LearnedScorer(ModelWatcher(config.model_dir, config.model_max_age, config.model_max_error,
                                          clock=clock, min_advantage=config.model_min_advantage),
                             separation=config.model_separation)
    if config.scorer == "random":
        from .selection import RandomScorer

        return RandomScorer(random.Random(config.random_seed))
    if config.scorer == "bandit":
        return BanditScorer(c=config.bandit_c, gamma=config.bandit_gamma, prior_weight=config.bandit_prior_weight)
    return WeightedScorer()


class UnknownTask(KeyError):
    """Maps to NOT_FOUND (StatTask of a task the scheduler does not hold)."""


class _Refused(Exception):
    """A caller that is not a cluster member (or speaks for another host): PERMISSION_DENIED."""


#: Certificate roles that may use the scheduler: peers, other schedulers, the manager. Role ``client``
#: (an operator's tool, a CI job) passes the TLS handshake of the CA but gets PERMISSION_DENIED here.
MEMBER_ROLES = ("peer", "scheduler", "manager")


def _rpc(method):
    """Time the handler and map state errors to gRPC status codes (FAILED_PRECONDITION, NOT_FOUND,
    INVALID_ARGUMENT, RESOURCE_EXHAUSTED).

    The status is set on the context and the handler returns, rather than ``context.abort`` from inside
    the ``except``: an exception raised there keeps the handler's frame, and with it the request (a
    refused 2 MB announcement and the lists made from it), alive in a reference cycle until the cyclic GC
    runs. A stream of refused requests grew the scheduler by ~4 MB each that way.
    """
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: SchedulerService, request, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        code = None
        try:
            if self.members_only:
                refused = self.refuse(name, request, context)
                if refused:
                    code, details = grpc.StatusCode.PERMISSION_DENIED, refused
                    raise _Refused
            return method(self, request)
        except _Refused:
            pass
        except UnknownPeer as exc:
            # FAILED_PRECONDITION, not NOT_FOUND: the client re-registers on exactly this code.
            code, details = grpc.StatusCode.FAILED_PRECONDITION, (
                f"unknown peer {exc.args[0]!r}: call RegisterPeer first (expired or scheduler restarted)")
        except UnknownTask as exc:
            code, details = grpc.StatusCode.NOT_FOUND, f"unknown task {exc.args[0]!r}"
        except BadRequest as exc:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except Exhausted as exc:
            code, details = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        except Exception:
            log.exception("%s failed", name)   # a bug: grpc answers UNKNOWN, the client fails over
            raise
        finally:
            self.metrics.rpc_seconds.labels(name).observe(time.perf_counter() - start)
        del request
        context.set_code(code)
        context.set_details(details)
        return None
    return wrapper


def _need(value: str, what: str) -> str:
    return v.ident(value, what)


_task_id = v.task_id


class SchedulerService(pb_grpc.SchedulerServicer):
    def __init__(self, config: SchedulerConfig | None = None, clock=time.monotonic, scorer: Scorer | None = None):
        self.config = config or SchedulerConfig()
        self.state = SchedulerState(peer_ttl=self.config.peer_ttl, clock=clock)
        self.scorer = scorer or make_scorer(self.config, clock)
        self.selector = ParentSelector(self.state, self.scorer, self.config.selection,
                                       random.Random(self.config.random_seed))
        self.metrics = SchedulerMetrics(self.state, self.scorer.name)
        from .history import attach_learning  # learned scorer metrics, download history (docs/p2p.md)

        attach_learning(self)
        self._warned_same_host: set[str] = set()   # peers told why every candidate was dropped
        #: Set by :class:`SchedulerServer` over mutual TLS: every RPC checks the caller's certificate.
        self.members_only = False
        self.cluster: str | None = None   # our own certificate's cluster: members of another are refused
        #: blob digests the manager's dynamic config blocklists: never scheduled, peers go to the registry
        self.blocked_digests: frozenset[str] = frozenset()

    def refuse(self, method: str, request, context) -> str:
        """Why the caller may not make this call ("" when it may).

        The TLS handshake already proved the caller holds a certificate of our CA; here its role must be
        a member role of our cluster, and a PEER may only speak for its own host: it registers with the
        host id of its certificate, and may only act for peer ids registered by that host. Otherwise a
        member could announce pieces, report failures or leave tasks in another peer's name.
        """
        from remora.pki.tls import grpc_identity

        ident = grpc_identity(context)
        if ident is None or not ident.is_member(self.cluster, MEMBER_ROLES):
            self.metrics.refused.labels(method).inc()
            who = "no certificate" if ident is None else f"role {ident.role!r} of cluster {ident.cluster!r}"
            log.warning("%s refused: caller is not a cluster member (%s)", method, who)
            return "cluster members only (peer, scheduler or manager certificate of this cluster)"
        if ident.role != "peer":
            return ""
        if isinstance(request, pb.RegisterPeerRequest):
            claimed = request.host.host_id or request.host.peer_id
        else:
            peer = self.state.peers.get(getattr(request, "peer_id", ""))
            claimed = peer.host.host_id if peer is not None else ident.host_id
        if claimed != ident.host_id:
            self.metrics.refused.labels(method).inc()
            log.warning("%s refused: certificate of host %r speaks for host %r", method, ident.host_id, claimed)
            return f"this certificate is for host {ident.host_id!r}, not {claimed!r}"
        return ""

    # -- helpers -----------------------------------------------------------------------------------------

    def _host_pb(self, peer_id: str) -> pb.PeerHost:
        h = self.state.peers[peer_id].host
        return pb.PeerHost(peer_id=h.peer_id, host_id=h.host_id, ip=h.ip, upload_port=h.upload_port,
                           labels=h.labels, upload_slots=h.upload_slots, upload_bandwidth=h.upload_bandwidth)

    def _parent_pb(self, task: Task, tp: TaskPeer, score: float) -> pb.Parent:
        finished = range(task.total_pieces) if tp.done and task.total_pieces else sorted(tp.finished)
        return pb.Parent(host=self._host_pb(tp.peer_id), pieces=finished,
                         in_flight=sorted(tp.in_flight - tp.finished), score=score,
                         source=tp.back_to_source and not tp.done)

    def held(self, task: Task, child_id: str) -> list[int]:
        """Pieces some peer of the task other than the child, and not blocklisted by it, has finished or
        is fetching: what the child may wait for instead of going to the registry."""
        child = task.peers[child_id]
        total = task.total_pieces
        held: set[int] = set()
        # The seed first: it usually has or streams every piece, and then one set is enough (children ask
        # several times a second; a union over hundreds of peers each time would not scale).
        order = sorted(task.peers.values(), key=lambda tp: tp.peer_id != task.seed_peer)
        for tp in order:
            if tp.peer_id == child_id or tp.peer_id in child.blocklist or self.state.is_isolated(task, tp.peer_id):
                continue
            if tp.done and total:
                return list(range(total))
            held |= tp.finished
            held |= tp.in_flight
            if total and len(held) >= total:
                break
        return sorted(held)

    def _reset(self, reason: str, tasks) -> None:
        for task_id in tasks:
            log.info("task %s lost its seed (%s): the next peer to ask becomes the seed", task_id, reason)
            self.metrics.task_resets.labels(reason).inc()

    def _forget_peer(self, peer_id: str, reason: str) -> None:
        self._reset(reason, self.state.remove_peer(peer_id))
        self.scorer.forget(peer_id)
        self._warned_same_host.discard(peer_id)

    def schedule(self, task: Task, child_id: str, exclude=(), limit: int = 0,
                 background: bool = False) -> tuple[list[pb.Parent], bool, int, str]:
        """(parents, back_to_source, retry_after_ms, reason) for ``child_id``; see the module doc."""
        tp = task.peers[child_id]
        if task.task_id in self.blocked_digests:
            # The manager's blocklist: this content does not travel through the mesh.
            if not tp.back_to_source:
                tp.back_to_source = True
                self.metrics.back_to_source.labels("blocklisted").inc()
                self.metrics.decision("back_to_source")
                log.info("task %s is blocklisted by the dynamic config: peer %s goes to the registry",
                         task.task_id, child_id)
            return [], True, 0, "blocklisted"
        if tp.back_to_source:
            return [], True, 0, "seed" if task.seed_peer == child_id else "back_to_source"
        if self.state.is_isolated(task, child_id):
            # Caught lying: it may fetch from the registry itself, but is never elected (a seed's word on
            # layout and digests is what every child checks its pieces against).
            return [], True, 0, "isolated"
        for parent_id in exclude:
            if parent_id and parent_id != child_id and self.state.blocklist(task, child_id, parent_id):
                self.metrics.blocklist_events.labels("excluded").inc()
        # A peer whose registry fetch just failed is not re-elected while another peer could try: its
        # registry access may be what is broken. It waits (retry) like any child meanwhile.
        if task.needs_seed() and (child_id not in task.failed_seed_peers or not any(
                p != child_id and p not in task.failed_seed_peers for p in task.peers)):
            if self.seed_elsewhere(task, child_id, background):
                self.metrics.decision("retry")
                return [], False, SEED_SPREAD_RETRY_MS, "seed_elsewhere (a peer that fetches nothing from " \
                    "the registry yet will seed this blob)"
            reason = "reseed" if task.failed_seeds else "seed"
            self.state.elect_seed(task, child_id)
            self.metrics.back_to_source.labels(reason).inc()
            self.metrics.decision("back_to_source")
            log.info("task %s: peer %s is the seed (%s)", task.task_id, child_id, reason)
            return [], True, 0, reason
        decision = self.selector.select(task, child_id, limit or None)
        for why, n in decision.dropped.items():
            self.metrics.candidates_dropped.labels(why).inc(n)
        if decision.parents:
            tp.schedule_failures = 0
            task.set_parents(child_id, [c.peer_id for c in decision.parents])
            self.metrics.decision("parents")
            self.metrics.parents_returned.labels(self.scorer.name).inc(len(decision.parents))
            return [self._parent_pb(task, c.tp, c.score) for c in decision.parents], False, 0, ""
        tp.schedule_failures += 1
        dropped = ",".join(f"{k}={n}" for k, n in sorted(decision.dropped.items())) or "none"
        if decision.dropped.get("same_host") and child_id not in self._warned_same_host:
            self._warned_same_host.add(child_id)
            host_id = self.state.peers[child_id].host.host_id
            log.warning("task %s: peer %s gets no parent from %d peer(s) sharing its host id %r (peers on one "
                        "host never serve each other); several peers on one machine need distinct --host-id "
                        "values", task.task_id, child_id, decision.dropped["same_host"], host_id)
        if tp.schedule_failures >= self.config.max_schedule_failures:
            tp.back_to_source = True
            task.set_parents(child_id, ())
            self.metrics.back_to_source.labels("schedule_failures").inc()
            self.metrics.decision("back_to_source")
            log.info("task %s: peer %s found no parent %d times (dropped: %s): back to source",
                     task.task_id, child_id, tp.schedule_failures, dropped)
            return [], True, 0, "schedule_failures"
        self.metrics.decision("retry")
        return [], False, self.config.retry_after_ms, f"no_candidates (dropped: {dropped})"

    def seed_elsewhere(self, task: Task, child_id: str, background: bool = False) -> bool:
        """Whether to put off electing ``child_id`` as the seed of ``task`` because it already fetches
        another blob from the registry (or registers one) and another peer could seed this one: a peer of
        the task that fetches none asked lately, or, for a ``background`` request (a preheat: nobody waits
        on the blob), a peer that fetches none is preheating too (it asked for background blobs within
        :data:`SEED_SPREAD_WAIT`): peers of one preheat job ask for the same blobs in the same order. The
        other peer is elected when it asks; the caller hears "retry". Never for longer than
        :data:`SEED_SPREAD_WAIT` per task, and never when no other peer could take the task. The task's
        first :data:`SEED_SPREAD_SCAN` peers are looked at, whatever its size.

        Why: the peers of a preheat all ask for the same blobs at once and the first to ask was elected
        for every blob (it also finished each first and so asked first again): one peer's downlink carried
        every registry stream and its uplink every fresh piece of the image to the others (277 MB sent for
        a 210 MB image while the others' uplinks half idled). Seeds on different peers share that work."""
        state = self.state
        if not state.busy_seeding(child_id):
            return False
        now = state.clock()
        if task.seed_wait_since is not None and now - task.seed_wait_since >= SEED_SPREAD_WAIT:
            return False
        free = any(pid != child_id and pid not in task.isolated and pid not in task.failed_seed_peers
                   and pid not in state.quarantined and pid in state.peers
                   and now - state.peers[pid].last_seen <= SEED_SPREAD_WAIT and not state.busy_seeding(pid)
                   for pid in itertools.islice(task.peers, SEED_SPREAD_SCAN))
        if not free and background:
            free = state.background_peer_free(child_id, since=now - SEED_SPREAD_WAIT)
        if free and task.seed_wait_since is None:
            task.seed_wait_since = now
        return free

    def piece_result(self, task_id: str, child_id: str, parent_id: str, piece: int, success: bool,
                     cost_s: float, size: int, error: str = "") -> None:
        """Feed one piece result to the state (blocklist, slow rule, bandwidth) and to the scorer."""
        reason = self.state.report_piece(child_id, task_id, parent_id, piece, success, cost_s, size, error,
                                         self.config.max_piece_failures)
        self.scorer.observe(parent_id, size, cost_s, success)
        self.metrics.piece_results.labels("success" if success else "failure").inc()
        task = self.state.tasks.get(task_id)
        if reason == "corrupt" and task is not None and parent_id in task.isolated:
            self.metrics.blocklist_events.labels("isolated").inc()
            log.warning("task %s: peer %s sent %s a piece that does not match the seed's digest: isolated from "
                        "the task%s", task_id, parent_id, child_id,
                        " and quarantined (caught by several hosts)" if parent_id in self.state.quarantined else "")
        elif reason:
            self.metrics.blocklist_events.labels(reason).inc()
            log.info("task %s: peer %s blocklisted parent %s (%s: %s)", task_id, child_id, parent_id, reason,
                     error or "failed")

    # -- RPCs --------------------------------------------------------------------------------------------

    @_rpc
    def RegisterPeer(self, request: pb.RegisterPeerRequest) -> pb.RegisterPeerResponse:
        h = request.host
        v.host(h)
        host = Host(peer_id=h.peer_id, host_id=h.host_id or h.peer_id, ip=h.ip, upload_port=h.upload_port,
                    labels=dict(h.labels), upload_slots=h.upload_slots, upload_bandwidth=h.upload_bandwidth)
        known = self.state.register_peer(host)
        if not known:
            log.info("peer %s registered (host %s, %s:%d)", host.peer_id, host.host_id, host.ip, host.upload_port)
            shared = self.state.same_host_peers(host.peer_id)
            if shared:
                log.warning("peer %s registered with host id %r, as did %s: peers of one host never serve each "
                            "other (give each peer its own --host-id if they are meant to)", host.peer_id,
                            host.host_id, ", ".join(shared[:5]) + (" ..." if len(shared) > 5 else ""))
        return pb.RegisterPeerResponse(probe_interval_ms=int(self.config.probe_interval * 1000),
                                       keepalive_interval_ms=int(self.config.keepalive_interval * 1000),
                                       peer_ttl_ms=int(self.config.peer_ttl * 1000), known=known)

    @_rpc
    def LeavePeer(self, request: pb.LeavePeerRequest) -> pb.Empty:
        self._forget_peer(_need(request.peer_id, "peer_id"), "seed_left")
        return pb.Empty()

    @_rpc
    def RegisterTask(self, request: pb.RegisterTaskRequest) -> pb.RegisterTaskResponse:
        task_id = _task_id(request.task_id)
        peer_id = _need(request.peer_id, "peer_id")
        v.layout(request.content_length, request.piece_size)   # checked; only the seed's announcements count
        tp = self.state.join_task(peer_id, task_id)
        self.state.note_asker(peer_id, v.seeding(request.seeding), request.background)
        task = self.state.tasks[task_id]
        parents, b2s, retry, reason = self.schedule(task, tp.peer_id, background=request.background)
        return pb.RegisterTaskResponse(back_to_source=b2s, parents=parents, content_length=task.content_length,
                                       piece_size=task.piece_size, piece_digests=task.piece_digests,
                                       retry_after_ms=retry, reason=reason,
                                       held=[] if b2s else self.held(task, tp.peer_id))

    @_rpc
    def AnnouncePieces(self, request: pb.AnnouncePiecesRequest) -> pb.Empty:
        task_id = _task_id(request.task_id)
        peer_id = _need(request.peer_id, "peer_id")
        length, piece_size = v.layout(request.content_length, request.piece_size)
        task = self.state.tasks.get(task_id)
        if task is not None and task.content_length and length and length != task.content_length:
            tp = task.peers.get(peer_id)
            if tp is None or not self.state.trusted(task, tp):
                raise BadRequest(f"content_length {length} contradicts the blob size {task.content_length} "
                                 "its seed learned from the registry")
        total = v.n_pieces(length, piece_size) or (task.total_pieces if task is not None else 0)
        finished = v.pieces(request.finished, "finished", total)
        in_flight = v.pieces(request.in_flight, "in_flight", total)
        digests = v.piece_digests(request.piece_digests, total)
        transfers = v.transfers(request.transfers, total) if request.transfers_known else None
        if self.state.announce(peer_id, task_id, finished, in_flight, length, piece_size, digests, request.done,
                               seq=request.seq, transfers=transfers) is None:
            log.debug("task %s: peer %s: announcement %d (done=%s) is older than one already taken: ignored",
                      task_id, peer_id, request.seq, request.done)
        return pb.Empty()

    @_rpc
    def GetParents(self, request: pb.GetParentsRequest) -> pb.GetParentsResponse:
        task_id = _task_id(request.task_id)
        peer_id = _need(request.peer_id, "peer_id")
        exclude, limit = v.exclude(request.exclude), v.limit(request.limit)
        tp = self.state.join_task(peer_id, task_id)
        self.state.note_asker(peer_id, v.seeding(request.seeding), request.background)
        task = self.state.tasks[task_id]
        parents, b2s, retry, reason = self.schedule(task, tp.peer_id, exclude, limit, background=request.background)
        # Children ask every ~100 ms while they download: the digest list (~70 bytes a piece) goes out
        # only when the scheduler knows a different number of digests than the caller says it does (more:
        # the seed hashed new pieces; fewer: the task was reset, and a new seed's digests will follow).
        known = sum(map(bool, task.piece_digests))
        digests = task.piece_digests if known != request.known_digests else []
        return pb.GetParentsResponse(parents=parents, back_to_source=b2s, retry_after_ms=retry, reason=reason,
                                     content_length=task.content_length, piece_size=task.piece_size,
                                     piece_digests=digests, held=[] if b2s else self.held(task, tp.peer_id))

    @_rpc
    def ReportPieceResults(self, request: pb.ReportPieceResultsRequest) -> pb.Empty:
        task_id = _task_id(request.task_id)
        child_id = _need(request.peer_id, "peer_id")
        task = self.state.tasks.get(task_id)
        v.piece_results(request.results, task.total_pieces if task is not None else 0)
        self.state.touch(child_id)
        for r in request.results:
            if r.parent_id and r.parent_id != child_id:   # a piece from the registry says nothing about parents
                self.piece_result(task_id, child_id, r.parent_id, r.piece, r.success, r.cost_us / 1e6, r.size,
                                  r.error)
        return pb.Empty()

    @_rpc
    def ReportTaskResult(self, request: pb.ReportTaskResultRequest) -> pb.Empty:
        task_id = _task_id(request.task_id)
        peer_id = _need(request.peer_id, "peer_id")
        error = v.error_text(request.error)
        task = self.state.tasks.get(task_id)
        source = task.digest_source if task is not None else None
        self.state.touch(peer_id)
        if not self.state.fresh(peer_id, task_id, request.seq):
            log.debug("task %s: peer %s: result report %d is older than a message already taken: ignored",
                      task_id, peer_id, request.seq)
            return pb.Empty()
        if self.state.report_task(peer_id, task_id, request.success, error):
            if task is not None and source and source in task.isolated:
                self._reset("digests_wrong", [task_id])
                log.warning("task %s: peer %s verified its blob against piece digests from %s and the blob "
                            "digest did not match: %s isolated from the task", task_id, peer_id, source, source)
            else:
                self._reset("seed_failed", [task_id])
                log.warning("task %s: seed %s failed (%s)", task_id, peer_id, error or "no error given")
        return pb.Empty()

    @_rpc
    def LeaveTask(self, request: pb.LeaveTaskRequest) -> pb.Empty:
        task_id = _task_id(request.task_id)
        peer_id = _need(request.peer_id, "peer_id")
        self.state.touch(peer_id)
        if self.state.leave_task(peer_id, task_id):
            self._reset("seed_left", [task_id])
        return pb.Empty()

    @_rpc
    def StatTask(self, request: pb.StatTaskRequest) -> pb.StatTaskResponse:
        task = self.state.tasks.get(_task_id(request.task_id))
        if task is None:
            raise UnknownTask(request.task_id)
        return pb.StatTaskResponse(task_id=task.task_id, content_length=task.content_length,
                                   piece_size=task.piece_size, peers=sorted(task.peers),
                                   seed_peer=task.seed_peer or "", state=task.state)

    @_rpc
    def SyncProbes(self, request: pb.SyncProbesRequest) -> pb.SyncProbesResponse:
        peer_id = _need(request.peer_id, "peer_id")
        v.probe_results(request.results)
        self.state.touch(peer_id)
        for r in request.results:
            self.state.record_probe(peer_id, r.peer_id, r.rtt_us / 1e6, r.success)
        targets = [self._host_pb(p.peer_id) for p in self.state.probe_targets(peer_id, self.config.probe_count)]
        return pb.SyncProbesResponse(targets=targets, probe_interval_ms=int(self.config.probe_interval * 1000))

    # -- expiry ------------------------------------------------------------------------------------------

    def expire(self) -> None:
        expired = self.state.expire()
        for peer_id in expired.peers:
            log.info("peer %s expired (silent for %.0f s)", peer_id, self.config.peer_ttl)
            self.metrics.peers_expired.inc()
            self.scorer.forget(peer_id)
            self._warned_same_host.discard(peer_id)
        self._reset("seed_expired", expired.reset_tasks)


def _split(listen: str) -> tuple[str, int]:
    """``HOST:PORT``; an empty host is loopback (never every address: that is asked for explicitly)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"listen address must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class SchedulerServer:
    """A running scheduler: the gRPC server, the /metrics HTTP server and the expiry sweeper.

        server = await SchedulerServer(SchedulerConfig(), "127.0.0.1:0", tls=Reloader(files)).start()
        server.address        # "127.0.0.1:41234" (the real port when 0 was asked)
        await server.stop()

    The gRPC port speaks mutual TLS when ``tls`` (a :class:`remora.pki.tls.Reloader`) is given: only
    cluster members get through the handshake and :meth:`SchedulerService.refuse` checks each call; the
    certificate rotates without a restart. Plain gRPC needs ``insecure_plain=True`` (said in the log,
    at WARNING, and in the ``remora_scheduler_mesh_tls`` gauge): there is no silent insecure default.
    """

    def __init__(self, config: SchedulerConfig | None = None, listen: str = "127.0.0.1:0",
                 metrics_listen: str | None = None, clock=time.monotonic, *, tls=None, insecure_plain: bool = False,
                 manager=None):
        if tls is None and not insecure_plain:
            raise UsageError("the scheduler needs mutual TLS (--tls-dir DIR with ca.pem, cert.pem, key.pem from "
                             "'remora certs issue --role scheduler') or, knowingly, --insecure-plain-mesh")
        if tls is not None and insecure_plain:
            raise UsageError("--tls-dir and --insecure-plain-mesh exclude each other")
        self.service = SchedulerService(config, clock=clock)
        self.config = self.service.config
        self.tls = tls
        self.service.members_only = tls is not None
        self.service.cluster = tls.identity.cluster if tls is not None else None
        self.listen = listen
        self.metrics_listen = metrics_listen
        self.address = ""
        self.metrics_address = ""
        self._server: grpc.aio.Server | None = None
        self._metrics_runner = None
        self._sweeper: asyncio.Task | None = None
        self.manager = manager            # managed.ManagedScheduler: membership + dynamic config
        self._agent: asyncio.Task | None = None

    @property
    def state(self) -> SchedulerState:
        return self.service.state

    async def start(self) -> SchedulerServer:
        host, want = _split(self.listen)
        bind = f"[{host}]:{want}" if ":" in host else f"{host}:{want}"   # ":8002" is loopback, not every address
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_SchedulerServicer_to_server(self.service, self._server)
        from .topology import add_topology_service  # read-only view for `remora place --from-scheduler`
        add_topology_service(self.service, self._server)
        try:
            if self.tls is not None:
                port = self._server.add_secure_port(bind, self.tls.grpc_server_credentials())
            else:
                port = self._server.add_insecure_port(bind)
        except RuntimeError as exc:
            raise UsageError(f"cannot listen on {self.listen}: {exc}") from exc
        if port == 0:
            raise UsageError(f"cannot listen on {self.listen} (address in use or not local)")
        await self._server.start()
        self.address = f"{host}:{port}"
        if self.metrics_listen:
            mhost, mport = _split(self.metrics_listen)
            try:
                self._metrics_runner = await self.service.metrics.serve(mhost, mport)
            except OSError as exc:
                await self._server.stop(0)
                raise UsageError(f"cannot serve metrics on {self.metrics_listen}: {exc}") from exc
            bound = self._metrics_runner.addresses[0]
            self.metrics_address = f"{mhost}:{bound[1]}"
        self._sweeper = asyncio.create_task(self._sweep())
        if self.manager is not None:
            self.manager.bind(self.address)
            await self.manager.first_round()
            self._agent = asyncio.create_task(self.manager.run())
        self.service.metrics.mesh_tls.set(1 if self.tls is not None else 0)
        if self.tls is None:
            log.warning("mesh: PLAIN (insecure): gRPC without TLS on %s; any host that reaches it can register, "
                        "announce and learn which peer holds which blob (--insecure-plain-mesh)", self.address)
        log.info("scheduler listening on %s (mesh %s, metrics %s, scorer %s, peer TTL %.0fs)", self.address,
                 self.mesh, self.metrics_address or "off", self.config.scorer, self.config.peer_ttl)
        return self

    @property
    def mesh(self) -> str:
        """How the gRPC port is protected, as logs and status say it."""
        if self.tls is None:
            return "PLAIN (insecure)"
        ident = self.tls.identity
        return f"mTLS (cluster {ident.cluster}, {ident.role} {ident.host_id})"

    async def _sweep(self) -> None:
        interval = max(0.05, min(self.config.peer_ttl / 4, 5.0))
        while True:
            await asyncio.sleep(interval)
            try:
                self.service.expire()
            except Exception:   # a bug in expiry must not silently stop all future expiry
                log.exception("peer expiry failed")

    async def stop(self, grace: float = 1.0) -> None:
        if self._agent is not None:
            self._agent.cancel()
            await asyncio.gather(self._agent, return_exceptions=True)
            self._agent = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
