"""The upload API: other peers fetch our pieces here (``GET /pieces/<blob digest>/<index>``).

Only pieces already on disk are served, and they are on disk only once verified (or hashed from the
registry by the seed), so nothing half-written ever leaves this node. No registry credential or header
is involved: a piece is content addressed by the blob digest and its index. Concurrent uploads are
capped (``upload_slots``); a peer over the cap gets a fast 503 and asks another parent.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from remora.errors import InvalidInput, StorageError

from .metrics import PeerMetrics
from .mirror import healthz
from .pieces import PieceStore, check_digest

log = logging.getLogger(__name__)


class UploadServer:
    def __init__(self, store: PieceStore, metrics: PeerMetrics, slots: int):
        self.store = store
        self.metrics = metrics
        self.slots = max(1, slots)
        self.active = 0

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
        if entry is None or index not in entry.have:
            self.metrics.upload_pieces.labels("missing").inc()
            return web.Response(status=404, text="piece not here\n")
        if self.active >= self.slots:
            self.metrics.upload_pieces.labels("busy").inc()
            return web.Response(status=503, text="no free upload slot\n", headers={"Retry-After": "1"})
        self.active += 1
        entry.users += 1
        try:
            try:
                data = await asyncio.to_thread(entry.read_piece, index)
            except StorageError as exc:  # evicted or damaged under us: this peer does not have it
                log.warning("%s", exc)
                self.metrics.upload_pieces.labels("missing").inc()
                return web.Response(status=404, text="piece not here\n")
            resp = web.Response(body=data, content_type="application/octet-stream",
                                headers={"X-Remora-Piece-Size": str(entry.piece_size)})
            await resp.prepare(request)
            await resp.write_eof()
            self.metrics.upload_bytes.inc(len(data))
            self.metrics.upload_pieces.labels("ok").inc()
            entry.touch()
            return resp
        except (ConnectionError, asyncio.CancelledError):
            self.metrics.upload_pieces.labels("aborted").inc()
            raise
        finally:
            self.active -= 1
            entry.users -= 1
