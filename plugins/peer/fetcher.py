"""Fetch one piece from one parent peer, verified against its piece digest, and judge the parent.

Each piece comes over HTTP (HTTPS with the member certificate when the mesh is mutual TLS) from a
parent's upload endpoint (upload.py), showing the authorization of the client the blob is fetched for
(access.py), and is checked against the piece digest published by the peer that hashed it from the
registry before it reaches the disk. A parent that fails (refuses, dies mid-piece, sends a wrong size or
wrong bytes, crawls below ``min_piece_rate`` per upload it serves) is reported to the scheduler and
blocklisted for the task; after ``max_parent_failures`` failed parents the task goes back to the
registry. A parent that is only busy (503, no free upload slot) or a seed that relayed the piece to
another child already is not a failure: the picker (picker.py) leaves it alone for a moment.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp

from remora._proto import remora_scheduler_pb2 as pb

from .access import Grant
from .config import RELAYED_HEADER, UPLOADS_HEADER
from .picker import PiecePicker
from .pieces import BlobEntry
from .session import SchedulerSession

log = logging.getLogger(__name__)


class ParentFailure(Exception):
    """A piece could not be had from a parent; ``reason`` is what the scheduler is told."""

    def __init__(self, reason: str, detail: str, blocklist: bool = True):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.blocklist = blocklist


def url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


#: ``store(index, data, digest, t0)``: write and record a piece whose bytes hashed to ``digest``, the
#: expected one (checked here before): the piece's bytes are hashed as they arrive, so that no second pass
#: over them and no extra worker-thread trip is needed before the write.
Store = Callable[[int, memoryview, str, float], Awaitable[object]]
#: Error answers (503 busy/relayed, 403, 404) up to this size are read to their end, so that the
#: connection to the parent goes back to the pool instead of being closed (one TLS handshake less each).
SMALL_BODY = 4096


class BufferPool:
    """Piece-sized buffers reused across the fetches of a task: a fresh 0.5-16 MiB buffer per piece cost
    an allocation, page faults and a join of the response chunks (12 s of wall time over 8 peers).
    At most ``keep`` buffers are kept; a buffer is given back only once nobody (a write running in a worker
    thread) looks at it any more."""

    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[bytearray] = []

    def take(self, size: int) -> bytearray:
        while self._free:
            buf = self._free.pop()
            if len(buf) >= size:
                return buf
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        if len(self._free) < self.keep:
            self._free.append(buf)


class PieceFetcher:
    """The parent side of one task. ``manager`` gives ``cfg``, ``metrics`` and the HTTP client for parents
    (``peer_session``, ``peer_ssl``: set when the daemon starts, so read at each fetch); ``grant`` returns
    the authorization to show; ``in_flight`` is the task's set of pieces on their way to us."""

    def __init__(self, manager, digest: str, entry: BlobEntry, *, picker: PiecePicker, session: SchedulerSession,
                 in_flight: set[int], store: Store, grant: Callable[[], Grant | None],
                 go_to_source: Callable[[str], None]):
        self.m = manager
        self.cfg = manager.cfg
        self.digest = digest
        self.entry = entry
        self.picker = picker
        self.session = session
        self.blocklist: dict[str, str] = {}          # parent peer id -> reason
        self.failures = 0                            # failed parents (each counted once)
        self._in_flight = in_flight
        self._store = store
        self._grant = grant
        self._go_to_source = go_to_source
        self._reading: dict[tuple[int, str], tuple] = {}  # (piece, parent id) -> (body stream, since, sharing)
        self.buffers = BufferPool(keep=manager.cfg.concurrency + 2)

    async def fetch(self, index: int, parent: pb.Parent) -> None:
        """Fetch piece ``index`` from ``parent``, store it if it verifies, report the outcome. A failure of
        the parent is handled here (never raised); what escapes (a full disk) fails the task."""
        host = parent.host
        start, end = self.entry.piece_span(index)
        size = end - start
        expected = self.entry.piece_digests[index] if index < len(self.entry.piece_digests) else ""
        if not expected:
            # Nothing to check a peer's bytes against (the picker only names pieces with a digest; the
            # layout was reset meanwhile): ask nobody rather than store unverified bytes.
            log.debug("%s: piece %d has no digest (any more): not fetched", self.digest[:19], index)
            return
        scheme = "https" if self.m.peer_ssl is not None else "http"   # mutual TLS in the mesh (daemon.py)
        url = f"{scheme}://{url_host(host.ip)}:{host.upload_port}/pieces/{self.digest}/{index}"
        mine = self.picker.started(index, host.peer_id)
        t0 = time.monotonic()
        self._in_flight.add(index)
        buf: bytearray | None = self.buffers.take(size)
        try:
            actual, sharing = await self._get(url, memoryview(buf)[:size], mine, (index, host.peer_id))
            if actual != expected:
                raise ParentFailure("corrupt", f"piece digest {actual[:19]}, expected {expected[:19]}")
            if index in self.entry.have:  # the endgame's other copy landed first
                return
            # Only bytes that matched the piece digest reach the store; if this fetch is cancelled while
            # the write runs in its worker thread, the buffer stays with that thread (not reused).
            data, buf = memoryview(buf)[:size], None
            await self._store(index, data, actual, t0)
            buf = data.obj
            log.debug("%s: piece %d from %s in %.3fs (its uploads: %d)", self.digest[:19], index, host.ip,
                      time.monotonic() - t0, sharing)
            # The cost the scheduler learns is per unit of the parent's uplink: a piece that took 2 s
            # while the parent served 8 uploads says the parent moves a piece every 0.25 s. Raw times
            # swing with the load of a swarm and made the scheduler's slow-peer rule hide busy parents.
            self.session.report(pb.PieceResult(parent_id=host.peer_id, piece=index, success=True,
                                               cost_us=int((time.monotonic() - t0) / sharing * 1e6), size=size))
        except ParentFailure as exc:
            if exc.reason == "busy":
                # A parent with no free upload slot is healthy, just loaded: no failure, nothing reported
                # to the scheduler (which would count it against the parent); left alone for a moment.
                self.m.metrics.piece_failures.labels("busy").inc()
                self.picker.busy(host.peer_id, time.monotonic())
                return
            if exc.reason == "relayed":
                # The seed already sent this fresh piece to another child: get it from that child.
                self.m.metrics.piece_failures.labels("relayed").inc()
                self.picker.relayed(host.peer_id, index, time.monotonic())
                return
            self.failed(host, index, exc, t0)
        finally:
            if buf is not None:
                self.buffers.give(buf)
            self._reading.pop((index, host.peer_id), None)
            if self.picker.ended(index, host.peer_id):
                self._in_flight.discard(index)

    def transfers(self) -> list[tuple[int, str]]:
        """(piece, parent id) of every piece body being read from a parent now, sorted: what this
        child adds to its parents' load (a parent that answered "busy" carries none)."""
        return sorted(self._reading)

    def failed(self, host: pb.PeerHost, index: int, exc: ParentFailure, t0: float) -> None:
        """Count a failed piece against its parent: reported, blocklisted if the failure says so, and back
        to the registry after too many failed parents."""
        # One bad parent counts once however many of its pieces were in flight when it failed.
        if not (exc.blocklist and host.peer_id in self.blocklist):
            self.failures += 1
        self.m.metrics.piece_failures.labels(exc.reason).inc()
        self.session.report(pb.PieceResult(parent_id=host.peer_id, piece=index, success=False,
                                           cost_us=int((time.monotonic() - t0) * 1e6), error=exc.reason))
        if exc.blocklist and host.peer_id not in self.blocklist:
            log.warning("%s: blocklisting parent %s (%s:%d) for piece %d: %s", self.digest[:19], host.peer_id,
                        host.ip, host.upload_port, index, exc)
            self.blocklist[host.peer_id] = exc.reason
            self.m.metrics.blocklisted.labels(exc.reason).inc()
        if self.failures >= self.cfg.max_parent_failures:
            self._go_to_source("parent_failures")

    def overtaken(self, index: int, parent: pb.Parent | None, t0: float) -> None:
        """The endgame's other copy of ``index`` landed while the fetch from ``parent`` still ran: that
        fetch is about to be cancelled. A parent slower than ``min_piece_rate`` even if its uplink were
        shared by as many uploads as it admits (its upload slots) is a crawling one and blocklisted as if
        its deadline had passed: the endgame must not hide it. A busy one is not blamed: the uploads it
        reported when the piece started say little about how many joined since (a seed that has just
        finished serves every child at once)."""
        if parent is None:
            return
        reading = self._reading.get((index, parent.host.peer_id))
        if reading is None:
            return
        stream, body_t0, sharing = reading
        elapsed = time.monotonic() - body_t0
        shared_by = max(sharing, parent.host.upload_slots, 1)
        if elapsed > 0.25 and stream.total_bytes < self.cfg.min_piece_rate * elapsed / shared_by:
            self.failed(parent.host, index, ParentFailure(
                "timeout", f"{stream.total_bytes} bytes in {elapsed:.1f}s (overtaken in the endgame)"), t0)

    async def _get(self, url: str, into: memoryview, mine: int, key: tuple[int, str]) -> tuple[str, int]:
        """One piece from a parent, read into ``into`` (exactly the piece's size) and hashed on the way,
        within a deadline that accounts for the parent's load. Returns the digest the bytes hashed to and
        the number of uploads the parent shared its uplink with.

        The answer must start within ``piece_timeout``. The parent says how many uploads it is serving
        (``X-Remora-Uploads``); its uplink is shared among them, so the body gets ``size * uploads /
        min_piece_rate`` (at least ``piece_timeout``): a busy, healthy parent is not mistaken for a
        crawling one, while a parent slower than ``min_piece_rate`` per upload still is.
        """
        cfg = self.cfg
        size = len(into)
        h = hashlib.sha256()
        got = 0
        try:
            async with asyncio.timeout(cfg.piece_timeout) as budget:
                grant = self._grant()
                proof = grant.headers() if grant else {}
                async with self.m.peer_session.get(url, headers=proof) as resp:
                    if resp.status != 200 and (resp.content_length or 0) <= SMALL_BODY:
                        await resp.read()   # keep the connection (see SMALL_BODY)
                    if resp.status == 403:
                        raise ParentFailure("denied", "the parent does not accept this blob's authorization")
                    if resp.status == 503:
                        if resp.headers.get(RELAYED_HEADER):
                            raise ParentFailure("relayed", "the seed sent this piece to another child",
                                                blocklist=False)
                        raise ParentFailure("busy", "parent has no free upload slot", blocklist=False)
                    if resp.status != 200:
                        raise ParentFailure("http", f"parent answered {resp.status}")
                    if resp.content_length is None:
                        raise ParentFailure("http", "parent sent a piece without Content-Length")
                    if resp.content_length != size:  # no need to read a lie
                        raise ParentFailure("corrupt", f"piece has {resp.content_length} bytes, expected {size}")
                    try:
                        sharing = max(1, mine, int(resp.headers.get(UPLOADS_HEADER, "1")))
                    except ValueError:
                        sharing = max(1, mine)
                    seconds = max(cfg.piece_timeout, size * sharing / max(cfg.min_piece_rate, 1))
                    budget.reschedule(asyncio.get_running_loop().time() + seconds)
                    self._reading[key] = (resp.content, time.monotonic(), sharing)  # see overtaken()
                    # Straight into the piece buffer, hashed chunk by chunk (sha256 of a chunk lets go of
                    # the GIL; with SHA extensions it is ~0.3 ms per 512 KiB): no join, no second pass.
                    async for chunk in resp.content.iter_any():
                        n = len(chunk)
                        if got + n > size:
                            raise ParentFailure("corrupt", f"piece has more than {size} bytes")
                        into[got:got + n] = chunk
                        h.update(chunk)
                        got += n
        except TimeoutError:
            raise ParentFailure("timeout", "no complete piece within its deadline (crawling parent)") from None
        except (aiohttp.ClientError, ConnectionError, OSError) as exc:
            raise ParentFailure("connection", f"{type(exc).__name__}: {exc}") from exc
        if got != size:
            raise ParentFailure("connection", f"piece has {got} bytes, expected {size}")
        return "sha256:" + h.hexdigest(), sharing
