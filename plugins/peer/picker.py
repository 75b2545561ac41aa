"""The child's piece picker: which missing piece to fetch next, and from which parent.

Pure on purpose (no I/O, no clock, no asyncio: the caller passes ``now``), like the piece dispatcher of
Dragonfly's client, so that the policy can be tested exhaustively without a mesh, and so that the
coordinator (download.py) and the fetcher (fetcher.py) only *report* to it what they started, finished
or were refused, and ask it what to start next.

The policy follows the capacity of the mesh rather than piece order:

* A piece some non-source parent (a child that already has it) holds comes from one of those, the one
  we have the fewest requests running to (at most ``per_parent`` each, so every relaying child gets
  asked), rarest piece first so that what one child got first spreads fastest.
* A piece only a *source* parent (the seed, still streaming from the registry) holds is asked from it
  with at most one request of ours in flight to that parent: every child then takes a different fresh
  piece, and the seed's uplink carries each piece about once. Pieces another child is already fetching
  come last (that child will relay them). The request to a source does not take one of the
  ``concurrency`` slots: the source's uplink is the bottleneck of the mesh while it streams and must never
  idle because our slots are full of (slower) relays.
* Endgame (BitTorrent's): a download ends with its slowest piece. Once every missing piece is being
  fetched and at most :data:`ENDGAME_PIECES` are missing, a piece fetched for longer than
  :data:`ENDGAME_AFTER` by one request only is also asked from a second parent; the first copy to land
  wins (the coordinator cancels the other).
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

#: Endgame: once every missing piece is being fetched and at most this many are missing, a piece whose
#: fetch has run this long is also asked from a second parent; the first copy to arrive wins, the other
#: fetch is cancelled.
ENDGAME_PIECES = 8
ENDGAME_AFTER = 0.5
#: A parent that answered 503 (no free upload slot) is left alone this long.
BUSY_BACKOFF = 0.2
#: A seed that refused a fresh piece (it sent it to another child moments ago) is not asked for that piece
#: again before this; meanwhile the piece comes from that child.
RELAYED_BACKOFF = 0.5

#: A fetch that is running: (piece, parent peer id, monotonic start time).
Running = tuple[int, str, float]
#: What the picker says to start: (piece, parent peer id).
Plan = list[tuple[int, str]]


@dataclass(frozen=True)
class Holder:
    """A parent as the picker sees it: what it has finished and what it is fetching itself."""

    peer_id: str
    source: bool = False                    # streams the blob from the registry (the seed)
    pieces: frozenset[int] = frozenset()    # finished: can be asked for now
    in_flight: frozenset[int] = frozenset()  # on their way to it: it will relay them soon

    @classmethod
    def of(cls, parent) -> Holder:
        """From a scheduler ``Parent`` message (duck-typed: this module imports no protocol code)."""
        return cls(parent.host.peer_id, bool(parent.source), frozenset(parent.pieces), frozenset(parent.in_flight))


class PiecePicker:
    """The picking policy plus its bookkeeping: our requests per parent and per piece, parents that said
    "busy" and source parents that said "relayed". Mutated only through the methods below."""

    def __init__(self, concurrency: int, rng: random.Random | None = None):
        self.concurrency = concurrency
        self.rng = rng or random.Random()
        self.load: Counter = Counter()               # parent peer id -> our requests running to it
        self.fetching: Counter = Counter()           # piece -> our requests running for it (2 in the endgame)
        self.busy_until: dict[str, float] = {}       # parent peer id -> not before (answered 503 busy)
        self.refused: dict[tuple[str, int], float] = {}  # (source parent, piece) -> not before (relayed)
        self._cached: tuple | None = None            # see _index

    # -- bookkeeping ----------------------------------------------------------------------------------
    def started(self, piece: int, parent_id: str) -> int:
        """A request for ``piece`` to ``parent_id`` starts; returns our requests now running to it."""
        self.load[parent_id] += 1
        self.fetching[piece] += 1
        return self.load[parent_id]

    def ended(self, piece: int, parent_id: str) -> bool:
        """A request ended (whatever the outcome); True when it was the last one for ``piece``."""
        self.load[parent_id] -= 1
        self.fetching[piece] -= 1
        if self.fetching[piece] <= 0:
            del self.fetching[piece]
            return True
        return False

    def busy(self, parent_id: str, now: float) -> None:
        """The parent had no free upload slot: healthy, just loaded; left alone for a moment."""
        self.busy_until[parent_id] = now + BUSY_BACKOFF

    def relayed(self, parent_id: str, piece: int, now: float) -> None:
        """The source parent sent ``piece`` to another child already: get it from that child."""
        self.refused[(parent_id, piece)] = now + RELAYED_BACKOFF

    def forget_refusals(self) -> None:
        self.refused.clear()

    # -- policy ---------------------------------------------------------------------------------------
    def pick(self, missing: set[int] | Iterable[int], *, have: set[int], in_flight: set[int], digests: Sequence[str],
             parents: Mapping[str, Holder], blocklist: Mapping[str, str] | set[str], running: Iterable[Running],
             now: float) -> tuple[Plan, bool]:
        """(piece, parent id) pairs to start now: up to ``concurrency`` (minus the ``running`` requests to
        non-source parents) from non-source parents, plus one from each idle source parent; and whether
        slots were left free for lack of candidates (then a fresher view of the mesh is worth having).

        ``missing``: wanted pieces not held (may be a little stale: ``have`` is checked again);
        ``in_flight``: pieces on their way to us (from a parent or the registry); ``digests``: the piece
        digests known so far (a piece without one cannot be verified, so it is not asked for)."""
        if not isinstance(missing, (set, frozenset)):
            missing = set(missing)
        running = list(running)
        if not parents:
            return [], True
        slots = self.concurrency - sum(1 for _, pid, _ in running if not (pid in parents and parents[pid].source))
        usable = [p for pid, p in parents.items()
                  if pid not in blocklist and self.busy_until.get(pid, 0.0) <= now]
        if not usable:
            return [], True
        per_parent = max(2, -(-self.concurrency // len(usable)))
        load = self.load
        relays, sources, elsewhere = self._index(usable)
        candidates = [i for i in missing if i not in in_flight and i not in have and digests[i]]
        self.rng.shuffle(candidates)  # ties break differently on every child: fewer collisions on one parent
        plan: list[tuple[int, Holder]] = []
        fresh = sorted((i for i in candidates if i not in relays and i in sources), key=lambda i: i in elsewhere)
        for i in fresh:
            options = [p for p in sources[i] if load[p.peer_id] < 1 and self.refused.get((p.peer_id, i), 0.0) <= now]
            if options:
                parent = options[0]
                plan.append((i, parent))
                load[parent.peer_id] += 1  # provisional: undone below, counted for real by started()
        relayable = sorted((i for i in candidates if i in relays), key=lambda i: len(relays[i]))
        for i in relayable:
            if slots <= 0:
                break
            options = [p for p in relays[i] if load[p.peer_id] < per_parent]
            if options:
                parent = min(options, key=lambda p: load[p.peer_id])
                plan.append((i, parent))
                load[parent.peer_id] += 1
                slots -= 1
        if slots > 0 and not plan:
            left = {i for i in missing if i not in have}
            if left <= in_flight and len(left) <= ENDGAME_PIECES:   # every missing piece is on its way: the endgame
                # (a second request only for a piece that can be verified: its digest may have been
                # dropped since the first one started, after a layout reset, and the fetcher would refuse)
                verifiable = {i for i in left if i < len(digests) and digests[i]}
                for i, parent in self._endgame(verifiable, running, relays, sources, per_parent, now)[:slots]:
                    plan.append((i, parent))
                    load[parent.peer_id] += 1
                    slots -= 1
        for _, parent in plan:  # undo the provisional counts
            load[parent.peer_id] -= 1
        source_idle = any(p.source and not load[p.peer_id] for p in usable) and \
            not any(parent.source for _, parent in plan)
        return [(i, p.peer_id) for i, p in plan], slots > 0 or source_idle

    def _index(self, usable: list[Holder]) -> tuple[dict, dict, set]:
        """(piece -> relaying parents, piece -> source parents, pieces in flight at relaying parents) over
        the ``usable`` parents. Built once per view of the mesh (a refreshed view brings new :class:`Holder`
        objects, which are immutable) and per set of usable parents, not once per pick: a child picks after
        every landed piece, and rebuilding this from 15 parents' piece sets each time was most of the
        picker's cost (8 ms per call under load)."""
        cached = self._cached
        if cached is not None and len(cached[0]) == len(usable) and all(a is b for a, b in zip(cached[0], usable)):
            return cached[1]   # the very same (immutable) holders: the same index
        relays: dict[int, list[Holder]] = {}
        sources: dict[int, list[Holder]] = {}
        elsewhere: set[int] = set()   # in flight at a non-source parent: it will relay them soon
        for p in usable:
            if p.source:
                for i in p.pieces:
                    sources.setdefault(i, []).append(p)
            else:
                elsewhere.update(p.in_flight)
                for i in p.pieces:
                    relays.setdefault(i, []).append(p)
        self._cached = (usable, (relays, sources, elsewhere))   # holds the holders: no id is reused meanwhile
        return relays, sources, elsewhere

    def _endgame(self, missing: set[int], running: list[Running], relays: dict[int, list[Holder]],
                 sources: dict[int, list[Holder]], per_parent: int, now: float) -> list[tuple[int, Holder]]:
        """Second requests for the last pieces, oldest fetches first, each from the least loaded other
        parent holding the piece (a source parent only if we have nothing running to it)."""
        if len(missing) > ENDGAME_PIECES:
            return []
        load = self.load
        started: dict[int, float] = {}
        asked: dict[int, set[str]] = {}
        for index, pid, t0 in running:
            started[index] = min(started.get(index, t0), t0)
            asked.setdefault(index, set()).add(pid)
        plan = []
        for index in sorted(missing, key=lambda i: started.get(i, now)):
            if self.fetching[index] != 1 or len(asked.get(index, ())) != 1 or now - started[index] < ENDGAME_AFTER:
                continue
            options = [p for p in relays.get(index, []) if p.peer_id not in asked[index]
                       and load[p.peer_id] < per_parent]
            options += [p for p in sources.get(index, []) if p.peer_id not in asked[index]
                        and load[p.peer_id] < 1 and self.refused.get((p.peer_id, index), 0.0) <= now]
            if options:
                parent = min(options, key=lambda p: load[p.peer_id])
                plan.append((index, parent))
                load[parent.peer_id] += 1  # provisional, undone here: the caller counts its plan itself
        for _, parent in plan:
            load[parent.peer_id] -= 1
        return plan
