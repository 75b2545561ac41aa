"""The keepalive route served below the web framework: the manager's hottest request, made cheap.

Every member keeps alive every interval, so a manager of 10,000 peers answers ~1,000 keepalives a
second. Through FastAPI each one pays for routing, dependency injection, the request object,
pydantic's model wrapping and the middleware stack — about 2 ms of CPU, most of a core at 500/s.
:class:`KeepaliveFastPath` is a pure ASGI middleware, outermost, that answers the common case
itself: a known join token (in the replica's join-token cache), the caller's certificate owning the
member (over mutual TLS), a valid body, a member this replica knows. It validates the body with the
same pydantic model (``model_validate_json``, pydantic-core in Rust) and buffers it like the route.

Anything else — an unknown or expired token, a member this replica has not seen, a body that does not
validate, a certificate that does not own the member, a body over ``MAX_BODY`` — falls through,
with the body replayed, to the FastAPI route, which is the single place errors (401/403/404/422) and
cache misses are handled. The fast path therefore never answers anything the route would not.
"""
from __future__ import annotations

import re
from collections.abc import Callable

PATH = re.compile(r"^/api/v1/agent/([1-9][0-9]{0,9})/keepalive$")
MAX_BODY = 64 << 10   # a keepalive is < 2 KiB; anything larger goes the long way (and meets BodyLimit)
HEADERS = [(b"content-type", b"application/json"), (b"x-content-type-options", b"nosniff")]


class KeepaliveFastPath:
    """ASGI middleware; ``answer(scope, member_id, body)`` returns the response body or None (fall through)."""

    def __init__(self, app, answer: Callable[[dict, int, bytes], bytes | None]):
        self.app, self.answer = app, answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/keepalive"):
            return await self.app(scope, receive, send)
        match = PATH.match(scope["path"])
        length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value) if value.isdigit() else None
        if match is None or length is None or length > MAX_BODY:
            return await self.app(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":   # client went away: let the app see the disconnect
                return await self.app(scope, _replay(b"".join(chunks), receive, message), send)
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > MAX_BODY or not message.get("more_body", False):
                break
        body = b"".join(chunks)
        out = self.answer(scope, int(match[1]), body) if seen <= MAX_BODY else None
        if out is None:
            return await self.app(scope, _replay(body, receive), send)
        await send({"type": "http.response.start", "status": 200,
                    "headers": HEADERS + [(b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})


def _replay(body: bytes, receive, first: dict | None = None):
    """A ``receive`` that hands the already-read body over once, then defers to the real one."""
    pending = [first] if first is not None else [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        if pending:
            return pending.pop()
        return await receive()
    return replayed


class SecurityHeaders:
    """Pure ASGI (no BaseHTTPMiddleware task and stream per request): nosniff everywhere, a CSP on
    the console."""

    CSP = (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        console = scope["path"].startswith("/console")

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ())
                           if not (console and k.lower() == b"content-security-policy")]
                if not any(k.lower() == b"x-content-type-options" for k, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))
                if console:
                    headers.append(self.CSP)
                message = {**message, "headers": headers}
            await send(message)
        return await self.app(scope, receive, with_headers)
