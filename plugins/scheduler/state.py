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

Trust: any peer can call the scheduler, so a peer's word counts only as far as it can be checked. The
blob's layout and piece digests are taken only from a peer the scheduler sent to the registry (it hashes
what the registry sends); "I am done" from anyone else is bookkeeping, never a source of digests. A peer
caught lying (a corrupt piece, or digests that a child's complete blob contradicts) is isolated from the
task, and from every task once peers on several hosts caught it (:meth:`SchedulerState.isolate`).

Bounds: peers, tasks, tasks per peer, peers per task, piece marks and piece digests are all capped
(``MAX_*`` below); a request that would exceed one raises :class:`Exhausted` before it changes anything.
A complete peer's pieces are a flag, never a set, whatever the blob size.

Load: a parent's upload load is the piece transfers children say they have running from it
(``AnnouncePieces.transfers``), each ended by the child's piece result or its next announcement, and
forgotten ``transfer_ttl`` seconds after the child last listed it (a child that died mid-piece must not
pin its parent's load). Children that never report transfers (older peers) count as before: one per
unfinished child that lists the parent.

Order: a peer numbers its announcements and result reports per task (``seq``); one older than the newest
seen from that peer for that task is ignored (a delayed "not done" must not undo "done").
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from remora.errors import RemoraError

from .bandwidth import BandwidthEstimator

DEFAULT_UPLOAD_SLOTS = 8
# Bounds on what the scheduler keeps, whoever asks (an RPC over a bound gets RESOURCE_EXHAUSTED; the
# peer then fetches from the registry). Worst case with every bound reached: ~32 MiB of piece marks (a
# set entry and its int: ~64 bytes) and ~32 MiB of piece digests (~128 bytes each).
MAX_PEERS = 20_000
MAX_TASKS = 50_000
MAX_TASKS_PER_PEER = 1024
MAX_PEERS_PER_TASK = 5_000
MAX_MARKS = 1 << 19             # finished + in-flight piece indexes over all (peer, task) pairs
MAX_MARKS_PER_PEER = 1 << 16
MAX_DIGESTS = 1 << 18           # piece digests over all tasks
MAX_DIGESTS_PER_PEER = 1 << 16  # ... published by one seed
MAX_BACKGROUND_PEERS = 256      # peers remembered as preheating (seed election looks among them)
#: Distinct hosts that must report a peer as lying before it is isolated from every task (one report
#: isolates it from the task it was caught in).
QUARANTINE_REPORTERS = 2
MAX_ISOLATED = 4096             # ids kept per task, and quarantined over the cluster
MAX_TRANSFERS = 1 << 18   # in-flight piece transfers tracked over all children
MAX_SEQS_PER_PEER = 2 * MAX_TASKS_PER_PEER   # newest seq per task, kept after the peer left the task
TRANSFER_TTL = 30.0        # a transfer no child mentioned for this long is over (the child died)
COST_WINDOW = 256          # served-piece costs kept per peer and task (slow-peer rule)
BANDWIDTH_EWMA = 0.3       # weight of a new sample in a peer's measured upload bandwidth
RTT_EWMA = 0.3


class UnknownPeer(KeyError):
    """A task RPC from a peer id the scheduler does not know (never registered, expired, restarted)."""


class Exhausted(RemoraError):
    """A bound on the scheduler's state would be exceeded (RESOURCE_EXHAUSTED): the request is refused
    before any of its piece marks or digests are kept."""


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
    marks: int = 0                    # piece indexes held in its TaskPeer sets (bounded)
    digests: int = 0                  # piece digests it published as a seed (bounded)
    seeding: int = 0                  # blobs it said (last RegisterTask/GetParents) it fetches from the registry
    background_at: float = -math.inf  # when it last asked for a blob nobody waits on (a preheat)
    #: task id -> newest ``seq`` of its announcements / result reports (oldest first, bounded)
    seqs: dict[str, int] = field(default_factory=dict)

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
    #: (parent id, piece) -> expiry time: piece requests it reported running to parents
    transfers: dict[tuple[str, int], float] = field(default_factory=dict)
    reports_transfers: bool = False       # announced transfers at least once: its edges are not load

    def has_data(self) -> bool:
        return bool(self.done or self.finished or self.in_flight)

    @property
    def marks(self) -> int:
        return len(self.finished) + len(self.in_flight)


@dataclass
class Task:
    task_id: str
    created_at: float
    content_length: int = 0
    piece_size: int = 0
    piece_digests: list[str] = field(default_factory=list)
    digest_source: str | None = None    # the seed that published layout and digests (hashed from the registry)
    isolated: set[str] = field(default_factory=set)   # caught lying in this task: never a parent or seed again
    seed_peer: str | None = None
    failed_seeds: int = 0
    failed_seed_peers: set[str] = field(default_factory=set)   # not re-elected while others can seed
    seed_wait_since: float | None = None   # a busy peer's election was first put off (see busy_seeding)
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
        if any(tp.done for pid, tp in self.peers.items() if pid not in self.isolated):
            return "succeeded"
        if self.seed_peer is not None:
            return "running"
        return "failed" if self.failed_seeds else "pending"

    def needs_seed(self) -> bool:
        """No peer is fetching from the registry and no peer holds the whole blob with digests that a
        seed hashed from the registry (a peer saying it is done proves nothing on its own: its pieces can
        only be checked against those digests)."""
        return self.seed_peer is None and not (self.piece_digests and any(
            tp.done for pid, tp in self.peers.items() if pid not in self.isolated))

    def forget_layout(self) -> None:
        """Drop what the digest source said about the blob (it failed or was caught lying)."""
        self.piece_digests = []
        self.digest_source = None
        self.content_length = self.piece_size = 0

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

    def __init__(self, peer_ttl: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 transfer_ttl: float = TRANSFER_TTL):
        self.peer_ttl = peer_ttl
        self.clock = clock
        self.peers: dict[str, Peer] = {}
        self.tasks: dict[str, Task] = {}
        self.rtt: dict[tuple[str, str], RttSample] = {}    # (from host_id, to host_id)
        self.marks = 0            # piece indexes in every TaskPeer's finished/in_flight sets
        self.digests = 0          # piece digests kept over all tasks
        self.transfer_ttl = transfer_ttl
        #: parent id -> {(task id, child id, piece): expiry}: the reverse of TaskPeer.transfers
        self.transfers_to: dict[str, dict[tuple[str, str, int], float]] = {}
        self.transfer_count = 0
        self.quarantined: set[str] = set()              # isolated from every task
        self.background: dict[str, None] = {}           # peers that asked for background blobs, oldest first
        self.lying_reports: dict[str, set[str]] = {}    # suspect peer id -> host ids that caught it
        #: Goodput per host pair and per host, inferred from piece reports (peers send normalized costs).
        self.bandwidth = BandwidthEstimator(clock=clock)
        #: Called as ``fn(task, child_id, parent_id, size, cost_s, success)`` for every piece report of a
        #: known child (the history recorder of the learned scorer listens here).
        self.piece_listeners: list[Callable] = []

    # -- peers -------------------------------------------------------------------------------------------

    def register_peer(self, host: Host) -> bool:
        """Add or refresh a peer; returns whether it was already known (False: it must re-announce)."""
        now = self.clock()
        peer = self.peers.get(host.peer_id)
        if peer is None:
            if len(self.peers) >= MAX_PEERS:
                raise Exhausted(f"the scheduler holds {MAX_PEERS} peers already")
            self.peers[host.peer_id] = Peer(host=host, registered_at=now, last_seen=now)
            return False
        peer.host = host
        peer.last_seen = now
        return True

    def same_host_peers(self, peer_id: str) -> list[str]:
        """Other live peers registered with the same host id (they never serve each other)."""
        me = self.peers.get(peer_id)
        if me is None:
            return []
        return sorted(p for p, other in self.peers.items() if p != peer_id and other.host.host_id == me.host.host_id)

    def touch(self, peer_id: str) -> Peer:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise UnknownPeer(peer_id)
        peer.last_seen = self.clock()
        return peer

    def remove_peer(self, peer_id: str) -> list[str]:
        """Forget a peer and its part in every task; returns the tasks whose seed it was (now reset)."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return []
        reset = []
        for task_id in list(peer.tasks):
            if self.leave_task(peer_id, task_id, peer=peer):
                reset.append(task_id)
        del self.peers[peer_id]
        self.background.pop(peer_id, None)
        self.lying_reports.pop(peer_id, None)
        host_id = peer.host.host_id
        if not any(p.host.host_id == host_id for p in self.peers.values()):
            for key in [k for k in self.rtt if host_id in k]:
                del self.rtt[key]
        return reset

    def upload_load(self, peer_id: str) -> int:
        """Piece transfers in flight from the peer, over all its tasks (the ``parent_load`` feature).

        Transfers children reported and have not ended (result, next announcement) nor let expire; plus,
        for children that never report transfers (older peers), one per unfinished child listing the peer
        as a parent (a child that merely *listed* a parent says nothing about what it fetches now)."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return 0
        load = 0
        entries = self.transfers_to.get(peer_id)
        if entries:
            now = self.clock()
            for key in [k for k, exp in entries.items() if exp <= now]:
                self._drop_transfer(peer_id, *key)
            load += len(self.transfers_to.get(peer_id, ()))
        for task_id in peer.tasks:
            task = self.tasks.get(task_id)
            if task is None:
                continue
            for child in task.children_of.get(peer_id, ()):
                tp = task.peers.get(child)
                if tp is not None and not tp.done and not tp.reports_transfers:
                    load += 1
        return load

    # -- in-flight transfers (the load of parents) ---------------------------------------------------------

    def set_transfers(self, task: Task, tp: TaskPeer, transfers: Iterable[tuple[str, int]]) -> None:
        """The child's whole set of piece requests running to parents now (from an announcement): new ones
        start, listed ones live ``transfer_ttl`` longer, unlisted ones are over. Only parents that are
        peers of the task count (the child's word must not grow state about unknown peers)."""
        now = self.clock()
        wanted = {(parent, piece) for parent, piece in transfers
                  if parent != tp.peer_id and parent in task.peers}
        new = len(wanted - tp.transfers.keys())
        gone = tp.transfers.keys() - wanted
        if new and self.transfer_count - len(gone) + new > MAX_TRANSFERS:
            raise Exhausted(f"the scheduler tracks {MAX_TRANSFERS} piece transfers already")
        for parent, piece in gone:
            self._drop_transfer(parent, task.task_id, tp.peer_id, piece)
        expires = now + self.transfer_ttl
        for parent, piece in wanted:
            if (parent, piece) not in tp.transfers:
                self.transfer_count += 1
            tp.transfers[(parent, piece)] = expires
            self.transfers_to.setdefault(parent, {})[(task.task_id, tp.peer_id, piece)] = expires
        tp.reports_transfers = True

    def _drop_transfer(self, parent_id: str, task_id: str, child_id: str, piece: int) -> None:
        entries = self.transfers_to.get(parent_id)
        if entries is None or entries.pop((task_id, child_id, piece), None) is None:
            return
        if not entries:
            del self.transfers_to[parent_id]
        self.transfer_count -= 1
        task = self.tasks.get(task_id)
        tp = task.peers.get(child_id) if task is not None else None
        if tp is not None:
            tp.transfers.pop((parent_id, piece), None)

    def _drop_transfers(self, task: Task, peer_id: str) -> None:
        """The peer's transfers in the task, as a child and as a parent, are over (done, left, isolated)."""
        tp = task.peers.get(peer_id)
        if tp is not None:
            for parent, piece in list(tp.transfers):
                self._drop_transfer(parent, task.task_id, peer_id, piece)
        entries = self.transfers_to.get(peer_id)
        if entries:
            for key in [k for k in entries if k[0] == task.task_id]:
                self._drop_transfer(peer_id, *key)

    def expire_transfers(self) -> int:
        """Forget every transfer whose child stopped mentioning it ``transfer_ttl`` ago; returns how many."""
        now = self.clock()
        stale = [(parent, key) for parent, entries in self.transfers_to.items()
                 for key, exp in entries.items() if exp <= now]
        for parent, key in stale:
            self._drop_transfer(parent, *key)
        return len(stale)

    # -- message order -----------------------------------------------------------------------------------

    def fresh(self, peer_id: str, task_id: str, seq: int) -> bool:
        """Whether a message numbered ``seq`` from the peer for the task is newer than every one seen
        (then it becomes the newest). ``seq`` 0: not numbered (older peers), always taken."""
        peer = self.peers.get(peer_id)
        if not seq or peer is None:
            return True
        last = peer.seqs.pop(task_id, None)
        if last is not None and seq <= last:
            peer.seqs[task_id] = last
            return False
        peer.seqs[task_id] = seq
        while len(peer.seqs) > MAX_SEQS_PER_PEER:
            del peer.seqs[next(iter(peer.seqs))]
        return True

    # -- bounded bookkeeping -----------------------------------------------------------------------------

    def _check_marks(self, tp: TaskPeer, delta: int) -> None:
        if delta > 0:
            if self.marks + delta > MAX_MARKS:
                raise Exhausted(f"the scheduler tracks {MAX_MARKS} piece marks already")
            peer = self.peers.get(tp.peer_id)
            if peer is not None and peer.marks + delta > MAX_MARKS_PER_PEER:
                raise Exhausted(f"peer {tp.peer_id} announced more than {MAX_MARKS_PER_PEER} pieces in "
                                "unfinished tasks")

    def _set_marks(self, tp: TaskPeer, finished: set[int] | None, in_flight: set[int] | None) -> None:
        """Replace a TaskPeer's piece sets, within the per-peer and global bounds on piece marks."""
        peer = self.peers.get(tp.peer_id)
        new_f = tp.finished if finished is None else finished
        new_i = tp.in_flight if in_flight is None else in_flight
        delta = len(new_f) + len(new_i) - tp.marks
        self._check_marks(tp, delta)
        tp.finished, tp.in_flight = new_f, new_i
        self.marks += delta
        if peer is not None:
            peer.marks += delta

    def _check_digests(self, task: Task, new: int, source: str | None) -> None:
        old_peer = self.peers.get(task.digest_source) if task.digest_source else None
        new_peer = self.peers.get(source) if source else None
        old = len(task.piece_digests)
        if new > old or new_peer is not old_peer:
            if self.digests - old + new > MAX_DIGESTS:
                raise Exhausted(f"the scheduler keeps {MAX_DIGESTS} piece digests already")
            if new_peer is not None and new_peer.digests + new - (old if new_peer is old_peer else 0) \
                    > MAX_DIGESTS_PER_PEER:
                raise Exhausted(f"peer {source} published more than {MAX_DIGESTS_PER_PEER} piece digests")

    def _set_digests(self, task: Task, digests: list[str], source: str | None) -> None:
        """Replace a task's digest list (and its source), within the bounds on kept digests."""
        self._check_digests(task, len(digests), source)
        old_peer = self.peers.get(task.digest_source) if task.digest_source else None
        new_peer = self.peers.get(source) if source else None
        old, new = len(task.piece_digests), len(digests)
        if old_peer is not None:
            old_peer.digests -= old
        if new_peer is not None:
            new_peer.digests += new
        self.digests += new - old
        task.piece_digests = digests
        task.digest_source = source if digests else None

    def _forget_layout(self, task: Task) -> None:
        self._set_digests(task, [], None)
        task.forget_layout()

    # -- tasks -------------------------------------------------------------------------------------------

    def join_task(self, peer_id: str, task_id: str, content_length: int = 0, piece_size: int = 0) -> TaskPeer:
        """Add the peer to the task (created if new). A layout given here is taken as is when the task has
        none: for in-process callers (benchmarks); the RPCs never pass one (see :meth:`learn_metadata`)."""
        peer = self.touch(peer_id)
        task = self.tasks.get(task_id)
        if task is None:
            if len(self.tasks) >= MAX_TASKS:
                raise Exhausted(f"the scheduler holds {MAX_TASKS} tasks already")
            if len(peer.tasks) >= MAX_TASKS_PER_PEER:
                raise Exhausted(f"peer {peer_id} is in {MAX_TASKS_PER_PEER} tasks already")
            task = self.tasks[task_id] = Task(task_id=task_id, created_at=self.clock())
        tp = task.peers.get(peer_id)
        if tp is None:
            if len(peer.tasks) >= MAX_TASKS_PER_PEER:
                raise Exhausted(f"peer {peer_id} is in {MAX_TASKS_PER_PEER} tasks already")
            if len(task.peers) >= MAX_PEERS_PER_TASK:
                raise Exhausted(f"task {task_id} has {MAX_PEERS_PER_TASK} peers already")
            tp = task.peers[peer_id] = TaskPeer(peer_id=peer_id, joined_at=self.clock())
            peer.tasks.add(task_id)
        if content_length and piece_size and not task.content_length:
            task.content_length, task.piece_size = content_length, piece_size
        return tp

    def learn_metadata(self, task: Task, peer_id: str, content_length: int, piece_size: int,
                       digests: list[str] | None = None) -> None:
        """Layout and piece digests from the task's digest source, the seed that hashes the registry's
        bytes (the caller checked that ``peer_id`` is trusted to say so; the fields are validated).

        The first trusted layout stays until the task is reset. Piece digests arrive incrementally
        (``""`` = not hashed yet) while the seed downloads, so children can fetch a piece from the seed as
        soon as its digest is known: unknown entries are filled from later lists, known ones never change.
        """
        if task.digest_source not in (None, peer_id) and task.digest_source in task.peers:
            return   # another seed's layout and digests stand (a reseed after a failure starts over)
        if digests and not task.piece_digests:
            self._check_digests(task, len(digests), peer_id)   # refused whole, before anything changes
        if content_length and (task.content_length, task.piece_size) != (content_length, piece_size):
            if task.content_length:
                self._set_digests(task, [], None)   # a different layout: nothing of the old one applies
            task.content_length, task.piece_size = content_length, piece_size
            total = task.total_pieces   # marks announced before the layout was known may be out of range
            for tp in task.peers.values():
                if any(i >= total for i in tp.finished) or any(i >= total for i in tp.in_flight):
                    self._set_marks(tp, {i for i in tp.finished if i < total}, {i for i in tp.in_flight if i < total})
        if not digests or len(digests) != task.total_pieces:
            return
        if not task.piece_digests:
            self._set_digests(task, list(digests), peer_id)
            return
        for i, d in enumerate(digests):
            if d and not task.piece_digests[i]:
                task.piece_digests[i] = d

    def elect_seed(self, task: Task, peer_id: str) -> None:
        task.seed_peer = peer_id
        task.seed_wait_since = None
        tp = task.peers[peer_id]
        tp.back_to_source = True
        tp.schedule_failures = 0
        # A seed downloads from the registry: it has no parents.
        task.set_parents(peer_id, ())

    def busy_seeding(self, peer_id: str) -> bool:
        """Whether the peer fetches some blob from the registry now: it said so in its last RegisterTask or
        GetParents (that counts tasks of every scheduler), or it is the working seed of a task here."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return False
        if peer.seeding:
            return True
        tasks = self.tasks
        return any(tasks[t].seed_peer == peer_id for t in peer.tasks if t in tasks)

    def background_peer_free(self, besides: str, since: float) -> bool:
        """Whether a peer other than ``besides`` that asked for background blobs (a preheat) at or after
        ``since`` fetches nothing from the registry: it is likely to ask for the same blobs soon (peers of
        one preheat job ask for the same blobs in the same order)."""
        for pid in self.background:
            peer = self.peers.get(pid)
            if pid != besides and peer is not None and peer.background_at >= since \
                    and pid not in self.quarantined and not self.busy_seeding(pid):
                return True
        return False

    def note_asker(self, peer_id: str, seeding: int, background: bool) -> None:
        """What a RegisterTask/GetParents caller said of itself: how many blobs it fetches from the registry
        (:meth:`busy_seeding`) and, for a blob nobody waits on, that it is preheating (remembered most
        recent last, bounded, for :meth:`background_peer_free`)."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return
        peer.seeding = seeding
        if not background:
            return
        peer.background_at = self.clock()
        self.background.pop(peer_id, None)
        self.background[peer_id] = None
        while len(self.background) > MAX_BACKGROUND_PEERS:
            self.background.pop(next(iter(self.background)))

    def trusted(self, task: Task, tp: TaskPeer) -> bool:
        """Whether this peer's word on layout and piece digests counts: it was sent to the registry for
        this task (it hashes what the registry sends) and was never caught lying."""
        return tp.back_to_source and tp.peer_id not in task.isolated and tp.peer_id not in self.quarantined

    def announce(self, peer_id: str, task_id: str, finished: Iterable[int], in_flight: Iterable[int],
                 content_length: int = 0, piece_size: int = 0, digests: list[str] | None = None,
                 done: bool = False, seq: int = 0,
                 transfers: Iterable[tuple[str, int]] | None = None) -> TaskPeer | None:
        """The peer's whole state in the task. None: ``seq`` says it is older than a message already
        taken from the peer for the task (ignored). ``transfers`` (parent id, piece): its piece requests
        running now; None: the peer does not report them."""
        self.touch(peer_id)
        if not self.fresh(peer_id, task_id, seq):
            return None
        tp = self.join_task(peer_id, task_id)
        task = self.tasks[task_id]
        new_finished = tp.finished | set(finished) if finished else tp.finished
        new_in_flight = set(in_flight) - new_finished
        if not done:
            self._check_marks(tp, len(new_finished) + len(new_in_flight) - tp.marks)
            if transfers is not None:
                self.set_transfers(task, tp, transfers)
        # Layout and digests only from a peer that hashed them from the registry: a peer that merely says
        # it is done (or a child whose pieces came from parents) could say anything.
        if self.trusted(task, tp):
            self.learn_metadata(task, peer_id, content_length, piece_size, digests)
        if done:
            self.mark_done(task, tp)
            return tp
        tp.done = False   # an announcement is the peer's whole state: it lost pieces (a damaged disk)
        # An announcement carries the peer's whole in-flight set: a piece it gave up on (its parent sent it
        # elsewhere) must not keep looking like it is on its way.
        self._set_marks(tp, new_finished, new_in_flight)
        return tp

    def mark_done(self, task: Task, tp: TaskPeer) -> None:
        """A complete peer: ``done`` stands for every piece (never materialized, whatever the blob size)."""
        tp.done = True
        self._set_marks(tp, set(), set())
        for parent, piece in list(tp.transfers):   # it fetches nothing any more
            self._drop_transfer(parent, task.task_id, tp.peer_id, piece)
        # A complete peer downloads nothing more: dropping its edges frees its parents' upload slots.
        task.set_parents(tp.peer_id, ())

    def report_task(self, peer_id: str, task_id: str, success: bool, error: str = "", seq: int = 0) -> bool:
        """End of a peer's download. Returns True when the failure of the seed reset the task.

        A child whose complete blob did not match the blob digest although every piece matched its
        piece digest proves the digests wrong: their source is isolated from the task and the task is
        reset (the next peer to ask becomes the seed). A report older (``seq``) than a message already
        taken from the peer for the task is ignored."""
        task = self.tasks.get(task_id)
        self.touch(peer_id)
        if not self.fresh(peer_id, task_id, seq):
            return False
        if task is None or peer_id not in task.peers:
            return False
        tp = task.peers[peer_id]
        if success:
            self.mark_done(task, tp)
            if task.seed_peer == peer_id:
                task.seed_peer = None   # not needed any more: a done peer serves everything
            return False
        source = task.digest_source
        if error.startswith("digest_mismatch") and source and source != peer_id and not tp.back_to_source:
            self.isolate(task, source, peer_id)
            self.leave_task(peer_id, task_id)
            return True
        # A failed peer leaves with its pieces (they may be what broke); a failed seed resets the task.
        return self.leave_task(peer_id, task_id)

    def isolate(self, task: Task, suspect: str, reporter: str) -> None:
        """``suspect`` was caught lying in ``task`` (corrupt piece, digests the blob contradicts): never
        a parent, seed or digest source of the task again; once peers on QUARANTINE_REPORTERS hosts
        caught it, of no task at all."""
        if len(task.isolated) < MAX_ISOLATED:
            task.isolated.add(suspect)
        reporter_peer = self.peers.get(reporter)
        if suspect in self.peers:
            hosts = self.lying_reports.setdefault(suspect, set())
            hosts.add(reporter_peer.host.host_id if reporter_peer else reporter)
            if len(hosts) >= QUARANTINE_REPORTERS and len(self.quarantined) < MAX_ISOLATED:
                self.quarantined.add(suspect)
        self._drop_transfers(task, suspect)
        stp = task.peers.get(suspect)
        if stp is not None:
            stp.done = False
            self._set_marks(stp, set(), set())
        if task.digest_source == suspect or task.seed_peer == suspect:
            self._forget_layout(task)
            if task.seed_peer == suspect:
                task.seed_peer = None
        for child in task.children_of.pop(suspect, set()):
            if child in task.peers:
                task.peers[child].parents.discard(suspect)

    def is_isolated(self, task: Task, peer_id: str) -> bool:
        return peer_id in task.isolated or peer_id in self.quarantined

    def leave_task(self, peer_id: str, task_id: str, peer: Peer | None = None) -> bool:
        """Remove a peer from a task. Returns True when that reset the task (the seed left unfinished)."""
        peer = peer or self.peers.get(peer_id)
        if peer is not None:
            peer.tasks.discard(task_id)
        task = self.tasks.get(task_id)
        if task is None:
            return False
        was_seed = task.seed_peer == peer_id
        self._drop_transfers(task, peer_id)
        tp = task.peers.get(peer_id)
        if tp is not None:
            self._set_marks(tp, set(), set())
        reset = False
        if task.digest_source == peer_id and not (tp is not None and tp.done):
            self._forget_layout(task)
        elif task.digest_source == peer_id:
            # Its digests stay (a done seed's word is as good as it was), but no longer on its account.
            self._set_digests(task, task.piece_digests, None)
        task.remove_peer(peer_id)
        if was_seed and tp is not None and not tp.done and not any(t.done for t in task.peers.values()):
            # The seed's registry fetch failed or vanished: what it said about the blob is suspect (the
            # piece digests may come from a corrupt stream). Forget it; the next peer to ask re-seeds.
            task.failed_seeds += 1
            task.failed_seed_peers.add(peer_id)
            self._forget_layout(task)
            reset = True
        if not task.peers:
            self._forget_layout(task)
            del self.tasks[task_id]
        return reset

    def report_piece(self, child_id: str, task_id: str, parent_id: str, piece: int, success: bool,
                     cost_s: float, size: int, error: str = "", max_failures: int = 3) -> str | None:
        """Account one piece a child fetched from a parent. Returns a blocklist reason, if it earned one.

        A corrupt piece (bytes that do not match the seed's piece digest) isolates the parent from the task
        at once, for every child: its bytes cannot be trusted. Other errors (timeout, connection) blocklist
        it for this child only, after ``max_failures`` in a row, since a busy parent recovers.
        """
        task = self.tasks.get(task_id)
        child = task.peers.get(child_id) if task else None
        if child is None:
            return None
        parent_peer = self.peers.get(parent_id)
        parent_tp = task.peers.get(parent_id)
        for listener in self.piece_listeners:
            listener(task, child_id, parent_id, size, cost_s, success)
        uploads = self.upload_load(parent_id) if success and parent_peer is not None else 0
        self._drop_transfer(parent_id, task_id, child_id, piece)   # this transfer is over, whatever the outcome
        if success:
            if parent_peer is not None and child_id in self.peers:
                self.bandwidth.observe(parent_peer.host.host_id, self.peers[child_id].host.host_id, size, cost_s,
                                       uploads=uploads, downloads=len(child.parents))
            child.failures.pop(parent_id, None)
            if not child.done and piece not in child.finished:
                self._set_marks(child, child.finished | {piece}, child.in_flight - {piece})
            if parent_tp is not None:
                parent_tp.served_costs.append((self.clock(), cost_s))
                task.add_parent(child_id, parent_id)
            if parent_peer is not None:
                parent_peer.served_ok += 1
                parent_peer.observe_upload(size, cost_s)
            return None
        if parent_peer is not None:
            parent_peer.served_failed += 1
        if error == "corrupt" and parent_tp is not None and parent_id != task.digest_source \
                and not self.is_isolated(task, parent_id):
            self.blocklist(task, child_id, parent_id)
            self.isolate(task, parent_id, child_id)
            return "corrupt"
        if parent_id in child.blocklist or parent_tp is None:
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
        if parent_id in child.blocklist or parent_id not in task.peers:
            return False   # only peers of the task: a child's exclude list must not grow our state
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
        self.expire_transfers()
        removed = sorted(before - set(self.tasks))
        return Expired(peers=gone, reset_tasks=[t for t in reset if t in self.tasks], removed_tasks=removed)
