"""The peer's per-repository access check answers registry challenges with the same registry-auth core
(and the same realm rule) as every other remora client: a client's credentials never go to a plain-HTTP
token server the registry names on another host, and a malformed challenge lets nobody in.

Network safety: the checker's HTTP session resolves every host name to 127.0.0.1, so even a regression
that dials the "foreign" realm only reaches the test's own server (where it is counted)."""
from __future__ import annotations

import asyncio
import base64
import socket

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver

from remora.plugins.peer.access import AccessChecker, AccessDenied

BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()
BLOB = "sha256:" + "a" * 64


class _AllLoopback(AbstractResolver):
    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self):
        pass


async def _check(realm_host: str | None, authorization: str | None, challenge: str | None = None):
    """One access check against a registry on 127.0.0.1 whose 401 names ``realm_host`` (on its own
    port) as token server; returns (outcome, Authorization headers the token server saw, requests made)."""
    hits: list = []
    holder: dict = {}

    async def head(request):
        return web.Response(status=401, headers={"WWW-Authenticate": holder["challenge"]})

    async def token(request):
        hits.append(request.headers.get("Authorization"))
        return web.json_response({"token": "t0ken", "expires_in": 300})

    app = web.Application()
    app.router.add_route("HEAD", "/v2/{tail:.*}", head)
    app.router.add_get("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    holder["challenge"] = challenge or f'Bearer realm="http://{realm_host}:{port}/token",service="reg"'
    checker = AccessChecker(lambda r: f"http://{r}", timeout=3)
    checker._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=_AllLoopback()))
    try:
        try:
            await checker.check(f"127.0.0.1:{port}", "team/app", "blob", BLOB, authorization)
            outcome = "allowed"
        except AccessDenied as exc:
            outcome = f"denied {exc.status}"
        return outcome, hits, checker.asked
    finally:
        await checker.close()
        await runner.cleanup()


def test_client_credentials_never_go_to_a_foreign_plain_http_realm():
    outcome, hits, asked = asyncio.run(_check("auth.example", BASIC))
    assert hits == [] and outcome == "denied 401", (outcome, hits)
    assert asked == 1   # the HEAD only: the token server was never dialled


def test_anonymous_clients_may_ask_any_realm_and_loopback_pairs_get_credentials():
    # anonymous: nothing secret to leak, the token request goes out (to the test's server)
    outcome, hits, _ = asyncio.run(_check("auth.example", None))
    assert hits == [None], hits
    # registry and realm both on loopback: the client's own credentials are sent
    outcome, hits, _ = asyncio.run(_check("127.0.0.1", BASIC))
    assert hits == [BASIC], hits
    assert outcome == "denied 401"   # the fake registry answers 401 even to the token: still refused


def test_malformed_challenge_lets_nobody_in():
    outcome, hits, asked = asyncio.run(_check(None, BASIC, challenge='Bearer realm="http://x/unterminated'))
    assert outcome == "denied 401" and hits == [] and asked == 1


@pytest.mark.parametrize("challenge", ['Basic realm="r"', 'Negotiate abc'])
def test_non_bearer_challenges_get_no_token_exchange(challenge):
    outcome, hits, asked = asyncio.run(_check(None, BASIC, challenge=challenge))
    assert outcome == "denied 401" and hits == [] and asked == 1
