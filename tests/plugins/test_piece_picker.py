"""The child's piece picker (plugins/peer/picker.py), alone: no mesh, no event loop, no clock.

Examples pin the policy (rarest first from the least loaded relaying child, one request at a time to a
streaming seed outside the fetch slots, busy and "relayed" back-offs, endgame duplicates); properties
check it on arbitrary meshes: never a piece no usable parent has, never a piece without a digest or one
we hold, each piece at most once outside the endgame, duplicates only in the endgame, load limits kept,
the bookkeeping left as found, no idle slot while a relayable piece waits, and a whole simulated
download that always finishes with at most two requests per piece.
"""
from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from remora.plugins.peer.picker import (
    BUSY_BACKOFF,
    ENDGAME_AFTER,
    ENDGAME_PIECES,
    RELAYED_BACKOFF,
    Holder,
    PiecePicker,
)

NOW = 1000.0
DIGEST = "sha256:" + "ab" * 32


def digests(n: int, unknown=()) -> list[str]:
    return ["" if i in unknown else DIGEST for i in range(n)]


def mesh(*holders: Holder) -> dict[str, Holder]:
    return {h.peer_id: h for h in holders}


def relay(pid: str, pieces, in_flight=()) -> Holder:
    return Holder(pid, False, frozenset(pieces), frozenset(in_flight))


def seed(pid: str, pieces) -> Holder:
    return Holder(pid, True, frozenset(pieces))


def pick(picker: PiecePicker, missing, parents, *, n: int = 16, have=(), in_flight=(), unknown=(), blocklist=(),
         running=(), now: float = NOW):
    return picker.pick(set(missing), have=set(have), in_flight=set(in_flight), digests=digests(n, unknown),
                       parents=parents, blocklist=set(blocklist), running=list(running), now=now)


def start(picker: PiecePicker, running: list, piece: int, pid: str, t0: float) -> None:
    """What the coordinator and the fetcher do for a piece the picker named."""
    picker.started(piece, pid)
    running.append((piece, pid, t0))


# -- examples ---------------------------------------------------------------------------------------


def test_no_parents_or_none_usable_leaves_the_slots_free():
    p = PiecePicker(4)
    assert pick(p, {0, 1}, {}) == ([], True)
    assert pick(p, {0, 1}, mesh(relay("a", {0, 1})), blocklist={"a"}) == ([], True)


def test_rarest_piece_first_each_from_the_least_loaded_holder():
    p = PiecePicker(8, random.Random(1))
    parents = mesh(relay("a", {0, 1, 2}), relay("b", {1, 2}), relay("c", {2}))
    plan, starved = pick(p, {0, 1, 2}, parents)
    assert plan == [(0, "a"), (1, "b"), (2, "c")]
    assert starved, "slots are left: a fresher view may have more"


def test_a_parent_gets_at_most_its_share_of_our_requests():
    p = PiecePicker(4, random.Random(2))
    parents = mesh(relay("a", range(16)), relay("b", range(16)), relay("c", range(16)), relay("d", range(16)))
    plan, starved = pick(p, range(16), parents)
    assert len(plan) == 4 and not starved
    assert max(Counter(pid for _, pid in plan).values()) <= 2   # per parent: max(2, 4 / 4 usable)
    running: list = []
    for i, pid in plan:
        start(p, running, i, pid, NOW)
    p.load["a"] = 2   # a is at its share
    plan2, _ = pick(p, set(range(16)) - {i for i, _ in plan}, parents, in_flight={i for i, _ in plan},
                    running=running)
    assert plan2 == [], "every slot is taken"


def test_a_streaming_seed_is_asked_one_piece_at_a_time_outside_the_slots():
    p = PiecePicker(1, random.Random(3))
    parents = mesh(seed("s", range(8)), relay("a", {5}))
    running: list = []
    start(p, running, 7, "a", NOW)  # the only slot is busy with a relay
    plan, _ = pick(p, range(7), parents, in_flight={7}, running=running)
    assert len(plan) == 1 and plan[0][1] == "s", "the seed's uplink never idles because our slots are full"
    assert plan[0][0] != 5, "a piece a child holds is relayed, not asked from the seed"
    start(p, running, plan[0][0], "s", NOW)
    plan2, starved = pick(p, set(range(7)) - {plan[0][0]}, parents, in_flight={7, plan[0][0]}, running=running)
    assert plan2 == [] and not starved, "one request at a time to a seed, and the slot is full"


def test_fresh_pieces_another_child_fetches_come_last_from_the_seed():
    for s in range(20):
        p = PiecePicker(4, random.Random(s))
        parents = mesh(seed("s", {0, 1}), relay("a", set(), in_flight={0}))
        assert pick(p, {0, 1}, parents)[0] == [(1, "s")]


def test_a_seed_that_relayed_a_piece_is_not_asked_for_it_again_before_the_backoff():
    p = PiecePicker(4)
    parents = mesh(seed("s", {0}))
    p.relayed("s", 0, NOW)
    assert pick(p, {0}, parents, now=NOW + RELAYED_BACKOFF / 2)[0] == []
    assert pick(p, {0}, parents, now=NOW + RELAYED_BACKOFF)[0] == [(0, "s")]
    p.relayed("s", 0, NOW)
    p.forget_refusals()
    assert pick(p, {0}, parents, now=NOW)[0] == [(0, "s")]


def test_a_busy_parent_is_left_alone_for_a_moment():
    p = PiecePicker(4)
    parents = mesh(relay("a", {0}), relay("b", {1}))
    p.busy("a", NOW)
    assert pick(p, {0, 1}, parents, now=NOW + BUSY_BACKOFF / 2)[0] == [(1, "b")]
    assert sorted(pick(p, {0, 1}, parents, now=NOW + BUSY_BACKOFF)[0]) == [(0, "a"), (1, "b")]


def test_pieces_without_a_digest_held_or_in_flight_are_never_asked():
    p = PiecePicker(8)
    parents = mesh(relay("a", range(6)))
    plan, _ = pick(p, range(6), parents, unknown={0}, have={1}, in_flight={2})
    assert sorted(i for i, _ in plan) == [3, 4, 5]


def test_endgame_asks_a_slow_last_piece_from_a_second_parent_once():
    p = PiecePicker(4)
    parents = mesh(relay("a", {0, 1}), relay("b", {0, 1}))
    running: list = []
    start(p, running, 0, "a", NOW)
    start(p, running, 1, "b", NOW + 0.4)
    # Not yet: the fetches are young.
    assert pick(p, {0, 1}, parents, in_flight={0, 1}, running=running, now=NOW + 0.3)[0] == []
    # The old one gets a second copy from the other holder; the young one does not.
    plan, _ = pick(p, {0, 1}, parents, in_flight={0, 1}, running=running, now=NOW + ENDGAME_AFTER)
    assert plan == [(0, "b")]
    start(p, running, 0, "b", NOW + ENDGAME_AFTER)
    plan, _ = pick(p, {0, 1}, parents, in_flight={0, 1}, running=running, now=NOW + 2)
    assert plan == [(1, "a")], "never a third copy, never the same parent twice"
    assert p.ended(0, "a") is False and p.ended(0, "b") is True


def test_endgame_never_asks_twice_for_a_piece_without_a_digest():
    """Found by the property test below: the last piece's digest is gone (a layout reset while its first
    fetch ran); a second copy could not be verified, so none is asked for (the fetcher would refuse)."""
    p = PiecePicker(4)
    parents = mesh(seed("s", set()), relay("b", {0, 1, 2, 3}))
    running: list = []
    start(p, running, 3, "s", NOW - 0.5)
    assert pick(p, {0, 1, 2, 3}, parents, n=4, have={0, 1, 2}, in_flight={3}, unknown={0, 1, 2, 3},
                running=running, now=NOW + ENDGAME_AFTER)[0] == []
    plan, _ = pick(p, {0, 1, 2, 3}, parents, n=4, have={0, 1, 2}, in_flight={3}, running=running,
                   now=NOW + ENDGAME_AFTER)
    assert plan == [(3, "b")], "with its digest known, the endgame asks the other holder"


def test_no_endgame_while_a_piece_is_not_in_flight_or_too_many_are_missing():
    p = PiecePicker(4)
    parents = mesh(relay("a", range(20)), relay("b", range(20)))
    running: list = []
    start(p, running, 0, "a", NOW)
    # piece 1 is wanted, not in flight and nobody has it with a digest: not the endgame yet
    assert pick(p, {0, 1}, parents, in_flight={0}, unknown={1}, running=running, now=NOW + 5)[0] == []
    many = set(range(ENDGAME_PIECES + 1))
    running = []
    p = PiecePicker(ENDGAME_PIECES + 4)
    for i in many:
        start(p, running, i, "a", NOW)
    assert pick(p, many, parents, in_flight=many, running=running, now=NOW + 5)[0] == []
    fewer = set(range(ENDGAME_PIECES))
    p, running = PiecePicker(2 * ENDGAME_PIECES), []   # a free slot for each second copy
    for i in fewer:
        start(p, running, i, "a", NOW)
    plan, _ = pick(p, fewer, parents, in_flight=fewer, running=running, now=NOW + 5)
    assert {i for i, _ in plan} == fewer and {pid for _, pid in plan} == {"b"}
    p, running = PiecePicker(ENDGAME_PIECES + 2), []   # ... else as many as there are free slots
    for i in fewer:
        start(p, running, i, "a", NOW)
    assert len(pick(p, fewer, parents, in_flight=fewer, running=running, now=NOW + 5)[0]) == 2


def test_started_and_ended_keep_the_counts():
    p = PiecePicker(4)
    assert p.started(3, "a") == 1 and p.started(4, "a") == 2 and p.started(3, "b") == 1
    assert p.ended(3, "a") is False
    assert p.ended(3, "b") is True and 3 not in p.fetching
    assert p.ended(4, "a") is True and +p.load == Counter()


def test_holder_of_a_scheduler_parent():
    from remora._proto import remora_scheduler_pb2 as pb
    parent = pb.Parent(host=pb.PeerHost(peer_id="x"), pieces=[1, 2], in_flight=[3], source=True)
    assert Holder.of(parent) == Holder("x", True, frozenset({1, 2}), frozenset({3}))


# -- properties -------------------------------------------------------------------------------------


@st.composite
def situations(draw):
    n = draw(st.integers(1, 24))
    pieces = st.frozensets(st.integers(0, n - 1))
    k = draw(st.integers(1, 5))
    parents = {}
    for j in range(k):
        pid = f"p{j}"
        parents[pid] = Holder(pid, draw(st.booleans()), draw(pieces), draw(pieces))
    have = set(draw(pieces))
    missing = set(draw(pieces)) | draw(st.frozensets(st.integers(0, n - 1)))
    in_flight = set(draw(pieces)) - have
    unknown = draw(pieces)
    blocklist = set(draw(st.frozensets(st.sampled_from(sorted(parents)))))
    busy = set(draw(st.frozensets(st.sampled_from(sorted(parents)))))
    picker = PiecePicker(draw(st.integers(1, 10)), random.Random(draw(st.integers(0, 1 << 16))))
    for pid in busy:
        picker.busy(pid, NOW - BUSY_BACKOFF / 2)
    running = []
    for i in sorted(in_flight):  # what is in flight is ours: one or two requests, to holders or not
        for pid in draw(st.lists(st.sampled_from(sorted(parents)), min_size=1, max_size=2, unique=True)):
            start(picker, running, i, pid, NOW - draw(st.sampled_from([0.0, 0.1, ENDGAME_AFTER, 3.0])))
    return n, parents, have, missing, in_flight, unknown, blocklist, busy, picker, running


@settings(max_examples=200, deadline=None)
@given(situations())
def test_every_pick_respects_the_policy(case):
    n, parents, have, missing, in_flight, unknown, blocklist, busy, picker, running = case
    load_before = +picker.load
    fetching_before = Counter(picker.fetching)
    plan, starved = picker.pick(missing, have=have, in_flight=in_flight, digests=digests(n, unknown),
                                parents=parents, blocklist=blocklist, running=running, now=NOW)
    assert +picker.load == load_before and picker.fetching == fetching_before, "provisional counts undone"
    usable = [pid for pid in parents if pid not in blocklist and pid not in busy]
    left = missing - have
    endgame = bool(left) and left <= in_flight and len(left) <= ENDGAME_PIECES
    pieces = [i for i, _ in plan]
    assert len(pieces) == len(set(pieces)), "a piece is asked at most once per pick"
    for i, pid in plan:
        assert pid in usable, "never a blocklisted, busy or unknown parent"
        assert i in parents[pid].pieces, "never a piece that parent does not have"
        assert i in missing and i not in have and i not in unknown
        if i in in_flight:  # a second copy: the endgame only
            assert endgame
            asked = [r for r in running if r[0] == i]
            assert len(asked) == 1 and asked[0][1] != pid and NOW - asked[0][2] >= ENDGAME_AFTER
    if not endgame:
        assert not set(pieces) & in_flight, "outside the endgame, nothing in flight is asked again"
    # load limits: non-source requests within the free slots and each parent's share; one per idle seed
    free = picker.concurrency - sum(1 for _, pid, _ in running if not parents[pid].source)
    relayed = [(i, pid) for i, pid in plan if not parents[pid].source]
    assert len(relayed) <= max(free, 0)
    per_parent = max(2, -(-picker.concurrency // len(usable))) if usable else 0
    for pid, count in Counter(pid for _, pid in plan).items():
        if parents[pid].source:
            assert count == 1 and picker.load[pid] == 0
        else:
            assert picker.load[pid] + count <= per_parent
    # liveness: a free slot is never left while a relayable piece waits at a parent under its share
    waiting = [i for i in left - in_flight if i not in unknown
               and any(i in parents[pid].pieces and not parents[pid].source and picker.load[pid] < per_parent
                       for pid in usable)]
    if free > 0 and waiting:
        assert relayed, "a free slot and a relayable piece, yet nothing picked"
    if len(relayed) < free:
        assert starved, "free slots left: the caller must learn the view is worth refreshing"


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 8), st.integers(0, 1 << 16), st.data())
def test_a_simulated_download_finishes_with_at_most_two_requests_per_piece(n, k, concurrency, seed_, data):
    """Rounds of pick, start, land: whatever lands when, every piece arrives, a piece is never requested
    twice at once outside the endgame, never three times, and no parent ever gets more than its share."""
    rng = random.Random(seed_)
    parents = {}
    for j in range(k):
        pid = f"p{j}"
        parents[pid] = Holder(pid, j == 0 and data.draw(st.booleans()),
                              frozenset(i for i in range(n) if rng.random() < 0.5))
    held = set().union(*(h.pieces for h in parents.values()))
    picker = PiecePicker(concurrency, rng)
    have: set[int] = set()
    running: list = []
    now = NOW
    for _ in range(20 * n + 50):
        in_flight = {i for i, _, _ in running}
        plan, _ = picker.pick(set(range(n)) - have, have=have, in_flight=in_flight, digests=digests(n),
                              parents=parents, blocklist=set(), running=running, now=now)
        left = set(range(n)) - have
        for i, pid in plan:
            if i in in_flight:
                assert left <= in_flight and len(left) <= ENDGAME_PIECES
            start(picker, running, i, pid, now)
        per_piece = Counter(i for i, _, _ in running)
        assert max(per_piece.values(), default=0) <= 2
        share = max(2, -(-concurrency // k))
        assert all(picker.load[pid] <= (1 if parents[pid].source else share) for pid in parents)
        # some requests land (at least the oldest one, so the download moves); the other copy is cancelled
        if running:
            landing = {running[0][0]} | {i for i, _, _ in running if data.draw(st.booleans())}
            for i, pid, _ in [r for r in running if r[0] in landing]:
                picker.ended(i, pid)
            running = [r for r in running if r[0] not in landing]
            have |= landing
        now += 0.3
        if have >= held:
            break
    assert have == held, "every piece some parent holds arrived"
    assert not running and +picker.load == Counter() and not picker.fetching
