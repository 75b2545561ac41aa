"""What the scheduler knows: peers, tasks, who holds which piece, who downloads from whom, RTTs.

Pure bookkeeping, no I/O and no asyncio: the gRPC service (:mod:`.server`) runs every handler on one
event loop and never awaits in the middle of a state change, so no locks are needed, and the parent
selection and the benchmark drive the very same objects without a network. Time comes from an injectable
``clock`` so expiry is testable.

Vocabulary (as in docs/p2p.md):

* a *peer* is one ``remora peer`` daemon run (``peer_id``) on a machine (``host_id``);
* a *task* is one blob, its id is the blob digest; a peer in a task is a :class:`TaskPeer`;
* the *seed* is the peer the scheduler sent back to the registry; while no seed is working and no peer
  holds the whole blob, the next peer that asks is elected seed;
* the *parents* of a peer are the peers it was told to download from or reported a piece from; two
  peers may be each other's parents (see :mod:`.selection`). The edges count a parent's upload load.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

DEFAULT_UPLOAD_SLOTS = 8
COST_WINDOW = 256          # served-piece costs kept per peer and task (slow-peer rule)
BANDWIDTH_EWMA = 0.3       # weight of a new sample in a peer's measured upload bandwidth
RTT_EWMA = 0.3


class UnknownPeer(KeyError):
    """A task RPC from a peer id the scheduler does not know (never registered, expired, restarted)."""


@dataclass
class Host:
    """The static description a peer registers with (mirrors the ``PeerHost`` message)."""

    peer_id: str
    host_id: str
    ip: str = ""
    upload_port: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    upload_slots: int = 0
    upload_bandwidth: int = 0     # bytes/s the peer declares; 0 = unknown


@dataclass
class Peer:
    host: Host
    registered_at: float
    last_seen: float
    tasks: set[str] = field(default_factory=set)
    bandwidth: float | None = None    # measured upload bytes/s (EWMA over pieces it served)
    served_ok: int = 0
    served_failed: int = 0

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    @property
    def upload_slots(self) -> int:
        return self.host.upload_slots or DEFAULT_UPLOAD_SLOTS

    def observe_upload(self, size: int, cost_s: float) -> None:
        if size <= 0 or cost_s <= 0:
            return
        sample = size / cost_s
        self.bandwidth = sample if self.bandwidth is None else (
            (1 - BANDWIDTH_EWMA) * self.bandwidth + BANDWIDTH_EWMA * sample)


@dataclass
class TaskPeer:
    """One peer's part in one task."""

    peer_id: str
    joined_at: float
    finished: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)
    done: bool = False
    back_to_source: bool = False          # sent (or went) to the registry for this task
    parents: set[str] = field(default_factory=set)
    blocklist: set[str] = field(default_factory=set)
    failures: dict[str, int] = field(default_factory=dict)   # consecutive piece failures per parent
    schedule_failures: int = 0            # consecutive scheduling rounds without a parent
    # (monotonic time, cost in seconds) of pieces this peer SERVED in this task: the slow-peer rule.
    served_costs: deque = field(default_factory=lambda: deque(maxlen=COST_WINDOW))

    def has_data(self) -> bool:
        return bool(self.finished or self.in_flight)


@dataclass
class Task:
    task_id: str
    created_at: float
    content_length: int = 0
    piece_size: int = 0
    piece_digests: list[str] = field(default_factory=list)
    seed_peer: str | None = None
    failed_seeds: int = 0
    failed_seed_peers: set[str] = field(default_factory=set)   # not re-elected while others can seed
    peers: dict[str, TaskPeer] = field(default_factory=dict)
    children_of: dict[str, set[str]] = field(default_factory=dict)   # reverse of TaskPeer.parents

    @property
    def total_pieces(self) -> int:
        if self.content_length and self.piece_size:
            return math.ceil(self.content_length / self.piece_size)
        if self.piece_digests:
            return len(self.piece_digests)
        return 0

    @property
    def state(self) -> str:
        if any(tp.done for tp in self.peers.values()):
            return "succeeded"
        if self.seed_peer is not None:
            return "running"
        return "failed" if self.failed_seeds else "pending"

    def needs_seed(self) -> bool:
        """No peer is fetching from the registry and nobody holds the whole blob."""
        return self.seed_peer is None and not any(tp.done for tp in self.peers.values())

    def set_parents(self, child_id: str, parent_ids: Iterable[str]) -> None:
        child = self.peers[child_id]
        for old in child.parents:
            kids = self.children_of.get(old)
            if kids is not None:
                kids.discard(child_id)
                if not kids:
                    del self.children_of[old]
        child.parents = set(parent_ids)
        for parent in child.parents:
            self.children_of.setdefault(parent, set()).add(child_id)

    def add_parent(self, child_id: str, parent_id: str) -> bool:
        """Record an edge the child reports it used (it counts in the parent's upload load)."""
        child = self.peers.get(child_id)
        if child is None or parent_id not in self.peers or parent_id in child.parents or parent_id == child_id:
            return False
        child.parents.add(parent_id)
        self.children_of.setdefault(parent_id, set()).add(child_id)
        return True

    def remove_peer(self, peer_id: str) -> TaskPeer | None:
        tp = self.peers.get(peer_id)
        if tp is None:
            return None
        self.set_parents(peer_id, ())
        for child in self.children_of.pop(peer_id, set()):
            if child in self.peers:
                self.peers[child].parents.discard(peer_id)
        del self.peers[peer_id]
        if self.seed_peer == peer_id:
            self.seed_peer = None
        return tp


@dataclass
class RttSample:
    rtt_s: float
    updated_at: float
    reachable: bool = True


@dataclass
class Expired:
    peers: list[str]
    reset_tasks: list[str]     # tasks that lost their seed before anyone had the whole blob
    removed_tasks: list[str]   # tasks left without peers


class SchedulerState:
    """Peers, tasks and RTTs, with the transitions the RPCs cause."""

    def __init__(self, peer_ttl: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.peer_ttl = peer_ttl
        self.clock = clock
        self.peers: dict[str, Peer] = {}
        self.tasks: dict[str, Task] = {}
        self.rtt: dict[tuple[str, str], RttSample] = {}    # (from host_id, to host_id)

    # -- peers -------------------------------------------------------------------------------------------

    def register_peer(self, host: Host) -> bool:
        """Add or refresh a peer; returns whether it was already known (False: it must re-announce)."""
        now = self.clock()
        peer = self.peers.get(host.peer_id)
        if peer is None:
            self.peers[host.peer_id] = Peer(host=host, registered_at=now, last_seen=now)
            return False
        peer.host = host
        peer.last_seen = now
        return True

    def touch(self, peer_id: str) -> Peer:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise UnknownPeer(peer_id)
        peer.last_seen = self.clock()
        return peer

    def remove_peer(self, peer_id: str) -> list[str]:
        """Forget a peer and its part in every task; returns the tasks whose seed it was (now reset)."""
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return []
        reset = []
        for task_id in list(peer.tasks):
            if self.leave_task(peer_id, task_id, peer=peer):
                reset.append(task_id)
        host_id = peer.host.host_id
        if not any(p.host.host_id == host_id for p in self.peers.values()):
            for key in [k for k in self.rtt if host_id in k]:
                del self.rtt[key]
        return reset

    def upload_load(self, peer_id: str) -> int:
        """Children currently downloading from the peer, over all its tasks."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return 0
        load = 0
        for task_id in peer.tasks:
            task = self.tasks.get(task_id)
            if task is None:
                continue
            for child in task.children_of.get(peer_id, ()):
                tp = task.peers.get(child)
                if tp is not None and not tp.done:
                    load += 1
        return load

    # -- tasks -------------------------------------------------------------------------------------------

    def join_task(self, peer_id: str, task_id: str, content_length: int = 0, piece_size: int = 0) -> TaskPeer:
        peer = self.touch(peer_id)
        task = self.tasks.get(task_id)
        if task is None:
            task = self.tasks[task_id] = Task(task_id=task_id, created_at=self.clock())
        self.learn_metadata(task, content_length, piece_size)
        tp = task.peers.get(peer_id)
        if tp is None:
            tp = task.peers[peer_id] = TaskPeer(peer_id=peer_id, joined_at=self.clock())
            peer.tasks.add(task_id)
        return tp

    @staticmethod
    def learn_metadata(task: Task, content_length: int, piece_size: int, digests: list[str] | None = None) -> None:
        """First value wins: later peers learn the metadata from the scheduler, they don't override it.

        Piece digests arrive incrementally (``""`` = not hashed yet) while the seed downloads, so children
        can fetch a piece from the seed as soon as its digest is known: unknown entries are filled from
        later lists, known ones are never changed.
        """
        if content_length and not task.content_length:
            task.content_length = content_length
        if piece_size and not task.piece_size:
            task.piece_size = piece_size
        if not digests:
            return
        if not task.piece_digests:
            task.piece_digests = list(digests)
            return
        if len(digests) != len(task.piece_digests):
            return  # a different layout: ignore rather than mix
        for i, d in enumerate(digests):
            if d and not task.piece_digests[i]:
                task.piece_digests[i] = d

    def elect_seed(self, task: Task, peer_id: str) -> None:
        task.seed_peer = peer_id
        tp = task.peers[peer_id]
        tp.back_to_source = True
        tp.schedule_failures = 0
        # A seed downloads from the registry: it has no parents.
        task.set_parents(peer_id, ())

    def announce(self, peer_id: str, task_id: str, finished: Iterable[int], in_flight: Iterable[int],
                 content_length: int = 0, piece_size: int = 0, digests: list[str] | None = None,
                 done: bool = False) -> TaskPeer:
        tp = self.join_task(peer_id, task_id)
        task = self.tasks[task_id]
        # Digests only from a peer that hashed them from the registry or whose whole blob matched its
        # digest: a partial child's list could come from a bad parent.
        trusted = tp.back_to_source or tp.done or done
        self.learn_metadata(task, content_length, piece_size, digests if trusted else None)
        tp.finished.update(finished)
        # An announcement carries the peer's whole in-flight set: a piece it gave up on (its parent sent it
        # elsewhere) must not keep looking like it is on its way.
        tp.in_flight = set(in_flight) - tp.finished
        if done:
            self.mark_done(task, tp)
        return tp

    def mark_done(self, task: Task, tp: TaskPeer) -> None:
        tp.done = True
        tp.in_flight.clear()
        if task.total_pieces:
            tp.finished = set(range(task.total_pieces))
        # A complete peer downloads nothing more: dropping its edges frees its parents' upload slots.
        task.set_parents(tp.peer_id, ())

    def report_task(self, peer_id: str, task_id: str, success: bool) -> bool:
        """End of a peer's download. Returns True when the failure of the seed reset the task."""
        task = self.tasks.get(task_id)
        self.touch(peer_id)
        if task is None or peer_id not in task.peers:
            return False
        tp = task.peers[peer_id]
        if success:
            self.mark_done(task, tp)
            if task.seed_peer == peer_id:
                task.seed_peer = None   # not needed any more: a done peer serves everything
            return False
        # A failed peer leaves with its pieces (they may be what broke); a failed seed resets the task.
        return self.leave_task(peer_id, task_id)

    def leave_task(self, peer_id: str, task_id: str, peer: Peer | None = None) -> bool:
        """Remove a peer from a task. Returns True when that reset the task (the seed left unfinished)."""
        peer = peer or self.peers.get(peer_id)
        if peer is not None:
            peer.tasks.discard(task_id)
        task = self.tasks.get(task_id)
        if task is None:
            return False
        was_seed = task.seed_peer == peer_id
        tp = task.remove_peer(peer_id)
        reset = False
        if was_seed and tp is not None and not tp.done and not any(t.done for t in task.peers.values()):
            # The seed's registry fetch failed or vanished: what it said about the blob is suspect (the
            # piece digests may come from a corrupt stream). Forget it; the next peer to ask re-seeds.
            task.failed_seeds += 1
            task.failed_seed_peers.add(peer_id)
            task.piece_digests = []
            reset = True
        if not task.peers:
            del self.tasks[task_id]
        return reset

    def report_piece(self, child_id: str, task_id: str, parent_id: str, piece: int, success: bool,
                     cost_s: float, size: int, error: str = "", max_failures: int = 3) -> str | None:
        """Account one piece a child fetched from a parent. Returns a blocklist reason, if it earned one.

        A corrupt piece blocklists the parent for this child at once (its bytes cannot be trusted); other
        errors (timeout, connection) only after ``max_failures`` in a row, since a busy parent recovers.
        """
        task = self.tasks.get(task_id)
        child = task.peers.get(child_id) if task else None
        if child is None:
            return None
        parent_peer = self.peers.get(parent_id)
        parent_tp = task.peers.get(parent_id)
        if success:
            child.failures.pop(parent_id, None)
            child.finished.add(piece)
            child.in_flight.discard(piece)
            if parent_tp is not None:
                parent_tp.served_costs.append((self.clock(), cost_s))
                task.add_parent(child_id, parent_id)
            if parent_peer is not None:
                parent_peer.served_ok += 1
                parent_peer.observe_upload(size, cost_s)
            return None
        if parent_peer is not None:
            parent_peer.served_failed += 1
        if parent_id in child.blocklist:
            return None
        count = child.failures.get(parent_id, 0) + 1
        child.failures[parent_id] = count
        reason = "corrupt" if error == "corrupt" else ("failures" if count >= max_failures else None)
        if reason:
            self.blocklist(task, child_id, parent_id)
        return reason

    def blocklist(self, task: Task, child_id: str, parent_id: str) -> bool:
        """Never hand ``parent_id`` to ``child_id`` again in this task. Returns False if it already was."""
        child = task.peers[child_id]
        if parent_id in child.blocklist:
            return False
        child.blocklist.add(parent_id)
        if parent_id in child.parents:
            task.set_parents(child_id, child.parents - {parent_id})
        return True

    # -- RTT probes ---------------------------------------------------------------------------------------

    def record_probe(self, from_peer: str, to_peer: str, rtt_s: float, success: bool) -> None:
        a, b = self.peers.get(from_peer), self.peers.get(to_peer)
        if a is None or b is None:
            return
        key = (a.host.host_id, b.host.host_id)
        old = self.rtt.get(key)
        now = self.clock()
        if not success:
            self.rtt[key] = RttSample(rtt_s=old.rtt_s if old else 0.0, updated_at=now, reachable=False)
        elif old is None or not old.reachable:
            self.rtt[key] = RttSample(rtt_s=rtt_s, updated_at=now)
        else:
            self.rtt[key] = RttSample(rtt_s=(1 - RTT_EWMA) * old.rtt_s + RTT_EWMA * rtt_s, updated_at=now)

    def rtt_between(self, from_peer: str, to_peer: str) -> RttSample | None:
        a, b = self.peers.get(from_peer), self.peers.get(to_peer)
        if a is None or b is None:
            return None
        return self.rtt.get((a.host.host_id, b.host.host_id))

    def probe_targets(self, peer_id: str, count: int) -> list[Peer]:
        """Peers on other hosts whose RTT from this peer's host is unknown or oldest: probe those next."""
        me = self.peers.get(peer_id)
        if me is None:
            return []
        mine = me.host.host_id
        by_host: dict[str, Peer] = {}
        for p in self.peers.values():
            if p.host.host_id != mine and p.host.upload_port:
                by_host.setdefault(p.host.host_id, p)

        def age(p: Peer) -> float:
            sample = self.rtt.get((mine, p.host.host_id))
            return -math.inf if sample is None else sample.updated_at
        return sorted(by_host.values(), key=lambda p: (age(p), p.peer_id))[:count]

    # -- expiry -------------------------------------------------------------------------------------------

    def expire(self) -> Expired:
        """Forget peers silent for longer than ``peer_ttl`` (and, with them, tasks left empty)."""
        cutoff = self.clock() - self.peer_ttl
        gone = [pid for pid, p in self.peers.items() if p.last_seen < cutoff]
        reset: list[str] = []
        before = set(self.tasks)
        for pid in gone:
            reset += self.remove_peer(pid)
        removed = sorted(before - set(self.tasks))
        return Expired(peers=gone, reset_tasks=[t for t in reset if t in self.tasks], removed_tasks=removed)
