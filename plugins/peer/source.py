"""Back-to-source: stream missing pieces of a blob from the registry, cut them into pieces as they come.

The seed (told so by the scheduler), a peer whose scheduler is down, a child the mesh failed, and any
peer reading a part of a blob nobody in the mesh holds get pieces this way, with this node's registry
credentials (upstream.py). Contiguous missing pieces are one ranged GET; every piece is hashed as it
lands and its digest becomes the one the scheduler hands to children, so children start on the first
pieces while the stream still runs. A stream that covers the whole blob yields the whole-blob digest
for free (no second pass to verify it).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from remora.errors import NotFound, RegistryError

from .pieces import BlobEntry

log = logging.getLogger(__name__)

#: Bytes of piece buffers a seed's registry stream may fill ahead of the pieces still being hashed and
#: written (at least two buffers, at most SEED_BUFFERS_MAX): 8 MiB is 0.7 s of a 100 Mbit/s link.
SEED_BUFFER_BYTES = 8 << 20
SEED_BUFFERS_MAX = 32
_CONTENT_RANGE = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20}|\*)")


@dataclass(frozen=True)
class Source:
    """Where the registry has the blob: the repository a client asked for it through."""

    registry: str
    repository: str

    def blob_path(self, digest: str) -> str:
        return f"/v2/{self.repository}/blobs/{digest}"

    @property
    def scope(self) -> str:
        return f"repository:{self.repository}:pull"


async def _next_free(free: asyncio.Queue, landed: asyncio.Future) -> memoryview:
    """The next free piece buffer; if the lander ends first (it failed), its exception is raised."""
    if not free.empty():
        return free.get_nowait()
    getter = asyncio.ensure_future(free.get())
    try:
        await asyncio.wait([getter, landed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    landed.result()   # raises the landing's failure
    raise RegistryError("piece landing stopped")


def runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Sorted piece indexes -> contiguous ``(first, last)`` runs."""
    out: list[tuple[int, int]] = []
    for i in indexes:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


#: ``store(index, data, t0, whole)``: hash the piece (feeding ``whole`` when not None), write and record it.
Store = Callable[[int, memoryview, float, "hashlib._Hash | None"], Awaitable[object]]


class SourceStream:
    """The registry side of one task. ``sources`` is the task's list (it grows as clients ask for the
    blob through other repositories; the latest is tried first); ``in_flight`` and ``from_source`` are
    the task's sets, kept up to date here; ``store`` lands a piece (download.py's hashing and writing)."""

    def __init__(self, upstream, digest: str, entry: BlobEntry, sources: list[Source], *, in_flight: set[int],
                 from_source: set[int], store: Store, announce: Callable[[], None]):
        self.upstream = upstream
        self.digest = digest
        self.entry = entry
        self.sources = sources
        self._in_flight = in_flight
        self._from_source = from_source
        self._store = store
        self._announce = announce

    async def fetch(self, missing: list[int]) -> str:
        """Stream the sorted ``missing`` pieces from the registry. Returns the whole-blob digest when the
        stream covered the whole blob from its first byte, else ``""``."""
        if not self.sources:
            raise NotFound(f"{self.digest}: not in the mesh and no repository known to fetch it from")
        whole = ""
        for first, last in runs(missing):
            whole = await self._stream_run(first, last) or whole
        self._announce()
        return whole

    async def _stream_run(self, first: int, last: int) -> str:
        """GET pieces ``first..last`` (inclusive) from the registry in one ranged request."""
        entry = self.entry
        start, end = entry.piece_span(first)[0], entry.piece_span(last)[1]
        headers = {}
        whole = start == 0 and end == entry.content_length
        if not whole:
            headers["Range"] = f"bytes={start}-{end - 1}"
        last_error: Exception | None = None
        for source in list(reversed(self.sources)):
            try:
                resp = await self.upstream.request("GET", source.registry, source.blob_path(self.digest),
                                                   headers, scope=source.scope)
            except NotFound as exc:
                last_error = exc
                continue
            try:
                skip = self._skip(resp, start, end, whole)
                return await self._cut_pieces(resp, first, last, skip)
            finally:
                resp.release()
        raise last_error or NotFound(f"{self.digest}: blob unknown to the registry")

    def _skip(self, resp: aiohttp.ClientResponse, start: int, end: int, whole: bool) -> int:
        """Bytes to drop from the body before byte ``start`` of the blob. A registry may ignore Range (200:
        the whole blob) or, like a CDN aligning ranges to its blocks, answer 206 with a larger range than
        asked; a 206 must say which (``Content-Range``) and cover ``[start, end)``, or the bytes cut into
        pieces would be other bytes of the blob, hashed into piece digests children then trust."""
        if resp.status != 206:
            return start if resp.status == 200 and not whole else 0   # 200 to a Range: the whole blob
        m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if not m or int(m[1]) > start or int(m[2]) < end - 1 or int(m[1]) > int(m[2]) \
                or (m[3] != "*" and int(m[3]) != self.entry.content_length):
            raise RegistryError(f"{self.digest}: registry answered bytes {start}-{end - 1} with Content-Range "
                                f"{resp.headers.get('Content-Range', '(none)')[:80]!r}")
        return start - int(m[1])

    async def _cut_pieces(self, resp: aiohttp.ClientResponse, first: int, last: int, skip: int) -> str:
        entry = self.entry
        index = first
        # Piece-sized buffers, filled straight from the stream and reused (no joins, slices or fresh memory
        # per piece), handed in order to one lander that hashes and writes them in a worker thread while
        # the stream goes on into the next free buffer. The reader waits only when every buffer is still
        # landing: a slow write on a disk other peers are writing to (or the batched flush of the pieces
        # behind it, download.SYNC_BATCH_BYTES) must not stop the registry's stream, on the link every
        # child waits on. Two buffers left the stream one slow write away from stalling.
        count = max(2, min(SEED_BUFFERS_MAX, -(-SEED_BUFFER_BYTES // entry.piece_size)))
        free: asyncio.Queue = asyncio.Queue()
        for _ in range(count):
            free.put_nowait(memoryview(bytearray(entry.piece_size)))
        landing: asyncio.Queue = asyncio.Queue()   # (index, filled view, t0), then None: the stream ended
        view = free.get_nowait()
        filled = 0
        want = entry.piece_span(index)[1] - entry.piece_span(index)[0]
        t0 = time.monotonic()
        run = set(range(first, last + 1))
        self._in_flight |= run  # the whole run is on its way: children line up behind it at once
        self._announce()
        # Streaming the blob from its first byte, the whole-blob digest comes for free: no second pass.
        whole = hashlib.sha256() if first == 0 and last == entry.n_pieces - 1 else None

        async def lander() -> None:
            while (item := await landing.get()) is not None:
                i, data, started = item
                await self._land(i, data, started, whole)   # in order: the whole-blob hash is fed piece by piece
                free.put_nowait(memoryview(data.obj))

        landed = asyncio.ensure_future(lander())
        try:
            async for chunk in resp.content.iter_any():
                chunk = memoryview(chunk)
                if skip:
                    drop = min(skip, len(chunk))
                    chunk, skip = chunk[drop:], skip - drop
                while chunk and index <= last:
                    n = min(len(chunk), want - filled)
                    view[filled:filled + n] = chunk[:n]
                    filled += n
                    chunk = chunk[n:]
                    if filled < want:
                        break
                    landing.put_nowait((index, view[:want], t0))
                    index += 1
                    filled = 0
                    if index <= last:
                        if landed.done():   # a landing failed (a full disk): stop reading, raise it below
                            break
                        view = await _next_free(free, landed)
                        want = entry.piece_span(index)[1] - entry.piece_span(index)[0]
                        t0 = time.monotonic()
                if index > last or landed.done():
                    break
            landing.put_nowait(None)
            await landed
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RegistryError(f"{self.digest}: registry stream broke at piece {index}: {exc or type(exc).__name__}") \
                from exc
        finally:
            if not landed.done():  # the stream failed (or we are cancelled) while pieces were landing
                landed.cancel()
            await asyncio.gather(landed, return_exceptions=True)
            self._in_flight -= run
        if index <= last:
            raise RegistryError(f"{self.digest}: registry sent a truncated blob (stopped in piece {index} of "
                                f"{entry.n_pieces})")
        return "sha256:" + whole.hexdigest() if whole is not None else ""

    async def _land(self, index: int, data, t0: float, whole) -> None:
        await self._store(index, data, t0, whole)
        log.debug("%s: piece %d from the registry in %.3fs", self.digest[:19], index, time.monotonic() - t0)
        self._from_source.add(index)
        self._in_flight.discard(index)
