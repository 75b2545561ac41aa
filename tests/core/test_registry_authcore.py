"""The I/O-free registry-auth core (remora.registry.authcore) and the two shells' use of it.

Pure: no registry, no socket, no root. The end-to-end behaviour against a real distribution with a JWT
token server is in tests/core/test_registry_auth.py (sync client) and tests/plugins/test_peer_auth.py,
tests/plugins/test_mirror_authz.py (the peer).
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import json
import threading
import time
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from remora.errors import AuthError, InvalidInput, RegistryError
from remora.registry import authcore
from remora.registry.auth import Authenticator
from remora.registry.authcore import (
    MAX_CHALLENGE_CHARS,
    MAX_EXPIRES_IN,
    MAX_TOKEN_RESPONSE,
    Challenge,
    Credentials,
    TokenCache,
    check_realm,
    merge_scopes,
    parse_challenges,
    parse_token_response,
    repository_scope,
    select_challenge,
    token_request,
)

HUB = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
       'scope="repository:library/ubuntu:pull"')
ALICE = Credentials(username="alice", password="alice-pw", source="test")
BOB = Credentials(username="bob", password="bob-pw", source="test")


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def bearer(realm="https://auth.example/token", service="reg.example", scope="") -> Challenge:
    params = {"realm": realm, "service": service}
    if scope:
        params["scope"] = scope
    return Challenge("bearer", params)


# ------------------------------------------------------------------------------------------- challenges

def test_docker_hub_bearer_challenge():
    [c] = parse_challenges(HUB)
    assert (c.scheme, c.realm, c.service, c.scope) == (
        "bearer", "https://auth.docker.io/token", "registry.docker.io", "repository:library/ubuntu:pull")
    assert select_challenge([c]) is c


def test_scheme_and_parameter_names_are_case_insensitive_values_are_not():
    [c] = parse_challenges('BEARER Realm="https://A/Token", SERVICE = "Reg"')
    assert (c.scheme, c.realm, c.service) == ("bearer", "https://A/Token", "Reg")


def test_quoted_strings_keep_commas_spaces_and_escaped_quotes():
    [c] = parse_challenges(r'Bearer realm="https://a/t",scope="repository:a:pull,push repository:b:pull",'
                           r'error_description="say \"no\", twice"')
    assert c.scope == "repository:a:pull,push repository:b:pull"
    assert c.params["error_description"] == 'say "no", twice'


def test_several_challenges_bearer_is_preferred_whatever_the_order():
    cs = parse_challenges('Basic realm="a, b", Bearer realm="https://a/t",service="s", Negotiate abc==')
    assert [c.scheme for c in cs] == ["basic", "bearer", "negotiate"]
    assert cs[0].realm == "a, b" and cs[2].token68 == "abc=="
    assert select_challenge(cs).scheme == "bearer"
    # several WWW-Authenticate headers (aiohttp's getall) are one list
    cs = parse_challenges(['Basic realm="r"', 'Bearer realm="https://a/t"'])
    assert select_challenge(cs).realm == "https://a/t"


def test_basic_only_unknown_only_and_empty():
    assert select_challenge(parse_challenges('Basic realm="registry"')).scheme == "basic"
    assert select_challenge(parse_challenges("Basic")).scheme == "basic"
    assert select_challenge(parse_challenges("Negotiate")) is None
    assert parse_challenges("") == [] and parse_challenges(" , ,") == []
    assert select_challenge([]) is None


def test_insufficient_scope_error_is_a_parameter():
    [c] = parse_challenges('Bearer realm="https://a/t",service="s",scope="repository:x:pull",'
                           'error="insufficient_scope"')
    assert c.error == "insufficient_scope"


@pytest.mark.parametrize("header, why", [
    ('Bearer service="s",realm="https://a/t', "unterminated quoted string"),
    ('Bearer realm="https://a/t,service="s"', "expected ','"),
    ('Bearer realm="https://a/t\\', "unterminated quoted string"),
    ('Bearer realm="https://a/t" service="s"', "expected ','"),
    ('Bearer realm="https://a/t",realm="https://evil/t"', "given twice"),
    ('Bearer realm=(x)', "has no value"),
    ('Bearer realm="a\r\nX-Injected: 1"', "control character"),
    ('=realm', "expected an auth scheme"),
    ('"Bearer"', "expected an auth scheme"),
    (", ".join(f"S{i}" for i in range(authcore.MAX_CHALLENGES + 1)), "more than"),
    ("Bearer " + ",".join(f'p{i}="v"' for i in range(authcore.MAX_PARAMS + 1)), "more than"),
])
def test_malformed_challenges_are_a_registry_error(header, why):
    with pytest.raises(RegistryError, match=why):
        parse_challenges(header)


def test_bearer_without_realm_is_refused():
    for header in ('Bearer service="s",scope="repository:a:pull"', "Bearer", 'Bearer realm=""', "Bearer realm="):
        with pytest.raises(RegistryError, match="without a realm"):
            select_challenge(parse_challenges(header))


def test_huge_header_is_refused_fast_and_never_echoed():
    marker = "SECRET-LOOKING-MARKER"
    header = f'Bearer realm="https://a/t",service="{marker}' + "x" * (MAX_CHALLENGE_CHARS * 64)
    with pytest.raises(RegistryError, match=f"at most {MAX_CHALLENGE_CHARS}") as exc:
        parse_challenges(header)
    assert marker not in str(exc.value) and len(str(exc.value)) < 200
    # the size is checked before any parsing: a huge header malformed at offset 0 is refused for its size
    with pytest.raises(RegistryError, match=f"at most {MAX_CHALLENGE_CHARS}"):
        parse_challenges("=" * (MAX_CHALLENGE_CHARS + 1))
    # just under the limit parses (a long scope list is legitimate)
    scope = " ".join(f"repository:team/app{i}:pull" for i in range(400))
    [c] = parse_challenges(f'Bearer realm="https://a/t",scope="{scope}"')
    assert c.scope == scope


def test_error_messages_never_contain_the_header():
    with pytest.raises(RegistryError) as exc:
        parse_challenges('Bearer realm="https://a/t",token="hunter2-leak" oops')
    assert "hunter2" not in str(exc.value)


@settings(max_examples=400, deadline=None, database=None)
@given(st.text(alphabet=st.sampled_from(list('Bearer realm="https://a/t",service= \\\t\r\n,=Basic ') + ["\x00", "é"]),
               max_size=80))
def test_any_input_parses_or_is_a_registry_error(header):
    try:
        challenges = parse_challenges(header)
    except RegistryError:
        return
    assert all(c.scheme and c.scheme == c.scheme.lower() for c in challenges)
    try:
        select_challenge(challenges)
    except RegistryError as exc:
        assert "without a realm" in str(exc)


# ---------------------------------------------------------------------------------------------- scopes

def test_repository_scope():
    assert repository_scope("team/app") == "repository:team/app:pull"
    assert repository_scope("team/app", ("push", "pull")) == "repository:team/app:pull,push"
    for bad in ("", "a b", 'a"b', "a,b", "a\nb", "x" * 600):
        with pytest.raises(InvalidInput):
            repository_scope(bad)
    with pytest.raises(InvalidInput):
        repository_scope("a", ("pull push",))


def test_merge_scopes_unites_actions_per_resource_in_first_seen_order():
    assert merge_scopes("repository:a:pull,push repository:b:pull", "repository:a:pull") == \
        "repository:a:pull,push repository:b:pull"
    assert merge_scopes("repository:a:pull", "repository:a:push repository:c:pull") == \
        "repository:a:pull,push repository:c:pull"
    assert merge_scopes("repository:a:push,pull") == "repository:a:pull,push"
    assert merge_scopes(None, "", "registry:catalog:*") == "registry:catalog:*"
    assert merge_scopes("opaque opaque", "repository:localhost:5000/x:pull") == \
        "opaque repository:localhost:5000/x:pull"
    assert merge_scopes() == ""


# ----------------------------------------------------------------------------------------------- realms

def test_https_realm_on_another_host_gets_credentials():
    check_realm("https://auth.docker.io/token", "docker.io", with_credentials=True, allow_plain_http=False)


def test_plain_http_realm_gets_no_credentials_unless_asked_or_all_loopback():
    with pytest.raises(AuthError, match="plain-HTTP token server"):
        check_realm("http://auth.example/token", "reg.example", with_credentials=True, allow_plain_http=False)
    # same host as the registry: same rule (the registry is https, its realm is not)
    with pytest.raises(AuthError):
        check_realm("http://reg.example/token", "reg.example", with_credentials=True, allow_plain_http=False)
    check_realm("http://auth.example/token", "reg.example", with_credentials=True, allow_plain_http=True)
    check_realm("http://auth.example/token", "reg.example", with_credentials=False, allow_plain_http=False)
    check_realm("http://127.0.0.1:9/token", "localhost:5000", with_credentials=True, allow_plain_http=False)
    check_realm("http://[::1]:9/token", "127.0.0.1:5000", with_credentials=True, allow_plain_http=False)
    # a remote registry may not send our credentials to a plain-HTTP service on this node
    with pytest.raises(AuthError):
        check_realm("http://127.0.0.1:9/token", "reg.example", with_credentials=True, allow_plain_http=False)


@pytest.mark.parametrize("realm", ["", "/token", "ftp://a/token", "file:///etc/passwd", "https://", "https:///t",
                                   "https://user:pw@auth.example/t", "https://a:99999/t", "https://a/t x",
                                   "javascript:alert(1)"])
def test_invalid_realms(realm):
    with pytest.raises(RegistryError, match="invalid token realm"):
        check_realm(realm, "reg.example", with_credentials=False, allow_plain_http=True)


# ------------------------------------------------------------------------------------- token requests

def test_anonymous_token_request():
    req = token_request(bearer(realm="https://auth.example/token?x=1#frag"), "repository:a:pull repository:b:pull",
                        None, registry="reg.example")
    parts = urlsplit(req.url)
    assert (req.method, parts.scheme, parts.netloc, parts.path, parts.fragment) == (
        "GET", "https", "auth.example", "/token", "")
    assert parse_qsl(parts.query) == [("x", "1"), ("service", "reg.example"), ("scope", "repository:a:pull"),
                                      ("scope", "repository:b:pull")]
    assert "Authorization" not in req.headers and req.body() is None


def test_basic_credentials_token_request():
    req = token_request(bearer(service=""), "repository:a:pull", ALICE, registry="reg.example")
    assert req.method == "GET" and "service" not in parse_qs(urlsplit(req.url).query)
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(b"alice:alice-pw").decode()
    assert "alice-pw" not in repr(req)


def test_identity_token_uses_the_refresh_grant():
    creds = Credentials(identity_token="id-tok-123", source="test")
    req = token_request(bearer(), "repository:a:pull,push repository:b:pull", creds, registry="reg.example")
    assert (req.method, req.url) == ("POST", "https://auth.example/token")
    assert parse_qs(req.body().decode()) == {
        "grant_type": ["refresh_token"], "refresh_token": ["id-tok-123"], "client_id": ["remora"],
        "scope": ["repository:a:pull,push repository:b:pull"], "service": ["reg.example"]}
    assert "Authorization" not in req.headers and "id-tok-123" not in repr(req)


def test_token_request_applies_the_realm_rule():
    with pytest.raises(AuthError):
        token_request(bearer(realm="http://auth.example/t"), "", ALICE, registry="reg.example")
    with pytest.raises(AuthError):
        token_request(bearer(realm="http://auth.example/t"), "", Credentials(identity_token="x"), registry="r.example")
    assert token_request(bearer(realm="http://auth.example/t"), "", None, registry="reg.example").method == "GET"


# ------------------------------------------------------------------------------------ token responses

def body(**doc) -> bytes:
    return json.dumps(doc).encode()


def test_token_and_lifetimes():
    tok = parse_token_response(body(token="abc.def-ghi_", expires_in=300), now=100.0)
    assert (tok.value, tok.expires_in, tok.refresh_at, tok.header()) == (
        "abc.def-ghi_", 300, 390.0, "Bearer abc.def-ghi_")
    assert parse_token_response(body(access_token="oauth"), now=0).value == "oauth"
    assert parse_token_response(body(token="t", access_token="o"), now=0).value == "t"
    # default 60 s (distribution token spec), also for 0 / null / "" (what the old clients did)
    for missing in ({}, {"expires_in": 0}, {"expires_in": None}, {"expires_in": ""}):
        assert parse_token_response(body(token="t", **missing), now=0).refresh_at == 50.0
    assert parse_token_response(body(token="t", expires_in="120"), now=0).refresh_at == 110.0
    # short lifetimes: refreshed at half, never after the end; floor 1 s
    assert parse_token_response(body(token="t", expires_in=4), now=0).refresh_at == 2.0
    assert parse_token_response(body(token="t", expires_in=-50), now=0).refresh_at == 0.5
    # ceiling
    tok = parse_token_response(body(token="t", expires_in=10**9), now=0)
    assert tok.expires_in == MAX_EXPIRES_IN and tok.refresh_at == MAX_EXPIRES_IN - 10
    assert parse_token_response(b'{"token": "t", "expires_in": Infinity}', now=0).expires_in == MAX_EXPIRES_IN


def test_issued_at():
    tok = parse_token_response(body(token="t", issued_at="2026-12-07T05:00:00Z"), now=0)
    assert tok.issued_at == datetime.datetime(2026, 12, 7, 5, 0, tzinfo=datetime.UTC)
    # the lifetime counts from receipt, not from the token server's clock
    assert tok.refresh_at == 50.0
    assert parse_token_response(body(token="t", issued_at="yesterday"), now=0).issued_at is None
    assert parse_token_response(body(token="t", issued_at=12), now=0).issued_at is None


@pytest.mark.parametrize("raw, why", [
    (b"not json", "not JSON"), (b"\xff\xfe", "not JSON"), (b"[1]", "not a JSON object"), (b"{}", "no token"),
    (body(token=""), "no token"), (body(token=123), "not a bearer token"),
    (body(token="a b"), "not a bearer token"), (body(token="a\r\nX-Evil: 1"), "not a bearer token"),
    (body(token="x" * (authcore.MAX_TOKEN_CHARS + 1)), "not a bearer token"),
    (body(token="t", expires_in="soon"), "expires_in"), (body(token="t", expires_in=True), "expires_in"),
    (body(token="t", expires_in=[1]), "expires_in"), (b'{"token": "t", "expires_in": NaN}', "expires_in"),
    (b" " * (MAX_TOKEN_RESPONSE + 1), "larger than"),
])
def test_bad_token_responses(raw, why):
    with pytest.raises(RegistryError, match=why) as exc:
        parse_token_response(raw, now=0)
    assert "X-Evil" not in str(exc.value)


# ----------------------------------------------------------------------------------------------- cache

def test_cache_expiry_on_an_injected_clock():
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    c, who = bearer(), cache.identity(ALICE)
    tok = parse_token_response(body(token="t1", expires_in=60), now=clock())
    cache.put(c, "repository:a:pull", who, tok)
    clock.now += 49.9
    assert cache.get(c, "repository:a:pull", who) is tok
    clock.now += 0.1   # refresh_at reached: gone
    assert cache.get(c, "repository:a:pull", who) is None and len(cache) == 0


def test_cache_isolates_credentials_realms_services_and_scopes():
    cache = TokenCache(clock=FakeClock())
    alice, bob, anon = cache.identity(ALICE), cache.identity(BOB), cache.identity(None)
    assert len({alice, bob, anon}) == 3
    assert cache.identity(Credentials(username="alice", password="other")) != alice
    assert cache.identity(Credentials(username="alice", password="alice-pw", source="elsewhere")) == alice
    assert cache.identity(Credentials(username="alice")) == anon   # no secret: anonymous
    assert cache.identity(Credentials(identity_token="it")) not in (alice, anon)
    assert "alice-pw" not in alice and TokenCache().identity(ALICE) != alice   # per-cache key
    tok = parse_token_response(body(token="alice-token"), now=1000.0)
    cache.put(bearer(), "repository:a:pull", alice, tok)
    assert cache.get(bearer(), "repository:a:pull", bob) is None
    assert cache.get(bearer(), "repository:a:pull", anon) is None
    assert cache.get(bearer(service="other"), "repository:a:pull", alice) is None
    assert cache.get(bearer(realm="https://evil.example/token"), "repository:a:pull", alice) is None
    assert cache.get(bearer(), "repository:a:pull,push", alice) is None
    assert cache.get(bearer(), "repository:b:pull", alice) is None
    assert cache.get(bearer(), "repository:a:pull", alice) is tok


def test_cache_normalizes_scopes_discards_only_the_refused_token_and_is_bounded():
    cache = TokenCache(clock=FakeClock(), max_entries=3)
    c, who = bearer(), "anonymous"
    t1, t2 = (parse_token_response(body(token=v), now=1000.0) for v in ("t1", "t2"))
    cache.put(c, "repository:b:pull repository:a:push,pull", who, t1)
    assert cache.get(c, "repository:a:pull,push repository:b:pull", who) is t1
    cache.discard(c, "repository:a:pull,push repository:b:pull", who, t2)   # not the cached one: kept
    assert cache.get(c, "repository:a:pull,push repository:b:pull", who) is t1
    cache.discard(c, "repository:a:pull,push repository:b:pull", who, t1)
    assert cache.get(c, "repository:a:pull,push repository:b:pull", who) is None
    for i in range(10):
        cache.put(c, f"repository:r{i}:pull", who, t1)
    assert len(cache) == 3 and cache.get(c, "repository:r9:pull", who) is t1
    assert cache.get(c, "repository:r0:pull", who) is None


def test_cache_is_thread_safe():
    cache = TokenCache(max_entries=64)
    c = bearer()
    tok = parse_token_response(body(token="t"), now=time.monotonic())
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(2000):
                scope = f"repository:r{(n * 7 + i) % 100}:pull"
                cache.put(c, scope, "anonymous", tok)
                got = cache.get(c, scope, "anonymous")
                assert got is None or got is tok
                if i % 3 == 0:
                    cache.discard(c, scope, "anonymous")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(cache) <= 64


# ------------------------------------------------------------ the shells use the core (still no network)

def _response(status: int, challenge: str) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.headers["WWW-Authenticate"] = challenge
    return resp


def test_sync_shell_hostile_challenges_fail_before_any_request():
    session = requests.Session()
    session.request = None   # any network call would be a TypeError, not a RegistryError/AuthError
    auth = Authenticator("reg.example", session, loader=lambda: ALICE, timeout=5, allow_plain_http=False)
    with pytest.raises(RegistryError, match="registry reg.example: malformed WWW-Authenticate"):
        auth.answer(_response(401, 'Bearer realm="https://a/t'), "repository:a:pull", {})
    with pytest.raises(RegistryError, match="without a realm"):
        auth.answer(_response(401, 'Bearer service="s"'), "repository:a:pull", {})
    with pytest.raises(AuthError, match="plain-HTTP token server"):
        auth.answer(_response(401, 'Bearer realm="http://auth.example/t",service="s"'), "repository:a:pull", {})
    assert auth.answer(_response(401, "Negotiate"), "repository:a:pull", {}) is None
    # Basic, listed after an unknown scheme, is still answered
    assert auth.answer(_response(401, 'Negotiate, Basic realm="r"'), None, {}) == {
        "Authorization": "Basic " + base64.b64encode(b"alice:alice-pw").decode()}


def test_peer_shell_hostile_challenges_fail_before_any_request(tmp_path, monkeypatch):
    from plugins.peer.upstream import Upstream

    monkeypatch.delenv("REMORA_USERNAME", raising=False)
    monkeypatch.delenv("REMORA_PASSWORD", raising=False)

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {"reg.example": {"auth": base64.b64encode(b"node:node-pw").decode()}}}))
    up = Upstream(docker_config=cfg, allowed=["reg.example"])   # never started: no session to dial with

    async def run(header):
        await up._authenticate("reg.example", "repository:a:pull", [header])

    with pytest.raises(RegistryError, match="malformed WWW-Authenticate") as exc:
        asyncio.run(run('Bearer realm="https://a/t'))
    with pytest.raises(RegistryError, match="without a realm"):
        asyncio.run(run('Bearer service="s"'))
    with pytest.raises(AuthError, match="plain-HTTP token server") as exc:
        asyncio.run(run('Bearer realm="http://auth.example/token",service="s"'))
    assert "auth.example" not in str(exc.value), "errors reach clients: no URL in them"
    with pytest.raises(AuthError, match="unsupported auth challenge"):
        asyncio.run(run("Negotiate abc=="))
    asyncio.run(run('Basic realm="r"'))
    assert up._auth_header("reg.example", "repository:a:pull") == "Basic " + base64.b64encode(b"node:node-pw").decode()
