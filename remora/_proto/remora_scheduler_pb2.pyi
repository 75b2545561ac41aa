from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerHost(_message.Message):
    __slots__ = ("peer_id", "host_id", "ip", "upload_port", "labels", "upload_slots", "upload_bandwidth")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_PORT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_SLOTS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    host_id: str
    ip: str
    upload_port: int
    labels: _containers.ScalarMap[str, str]
    upload_slots: int
    upload_bandwidth: int
    def __init__(self, peer_id: _Optional[str] = ..., host_id: _Optional[str] = ..., ip: _Optional[str] = ..., upload_port: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., upload_slots: _Optional[int] = ..., upload_bandwidth: _Optional[int] = ...) -> None: ...

class RegisterPeerRequest(_message.Message):
    __slots__ = ("host",)
    HOST_FIELD_NUMBER: _ClassVar[int]
    host: PeerHost
    def __init__(self, host: _Optional[_Union[PeerHost, _Mapping]] = ...) -> None: ...

class RegisterPeerResponse(_message.Message):
    __slots__ = ("probe_interval_ms", "keepalive_interval_ms", "peer_ttl_ms", "known")
    PROBE_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    PEER_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    probe_interval_ms: int
    keepalive_interval_ms: int
    peer_ttl_ms: int
    known: bool
    def __init__(self, probe_interval_ms: _Optional[int] = ..., keepalive_interval_ms: _Optional[int] = ..., peer_ttl_ms: _Optional[int] = ..., known: _Optional[bool] = ...) -> None: ...

class LeavePeerRequest(_message.Message):
    __slots__ = ("peer_id",)
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    def __init__(self, peer_id: _Optional[str] = ...) -> None: ...

class RegisterTaskRequest(_message.Message):
    __slots__ = ("peer_id", "task_id", "content_length", "piece_size", "seeding", "background")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PIECE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEEDING_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    task_id: str
    content_length: int
    piece_size: int
    seeding: int
    background: bool
    def __init__(self, peer_id: _Optional[str] = ..., task_id: _Optional[str] = ..., content_length: _Optional[int] = ..., piece_size: _Optional[int] = ..., seeding: _Optional[int] = ..., background: _Optional[bool] = ...) -> None: ...

class RegisterTaskResponse(_message.Message):
    __slots__ = ("back_to_source", "parents", "content_length", "piece_size", "piece_digests", "retry_after_ms", "reason", "held")
    BACK_TO_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PIECE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PIECE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    back_to_source: bool
    parents: _containers.RepeatedCompositeFieldContainer[Parent]
    content_length: int
    piece_size: int
    piece_digests: _containers.RepeatedScalarFieldContainer[str]
    retry_after_ms: int
    reason: str
    held: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, back_to_source: _Optional[bool] = ..., parents: _Optional[_Iterable[_Union[Parent, _Mapping]]] = ..., content_length: _Optional[int] = ..., piece_size: _Optional[int] = ..., piece_digests: _Optional[_Iterable[str]] = ..., retry_after_ms: _Optional[int] = ..., reason: _Optional[str] = ..., held: _Optional[_Iterable[int]] = ...) -> None: ...

class Parent(_message.Message):
    __slots__ = ("host", "pieces", "in_flight", "score", "source")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    host: PeerHost
    pieces: _containers.RepeatedScalarFieldContainer[int]
    in_flight: _containers.RepeatedScalarFieldContainer[int]
    score: float
    source: bool
    def __init__(self, host: _Optional[_Union[PeerHost, _Mapping]] = ..., pieces: _Optional[_Iterable[int]] = ..., in_flight: _Optional[_Iterable[int]] = ..., score: _Optional[float] = ..., source: _Optional[bool] = ...) -> None: ...

class AnnouncePiecesRequest(_message.Message):
    __slots__ = ("peer_id", "task_id", "finished", "in_flight", "content_length", "piece_size", "piece_digests", "done", "seq", "transfers", "transfers_known")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PIECE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PIECE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_KNOWN_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    task_id: str
    finished: _containers.RepeatedScalarFieldContainer[int]
    in_flight: _containers.RepeatedScalarFieldContainer[int]
    content_length: int
    piece_size: int
    piece_digests: _containers.RepeatedScalarFieldContainer[str]
    done: bool
    seq: int
    transfers: _containers.RepeatedCompositeFieldContainer[Transfer]
    transfers_known: bool
    def __init__(self, peer_id: _Optional[str] = ..., task_id: _Optional[str] = ..., finished: _Optional[_Iterable[int]] = ..., in_flight: _Optional[_Iterable[int]] = ..., content_length: _Optional[int] = ..., piece_size: _Optional[int] = ..., piece_digests: _Optional[_Iterable[str]] = ..., done: _Optional[bool] = ..., seq: _Optional[int] = ..., transfers: _Optional[_Iterable[_Union[Transfer, _Mapping]]] = ..., transfers_known: _Optional[bool] = ...) -> None: ...

class Transfer(_message.Message):
    __slots__ = ("parent_id", "piece")
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    parent_id: str
    piece: int
    def __init__(self, parent_id: _Optional[str] = ..., piece: _Optional[int] = ...) -> None: ...

class GetParentsRequest(_message.Message):
    __slots__ = ("peer_id", "task_id", "exclude", "limit", "known_digests", "seeding", "background")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    KNOWN_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    SEEDING_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    task_id: str
    exclude: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    known_digests: int
    seeding: int
    background: bool
    def __init__(self, peer_id: _Optional[str] = ..., task_id: _Optional[str] = ..., exclude: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ..., known_digests: _Optional[int] = ..., seeding: _Optional[int] = ..., background: _Optional[bool] = ...) -> None: ...

class GetParentsResponse(_message.Message):
    __slots__ = ("parents", "back_to_source", "retry_after_ms", "reason", "content_length", "piece_size", "piece_digests", "held")
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    BACK_TO_SOURCE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PIECE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PIECE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    parents: _containers.RepeatedCompositeFieldContainer[Parent]
    back_to_source: bool
    retry_after_ms: int
    reason: str
    content_length: int
    piece_size: int
    piece_digests: _containers.RepeatedScalarFieldContainer[str]
    held: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, parents: _Optional[_Iterable[_Union[Parent, _Mapping]]] = ..., back_to_source: _Optional[bool] = ..., retry_after_ms: _Optional[int] = ..., reason: _Optional[str] = ..., content_length: _Optional[int] = ..., piece_size: _Optional[int] = ..., piece_digests: _Optional[_Iterable[str]] = ..., held: _Optional[_Iterable[int]] = ...) -> None: ...

class PieceResult(_message.Message):
    __slots__ = ("parent_id", "piece", "success", "cost_us", "size", "error")
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    COST_US_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    parent_id: str
    piece: int
    success: bool
    cost_us: int
    size: int
    error: str
    def __init__(self, parent_id: _Optional[str] = ..., piece: _Optional[int] = ..., success: _Optional[bool] = ..., cost_us: _Optional[int] = ..., size: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ReportPieceResultsRequest(_message.Message):
    __slots__ = ("peer_id", "task_id", "results")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    task_id: str
    results: _containers.RepeatedCompositeFieldContainer[PieceResult]
    def __init__(self, peer_id: _Optional[str] = ..., task_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[PieceResult, _Mapping]]] = ...) -> None: ...

class ReportTaskResultRequest(_message.Message):
    __slots__ = ("peer_id", "task_id", "success", "back_to_source", "error", "seq")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    BACK_TO_SOURCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    task_id: str
    success: bool
    back_to_source: bool
    error: str
    seq: int
    def __init__(self, peer_id: _Optional[str] = ..., task_id: _Optional[str] = ..., success: _Optional[bool] = ..., back_to_source: _Optional[bool] = ..., error: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class LeaveTaskRequest(_message.Message):
    __slots__ = ("peer_id", "task_id")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    task_id: str
    def __init__(self, peer_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class StatTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class StatTaskResponse(_message.Message):
    __slots__ = ("task_id", "content_length", "piece_size", "peers", "seed_peer", "state")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PIECE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    SEED_PEER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    content_length: int
    piece_size: int
    peers: _containers.RepeatedScalarFieldContainer[str]
    seed_peer: str
    state: str
    def __init__(self, task_id: _Optional[str] = ..., content_length: _Optional[int] = ..., piece_size: _Optional[int] = ..., peers: _Optional[_Iterable[str]] = ..., seed_peer: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class ProbeResult(_message.Message):
    __slots__ = ("peer_id", "rtt_us", "success")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RTT_US_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    rtt_us: int
    success: bool
    def __init__(self, peer_id: _Optional[str] = ..., rtt_us: _Optional[int] = ..., success: _Optional[bool] = ...) -> None: ...

class SyncProbesRequest(_message.Message):
    __slots__ = ("peer_id", "results")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    results: _containers.RepeatedCompositeFieldContainer[ProbeResult]
    def __init__(self, peer_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ProbeResult, _Mapping]]] = ...) -> None: ...

class SyncProbesResponse(_message.Message):
    __slots__ = ("targets", "probe_interval_ms")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    PROBE_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[PeerHost]
    probe_interval_ms: int
    def __init__(self, targets: _Optional[_Iterable[_Union[PeerHost, _Mapping]]] = ..., probe_interval_ms: _Optional[int] = ...) -> None: ...
