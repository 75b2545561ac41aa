"""Fuzzing the mesh's parsers of untrusted input: the mirror's Range header and the scheduler's requests.

The Range parser must answer every header with "ignore", "unsatisfiable" or a span inside the blob, and
never raise (it runs before any error handling that could turn an exception into a clean answer). The
scheduler's handlers get arbitrary field values, one request or a sequence on one scheduler: each must
be accepted or refused with one of the scheduler's own errors (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
FAILED_PRECONDITION, NOT_FOUND), never another exception, within the address-space cap of conftest.py,
and the state's own bookkeeping (piece marks, digest counts, layouts) must stay consistent.
"""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from remora._proto import remora_scheduler_pb2 as pb
from remora.plugins.peer.mirror import _parse_range
from remora.plugins.scheduler import validate
from remora.plugins.scheduler.server import SchedulerConfig, SchedulerService, UnknownTask
from remora.plugins.scheduler.state import Exhausted, UnknownPeer

# -- the mirror's Range parser --------------------------------------------------------------------------

NUMBER = st.one_of(st.integers(0, 1 << 70).map(str), st.text("0123456789", max_size=5000),
                   st.text(max_size=8), st.just(""))
RANGE = st.one_of(
    st.text(max_size=200),
    st.builds(lambda a, b, sep, pre: f"{pre}={a}{sep}{b}", NUMBER, NUMBER, st.sampled_from(["-", ",", "--", " - "]),
              st.sampled_from(["bytes", "Bytes", "items", "bytes "])),
    st.builds(lambda a, b: f"bytes={a}-{b}, {b}-{a}", NUMBER, NUMBER),
)
SIZE = st.one_of(st.integers(1, 1 << 41), st.sampled_from([1, 2, 4095, 4096, 1 << 40]))


@given(RANGE, SIZE)
def test_range_parser_answers_every_header_with_a_span_inside_the_blob(header, size):
    span = _parse_range(header, size)
    if span is None or span == "unsatisfiable":
        return
    start, end, open_ended = span
    assert 0 <= start < end <= size, (header, size, span)
    assert open_ended is (end == size and open_ended)


# -- the scheduler's requests ---------------------------------------------------------------------------

TASKS = ["sha256:" + "ab" * 32, "sha256:" + "cd" * 32]
ID = st.one_of(st.sampled_from(["p1", "p2", "p3"]), st.text(max_size=300))
TASK_ID = st.one_of(st.sampled_from(TASKS), st.text(max_size=80), st.just("sha256:" + "AB" * 32))
U64 = st.one_of(st.integers(0, (1 << 64) - 1), st.sampled_from([0, 1, 1 << 20, 5 << 20, 1 << 40, (1 << 40) + 1]))
U32 = st.one_of(st.integers(0, (1 << 32) - 1), st.sampled_from([0, 1, 1 << 18, 1 << 19, 1 << 24, 300_000]))
INDEXES = st.lists(st.one_of(st.integers(0, 40), st.integers(0, (1 << 32) - 1)), max_size=60)
DIGEST = st.one_of(st.just(""), st.just("sha256:" + "0" * 64), st.text(max_size=80))

ANNOUNCE = st.builds(pb.AnnouncePiecesRequest, peer_id=ID, task_id=TASK_ID, finished=INDEXES, in_flight=INDEXES,
                     content_length=U64, piece_size=U32, piece_digests=st.lists(DIGEST, max_size=30),
                     done=st.booleans())
REGISTER_TASK = st.builds(pb.RegisterTaskRequest, peer_id=ID, task_id=TASK_ID, content_length=U64, piece_size=U32)
GET_PARENTS = st.builds(pb.GetParentsRequest, peer_id=ID, task_id=TASK_ID, exclude=st.lists(ID, max_size=20),
                        limit=U32, known_digests=U32)
RESULTS = st.builds(pb.ReportPieceResultsRequest, peer_id=ID, task_id=TASK_ID, results=st.lists(st.builds(
    pb.PieceResult, parent_id=ID, piece=U32, success=st.booleans(), cost_us=U64, size=U64,
    error=st.sampled_from(["", "corrupt", "timeout", "x" * 2000])), max_size=20))
TASK_RESULT = st.builds(pb.ReportTaskResultRequest, peer_id=ID, task_id=TASK_ID, success=st.booleans(),
                        error=st.sampled_from(["", "digest_mismatch: x", "e" * 5000]))
REGISTER_PEER = st.builds(pb.RegisterPeerRequest, host=st.builds(
    pb.PeerHost, peer_id=ID, host_id=ID, ip=st.sampled_from(["127.0.0.1", "::1", "", "999.0.0.1", "x"]),
    upload_port=U32, labels=st.dictionaries(st.text(max_size=70), st.text(max_size=300), max_size=40)))
LEAVE = st.builds(pb.LeaveTaskRequest, peer_id=ID, task_id=TASK_ID)

CALLS = st.one_of(*(st.tuples(st.just(name), strategy) for name, strategy in [
    ("AnnouncePieces", ANNOUNCE), ("RegisterTask", REGISTER_TASK), ("GetParents", GET_PARENTS),
    ("ReportPieceResults", RESULTS), ("ReportTaskResult", TASK_RESULT), ("RegisterPeer", REGISTER_PEER),
    ("LeaveTask", LEAVE)]))
CLEAN = (validate.BadRequest, Exhausted, UnknownPeer, UnknownTask)


def fresh_service() -> SchedulerService:
    svc = SchedulerService(SchedulerConfig(random_seed=0), clock=lambda: 1000.0)
    for pid in ("p1", "p2", "p3"):
        svc.RegisterPeer.__wrapped__(svc, pb.RegisterPeerRequest(host=pb.PeerHost(
            peer_id=pid, host_id=f"h-{pid}", ip="127.0.0.1", upload_port=1)))
    return svc


def check_invariants(svc: SchedulerService) -> None:
    state = svc.state
    marks = sum(tp.marks for task in state.tasks.values() for tp in task.peers.values())
    assert marks == state.marks
    for pid, peer in state.peers.items():
        assert peer.marks == sum(state.tasks[t].peers[pid].marks for t in peer.tasks if t in state.tasks
                                 and pid in state.tasks[t].peers)
    assert state.digests == sum(len(t.piece_digests) for t in state.tasks.values())
    for task in state.tasks.values():
        assert task.total_pieces <= validate.MAX_PIECES
        assert not task.piece_digests or len(task.piece_digests) == task.total_pieces
        if task.content_length:
            validate.layout(task.content_length, task.piece_size)   # only valid layouts are kept
        for tp in task.peers.values():
            assert all(i < (task.total_pieces or validate.MAX_PIECES) for i in tp.finished | tp.in_flight)


@given(st.lists(CALLS, min_size=1, max_size=25))
def test_scheduler_answers_any_request_sequence_cleanly_and_stays_consistent(calls):
    svc = fresh_service()
    for name, request in calls:
        try:
            getattr(SchedulerService, name).__wrapped__(svc, request)
        except CLEAN:
            pass
        check_invariants(svc)


@given(U64, U32)
def test_layout_rule(content_length, piece_size):
    try:
        length, size = validate.layout(content_length, piece_size)
    except validate.BadRequest:
        return
    assert length <= validate.MAX_CONTENT_LENGTH
    if length:
        assert validate.n_pieces(length, size) <= validate.MAX_PIECES
        assert size & (size - 1) == 0
