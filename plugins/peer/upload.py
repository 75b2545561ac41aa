"""The upload API: other peers fetch our pieces here (``GET /pieces/<blob digest>/<index>``).

Only pieces already on disk are served, and they are on disk only once verified (or hashed from the
registry by the seed), so nothing half-written ever leaves this node; each piece is hashed again against
its recorded digest right before it is sent, and one that no longer matches (a damaged disk, an edited
file) is dropped (the download engine fetches it again) and answered 404, never sent. Concurrent uploads
are capped (``upload_slots``); a peer over the cap gets a fast 503 and asks another parent.

**A piece goes only to a peer that proves its client may read the blob.** Knowing a digest is not
enough: the child names the repository its client asked for (``X-Remora-Source: <registry>/<repo>``)
and forwards that client's authorization (``Authorization``, absent for a public repository); the
daemon's ``authorize`` (:meth:`.download.TaskManager.authorize_piece`) asks the registry, with a short
cache, whether that authorization reads the blob in that repository. No proof: 403 (before anything
about the piece is revealed beyond whether the blob is held at all). Unset, ``authorize`` refuses everything.

**Each fresh piece leaves the seed once.** While this peer streams a blob from the registry, its uplink is
the bottleneck of the whole mesh: every child wants each new piece the moment it lands, and sending it
to all of them would split the uplink N ways and make everybody trail the seed. So a piece this peer got
from the registry, while its download is not finished, is sent to ONE child; a second request for it,
while that upload runs or within :data:`FRESH_GRACE` after it, gets a fast 503 with the
``X-Remora-Relayed`` header: "a sibling has it or will have it in a moment, ask them". If that upload
failed (the child died), the next request after the grace is served. Once the blob is complete here, every
piece is served to anyone (the tail of a download is what the seed's free uplink helps with).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from remora.errors import InvalidInput, NotFound, RemoraError

from .access import AccessDenied
from .config import RELAYED_HEADER, UPLOADS_HEADER
from .metrics import PeerMetrics
from .mirror import healthz
from .pieces import TLS_CHUNK, CorruptPiece, PieceStore, check_digest, send_file

log = logging.getLogger(__name__)

#: After a fresh piece went to one child, other children are refused it this long (they get it from that
#: child: piece relay time plus a scheduler tick or two); then the seed serves it again.
FRESH_GRACE = 2.0


class UploadServer:
    def __init__(self, store: PieceStore, metrics: PeerMetrics, slots: int):
        self.store = store
        self.metrics = metrics
        self.slots = max(1, slots)
        self.active = 0
        #: (digest, index) -> whether this peer fetched that piece from the registry and is still
        #: downloading the blob (set by the daemon to TaskManager.fresh_from_source)
        self.fresh: Callable[[str, int], bool] = lambda digest, index: False
        #: called (digest, index) for a stored piece that failed re-verification (set by the daemon to
        #: TaskManager.drop_corrupt: forget it, tell the scheduler)
        self.on_corrupt: Callable[[str, int], None] = lambda digest, index: entry_drop(self.store, digest, index)
        self._fresh_uploads: dict[tuple[str, int], list] = {}   # -> [uploads running, end of the last]
        #: async (digest, request headers) -> grant; raises when the requester cannot prove access (set by
        #: the daemon to TaskManager.authorize_piece). The default refuses: fail closed.
        self.authorize: Callable[[str, object], Awaitable[object]] = _refuse

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/pieces/{digest}/{index:[0-9]+}", self.get_piece)
        app.router.add_get("/healthz", healthz)
        return app

    async def get_piece(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        index = int(request.match_info["index"])
        try:
            check_digest(digest)
        except InvalidInput as exc:
            return web.Response(status=400, text=f"{exc}\n")
        entry = self.store.get(digest)
        if entry is None:
            self.metrics.upload_pieces.labels("missing").inc()
            return web.Response(status=404, text="piece not here\n")
        try:
            await self.authorize(digest, request.headers)
        except NotFound:   # the registry has no such blob in the repository named: no proof of anything
            self.metrics.upload_pieces.labels("denied").inc()
            return web.Response(status=403, text="blob not in the repository named\n")
        except RemoraError as exc:   # refused, or the registry could not be asked: fail closed
            self.metrics.upload_pieces.labels("denied").inc()
            log.info("%s: piece %d refused to %s: %s", digest[:19], index, request.remote, exc)
            return web.Response(status=403, text="no proof of access to this blob\n")
        if index not in entry.have:
            self.metrics.upload_pieces.labels("missing").inc()
            return web.Response(status=404, text="piece not here\n")
        fresh = self._fresh_state(digest, index)
        if fresh is not None and (fresh[0] or time.monotonic() - fresh[1] < FRESH_GRACE):
            self.metrics.upload_pieces.labels("relayed").inc()
            return web.Response(status=503, text="fresh piece already sent to another peer: ask it\n",
                                headers={RELAYED_HEADER: "1", "Retry-After": "1"})
        if self.active >= self.slots:
            self.metrics.upload_pieces.labels("busy").inc()
            return web.Response(status=503, text="no free upload slot\n", headers={"Retry-After": "1"})
        if fresh is not None:
            fresh[0] += 1
            self.metrics.upload_pieces.labels("fresh").inc()
        self.active += 1
        entry.users += 1
        resp = web.Response(status=499)   # what aiohttp gets back if the child hangs up before the headers
        try:
            start, end = entry.piece_span(index)
            tls = request.transport is not None and request.transport.get_extra_info("ssl_object") is not None
            data = fobj = None
            try:
                if tls and end - start <= TLS_CHUNK:
                    # TLS cannot use sendfile: the piece is read once, checked, and exactly those bytes are
                    # encrypted and sent (one worker-thread trip instead of three, one read instead of two).
                    data = await asyncio.to_thread(entry.read_verified, index)
                else:
                    await asyncio.to_thread(entry.verify_piece, index)
            except CorruptPiece as exc:
                log.error("%s; not serving it (dropped, to be fetched again)", exc)
                self.metrics.upload_pieces.labels("corrupt").inc()
                if index in entry.have:
                    self.on_corrupt(digest, index)
                return web.Response(status=404, text="piece not here\n")
            if data is None:
                try:
                    fobj = await asyncio.to_thread(open, entry.piece_path(index), "rb")
                except OSError as exc:  # evicted or damaged under us: this peer does not have it
                    log.warning("%s: cannot read piece %d: %s", digest, index, exc.strerror or exc)
                    self.metrics.upload_pieces.labels("missing").inc()
                    return web.Response(status=404, text="piece not here\n")
            try:
                resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                                   "Content-Length": str(end - start),
                                                   "X-Remora-Piece-Size": str(entry.piece_size),
                                                   UPLOADS_HEADER: str(self.active)})
                await resp.prepare(request)
                if data is not None:
                    await resp.write(data)
                else:
                    # sendfile: the kernel copies the piece from the page cache to the socket (8 peers on a
                    # small machine are CPU bound long before their links are full when Python copies it)
                    await send_file(request, fobj, 0, end - start)
                await resp.write_eof()
            finally:
                if fobj is not None:
                    fobj.close()
            self.metrics.upload_bytes.inc(end - start)
            self.metrics.upload_pieces.labels("ok").inc()
            entry.touch()
            return resp
        except asyncio.CancelledError:
            self.metrics.upload_pieces.labels("aborted").inc()
            raise
        except ConnectionError as exc:
            # The child hung up: it got the piece elsewhere first (the endgame), or gave up on us. Normal;
            # re-raised, aiohttp would log it as an ERROR with a traceback ("Error handling request").
            self.metrics.upload_pieces.labels("aborted").inc()
            log.debug("%s: piece %d: the child hung up (%s)", digest, index, exc)
            if request.transport is not None:
                request.transport.close()
            return resp
        finally:
            self.active -= 1
            entry.users -= 1
            if fresh is not None:
                fresh[0] -= 1
                fresh[1] = time.monotonic()

    def _fresh_state(self, digest: str, index: int) -> list | None:
        """The upload record of a fresh piece (None when the piece is not fresh here any more)."""
        key = (digest, index)
        if not self.fresh(digest, index):
            self._fresh_uploads.pop(key, None)
            return None
        if len(self._fresh_uploads) > 4096:  # blobs finished since: drop what no longer applies
            for k in [k for k, v in self._fresh_uploads.items() if not v[0] and not self.fresh(*k)]:
                del self._fresh_uploads[k]
        return self._fresh_uploads.setdefault(key, [0, float("-inf")])


def entry_drop(store: PieceStore, digest: str, index: int) -> None:
    entry = store.get(digest)
    if entry is not None:
        entry.drop_piece(index)


async def _refuse(digest: str, headers) -> None:
    raise AccessDenied("this upload server has no authorization check configured", status=403)
