"""Mutual TLS for the mesh (issue 10, part 1): the cluster CA, member certificates, servers that accept
only members (aiohttp and grpc, real sockets on 127.0.0.1), identity of the caller, rotation without a
restart, an external OpenSSL-made CA, key file modes and the ``remora certs`` command."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web

from remora.errors import InvalidInput, NotFound, UsageError
from remora.pki import ca, tls

SERVICE = "remora.test.Echo"


# ---------------------------------------------------------------- fixtures and helpers


class Pki:
    """A cluster CA with a server member, a client member, a foreign member and an expired member."""

    def __init__(self, root: Path):
        self.root = root
        self.ca = ca.init_ca(root / "ca", cluster="c1")
        self.server = self.issue("server", "peer", "srv-1", ips=["127.0.0.1"], dns=["localhost"])
        self.client = self.issue("client", "peer", "node-7")
        other = ca.init_ca(root / "other-ca", cluster="c1")  # same cluster name, another key: not a member
        self.foreign = root / "foreign"
        ca.write_member(self.foreign, other.issue("peer", "intruder", ips=["127.0.0.1"]), other.bundle_pem)
        self.expired = root / "expired"
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
        ca.write_member(self.expired, self.ca.issue("peer", "old-node", days=1, not_before=past), self.ca.bundle_pem)

    def issue(self, name: str, role: str, host: str, **kw) -> Path:
        out = self.root / name
        ca.write_member(out, self.ca.issue(role, host, **kw), self.ca.bundle_pem)
        return out


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path)


def raw_client_context(trust: Path, cert_dir: Path | None) -> ssl.SSLContext:
    """A client context made with the ssl module only (no checks of ours): trusts ``trust``, presents
    the certificate of ``cert_dir`` if any, even an expired or foreign one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(trust))
    if cert_dir is not None:
        ctx.load_cert_chain(str(cert_dir / "cert.pem"), str(cert_dir / "key.pem"))
    return ctx


class HttpConn:
    """A TLS connection with HTTP/1.1 keep-alive, blocking: several requests on one connection."""

    def __init__(self, port: int, ctx: ssl.SSLContext):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buf = b""

    def server_serial(self) -> int:
        return tls.ssl_identity(self.sock).serial

    def get(self, path: str = "/who") -> tuple[int, bytes]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        length = int(next(v for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length"))
        while len(self.buf) < length:
            self._recv()
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split()[1]), body

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        self.buf += data

    def close(self) -> None:
        self.sock.close()


class Site:
    def __init__(self, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.calls = 0

    async def who(self, request):
        self.calls += 1
        ident = tls.request_identity(request)
        return web.json_response({"role": ident.role, "host_id": ident.host_id, "cluster": ident.cluster,
                                  "serial": ident.serial})

    async def __aenter__(self):
        app = web.Application()
        app.router.add_get("/who", self.who)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


def refused_reason(port: int, ctx: ssl.SSLContext) -> str:
    """Connect and send a request; return the TLS alert the server refused us with.

    With TLS 1.3 the client's side of the handshake may finish before the server has checked the
    client certificate, so the refusal can arrive on the first read: both count, a reply does not.
    """
    try:
        conn = HttpConn(port, ctx)
        try:
            status, body = conn.get()
        finally:
            conn.close()
    except ssl.SSLError as exc:
        return exc.reason or str(exc)
    except (ConnectionError, OSError) as exc:  # reset after the alert
        return f"connection error: {exc}"
    raise AssertionError(f"server answered {status} {body!r} to a non-member")


# ---------------------------------------------------------------- CA and files


def test_init_issue_identity_and_file_modes(pki):
    assert stat.S_IMODE(os.stat(pki.root / "ca" / "ca-key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pki.root / "ca").st_mode) == 0o700
    for d in (pki.server, pki.client):
        assert stat.S_IMODE(os.stat(d / "key.pem").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(d / "cert.pem").st_mode) == 0o644
        assert (d / "ca.pem").read_bytes() == (pki.root / "ca" / "ca.pem").read_bytes()
    assert not [p for p in pki.server.iterdir() if p.name.endswith(".tmp")]
    m = tls.load_material(tls.TLSFiles.in_dir(pki.server))
    assert (m.identity.role, m.identity.host_id, m.identity.cluster) == ("peer", "srv-1", "c1")
    assert m.identity.is_member("c1", ("peer",)) and not m.identity.is_member("c2") \
        and not m.identity.is_member(roles=("scheduler",))
    info = ca.describe(ca.load_certificates((pki.server / "cert.pem").read_bytes())[0])
    assert set(info["sans"]) == {"URI:spiffe://remora/c1/peer/srv-1", "DNS:localhost", "IP:127.0.0.1"}
    assert info["extended_key_usage"] == ["serverAuth", "clientAuth"] and not info["ca"] and not info["expired"]
    # the cluster name is read back from the CA; a client certificate cannot serve
    loaded = ca.load_ca(pki.root / "ca")
    assert loaded.cluster == "c1"
    client_only = ca.describe(loaded.issue("client", "cli-1").cert)
    assert client_only["extended_key_usage"] == ["clientAuth"] and client_only["role"] == "client"
    # the umask does not widen or narrow the key's mode
    old = os.umask(0o000)
    try:
        ca.write_member(pki.root / "umask", loaded.issue("peer", "u"), loaded.bundle_pem)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(pki.root / "umask" / "key.pem").st_mode) == 0o600


def test_bad_requests_get_clear_errors(pki):
    with pytest.raises(UsageError, match="role"):
        pki.ca.issue("admin", "h")
    with pytest.raises(UsageError, match="host id"):
        pki.ca.issue("peer", "../etc")
    with pytest.raises(UsageError, match="IP"):
        pki.ca.issue("peer", "h", ips=["10.0.0.300"])
    with pytest.raises(UsageError, match="DNS"):
        pki.ca.issue("peer", "h", dns=["bad name"])
    with pytest.raises(UsageError, match="already exists"):
        ca.init_ca(pki.root / "ca")
    with pytest.raises(NotFound, match="no cluster CA"):
        ca.load_ca(pki.root / "nothing")
    # material that would fail every handshake is refused before use
    with pytest.raises(InvalidInput, match="not valid now"):
        tls.load_material(tls.TLSFiles.in_dir(pki.expired))
    mixed = tls.TLSFiles(ca=pki.server / "ca.pem", cert=pki.server / "cert.pem", key=pki.client / "key.pem")
    with pytest.raises(InvalidInput, match="does not belong"):
        tls.load_material(mixed)
    foreign = tls.TLSFiles(ca=pki.server / "ca.pem", cert=pki.foreign / "cert.pem", key=pki.foreign / "key.pem")
    with pytest.raises(InvalidInput, match="not signed by a CA"):
        tls.load_material(foreign)


# ---------------------------------------------------------------- aiohttp


async def test_aiohttp_member_gets_in_with_its_identity(pki):
    async with Site(tls.server_context(tls.TLSFiles.in_dir(pki.server))) as site:
        ctx = tls.client_context(tls.TLSFiles.in_dir(pki.client))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{site.port}/who", ssl=ctx) as resp:
                assert resp.status == 200
                server = tls.response_identity(resp)  # before the body is read: then the connection is released
                body = await resp.json()
        assert body["role"] == "peer" and body["host_id"] == "node-7" and body["cluster"] == "c1"
        assert (server.role, server.host_id) == ("peer", "srv-1")
        # and the client checks the server: a server of another CA is refused by our client
        async with Site(tls.server_context(tls.TLSFiles(pki.foreign / "ca.pem", pki.foreign / "cert.pem",
                                                        pki.foreign / "key.pem"))) as evil:
            async with aiohttp.ClientSession() as session:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await session.get(f"https://127.0.0.1:{evil.port}/who", ssl=ctx)
            assert evil.calls == 0


async def assert_refused(port: int, ctx: ssl.SSLContext, caplog, expected: str) -> None:
    """A client with ``ctx`` gets no answer and the server's handshake failed for ``expected``.

    asyncio drops the TLS alert when it closes a failed handshake, so the client may only see the
    connection close: the server's reason is read from asyncio's debug log (the loop must be in
    debug mode and ``caplog`` at DEBUG for "asyncio").
    """
    def failures() -> list[ssl.SSLError]:
        return [r.exc_info[1] for r in caplog.records
                if r.name == "asyncio" and r.exc_info and isinstance(r.exc_info[1], ssl.SSLError)]

    before = len(failures())
    await asyncio.to_thread(refused_reason, port, ctx)
    deadline = time.monotonic() + 10
    while len(failures()) == before:
        assert time.monotonic() < deadline, "the server logged no handshake failure"
        await asyncio.sleep(0.01)
    err = failures()[before]
    why = f"{err.reason} {getattr(err, 'verify_message', '')}"
    assert expected in why, why


def debug_tls_failures(caplog) -> None:
    asyncio.get_running_loop().set_debug(True)
    caplog.set_level(logging.DEBUG, logger="asyncio")


@pytest.mark.parametrize("who", ["no certificate", "another CA", "expired"])
async def test_aiohttp_refuses_non_members(pki, who, caplog):
    cert_dir = {"no certificate": None, "another CA": pki.foreign, "expired": pki.expired}[who]
    trust = pki.root / "ca" / "ca.pem"
    debug_tls_failures(caplog)
    async with Site(tls.server_context(tls.TLSFiles.in_dir(pki.server))) as site:
        expected = {"no certificate": "PEER_DID_NOT_RETURN_A_CERTIFICATE",
                    "another CA": "unable to get local issuer certificate",
                    "expired": "certificate has expired"}[who]
        await assert_refused(site.port, raw_client_context(trust, cert_dir), caplog, expected)
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"https://127.0.0.1:{site.port}/who",
                                       ssl=raw_client_context(trust, cert_dir)) as resp:
                    await resp.read()
        # a member still gets in, and no handler ever ran for the non-member
        conn = await asyncio.to_thread(HttpConn, site.port, tls.client_context(tls.TLSFiles.in_dir(pki.client)))
        status, _ = await asyncio.to_thread(conn.get)
        conn.close()
        assert status == 200 and site.calls == 1


async def test_member_middleware_checks_role_and_cluster(pki):
    sched_dir = pki.issue("sched", "scheduler", "s-1", ips=["127.0.0.1"])
    app = web.Application(middlewares=[tls.aiohttp_member_middleware("c1", ("scheduler",))])

    async def ok(request):
        return web.Response(text=request[tls.request_key()].host_id)

    app.router.add_get("/who", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context(tls.TLSFiles.in_dir(pki.server)))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            for d, status, text in ((sched_dir, 200, "s-1"), (pki.client, 403, None)):
                ctx = tls.client_context(tls.TLSFiles.in_dir(d))
                async with session.get(f"https://127.0.0.1:{port}/who", ssl=ctx) as resp:
                    assert resp.status == status
                    if text:
                        assert await resp.text() == text
    finally:
        await runner.cleanup()


async def test_aiohttp_rotation_in_place(pki):
    files = tls.TLSFiles.in_dir(pki.server)
    reloader = tls.Reloader(files, min_interval=0)
    first = reloader.identity.serial
    member = tls.client_context(tls.TLSFiles.in_dir(pki.client))
    async with Site(reloader.server_context()) as site:
        old = await asyncio.to_thread(HttpConn, site.port, member)
        assert old.server_serial() == first and (await asyncio.to_thread(old.get))[0] == 200
        assert reloader.check() is False  # nothing changed

        # half a rotation (new key, old certificate) is not taken: the server keeps working
        nxt = pki.ca.issue("peer", "srv-1", ips=["127.0.0.1"])
        ca.atomic_write(files.key, nxt.key_pem, 0o600)
        assert reloader.check() is False and reloader.identity.serial == first
        probe = await asyncio.to_thread(HttpConn, site.port, member)
        assert probe.server_serial() == first
        probe.close()

        ca.atomic_write(files.cert, nxt.cert_pem, 0o644)
        assert reloader.check() is True and reloader.generation == 2
        new = await asyncio.to_thread(HttpConn, site.port, member)
        assert new.server_serial() == nxt.cert.serial_number != first
        assert (await asyncio.to_thread(new.get))[0] == 200
        # the connection opened before the rotation continues, with the certificate it started with
        status, body = await asyncio.to_thread(old.get)
        assert status == 200 and json.loads(body)["host_id"] == "node-7"
        assert old.server_serial() == first
        old.close()
        new.close()


async def test_server_follows_ca_bundle_without_restart(pki, caplog):
    """A server made by the Reloader serves each new connection from the current files, with no
    explicit check(): a CA added to the bundle is trusted, a CA removed from it no longer is."""
    debug_tls_failures(caplog)
    ca2 = ca.init_ca(pki.root / "ca2", cluster="c1")
    member2 = pki.root / "member2"
    ca.write_member(member2, ca2.issue("peer", "node-9"), ca2.bundle_pem)
    ctx2 = raw_client_context(pki.root / "ca" / "ca.pem", member2)  # trusts the server's CA, presents CA2's cert
    files = tls.TLSFiles.in_dir(pki.server)
    reloader = tls.Reloader(files, min_interval=0)
    async with Site(reloader.server_context()) as site:
        await assert_refused(site.port, ctx2, caplog, "unable to get local issuer certificate")
        ca.atomic_write(files.ca, pki.ca.bundle_pem + ca2.bundle_pem, 0o644)  # CA2 joins
        live = await asyncio.to_thread(HttpConn, site.port, ctx2)
        status, body = await asyncio.to_thread(live.get)
        assert status == 200 and json.loads(body)["host_id"] == "node-9"
        ca.atomic_write(files.ca, pki.ca.bundle_pem, 0o644)  # CA2 leaves again
        await assert_refused(site.port, ctx2, caplog, "unable to get local issuer certificate")
        assert (await asyncio.to_thread(live.get))[0] == 200  # an open connection is not cut
        live.close()
        member = await asyncio.to_thread(HttpConn, site.port, tls.client_context(tls.TLSFiles.in_dir(pki.client)))
        assert (await asyncio.to_thread(member.get))[0] == 200
        member.close()
        assert reloader.generation == 3


async def test_client_context_rotates_in_place(pki):
    client_files = tls.TLSFiles.in_dir(pki.client)
    reloader = tls.Reloader(client_files, min_interval=0)
    ctx = reloader.client_context()
    async with Site(tls.server_context(tls.TLSFiles.in_dir(pki.server))) as site:
        async with aiohttp.ClientSession() as session:
            async def serial() -> int:
                async with session.get(f"https://127.0.0.1:{site.port}/who", ssl=ctx,
                                       headers={"Connection": "close"}) as resp:
                    return (await resp.json())["serial"]

            first = await serial()
            assert first == reloader.identity.serial
            nxt = pki.ca.issue("peer", "node-7")
            ca.write_member(pki.client, nxt, pki.ca.bundle_pem)
            assert reloader.check() is True
            assert await serial() == nxt.cert.serial_number != first


async def test_reloader_watch_picks_up_rotation(pki):
    files = tls.TLSFiles.in_dir(pki.server)
    reloader = tls.Reloader(files)
    ctx = reloader.server_context()
    task = asyncio.create_task(reloader.watch(interval=0.05))
    try:
        nxt = pki.ca.issue("peer", "srv-1", ips=["127.0.0.1"])
        ca.write_member(pki.server, nxt, pki.ca.bundle_pem)
        deadline = time.monotonic() + 10
        while reloader.identity.serial != nxt.cert.serial_number:
            assert time.monotonic() < deadline, "rotation not picked up"
            await asyncio.sleep(0.02)
        async with Site(ctx) as site:
            conn = await asyncio.to_thread(HttpConn, site.port, tls.client_context(tls.TLSFiles.in_dir(pki.client)))
            assert conn.server_serial() == nxt.cert.serial_number
            conn.close()
    finally:
        task.cancel()


# ---------------------------------------------------------------- grpc


class Echo:
    def __init__(self):
        self.calls = 0

    async def who(self, request, context):
        self.calls += 1
        ident = tls.grpc_identity(context)
        return f"{ident.cluster}/{ident.role}/{ident.host_id}".encode()


async def grpc_server(creds) -> tuple[grpc.aio.Server, int, Echo]:
    echo = Echo()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Who": grpc.unary_unary_rpc_method_handler(echo.who)}),))
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, port, echo


async def call(channel) -> bytes:
    return await channel.unary_unary(f"/{SERVICE}/Who")(b"", timeout=10)


def grpc_server_serial(port: int, trust: Path) -> int:
    """The serial of the certificate a grpc server presents to a new connection."""
    ctx = raw_client_context(trust, None)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return tls.ssl_identity(s).serial


async def test_grpc_members_only_with_identity(pki):
    server, port, echo = await grpc_server(tls.grpc_server_credentials(tls.TLSFiles.in_dir(pki.server)))
    target = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.secure_channel(target, tls.grpc_channel_credentials(tls.TLSFiles.in_dir(pki.client))) as ch:
            assert await call(ch) == b"c1/peer/node-7"
        ca_pem = (pki.root / "ca" / "ca.pem").read_bytes()
        no_cert = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        foreign = grpc.ssl_channel_credentials(root_certificates=ca_pem,
                                               private_key=(pki.foreign / "key.pem").read_bytes(),
                                               certificate_chain=(pki.foreign / "cert.pem").read_bytes())
        for creds in (no_cert, foreign):
            async with grpc.aio.secure_channel(target, creds) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(ch)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(target) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await call(ch)
        assert echo.calls == 1
    finally:
        await server.stop(None)


async def test_grpc_rotation_without_restart(pki):
    files = tls.TLSFiles.in_dir(pki.server)
    reloader = tls.Reloader(files, min_interval=0)
    first = reloader.identity.serial
    server, port, echo = await grpc_server(reloader.grpc_server_credentials())
    trust = pki.root / "ca" / "ca.pem"
    try:
        old = grpc.aio.secure_channel(f"127.0.0.1:{port}",
                                      tls.grpc_channel_credentials(tls.TLSFiles.in_dir(pki.client)))
        assert await call(old) == b"c1/peer/node-7"
        assert await asyncio.to_thread(grpc_server_serial, port, trust) == first
        nxt = pki.ca.issue("peer", "srv-1", ips=["127.0.0.1"])
        ca.write_member(pki.server, nxt, pki.ca.bundle_pem)
        # grpc asks the reloader before each new handshake: the next connection sees the new serial
        assert await asyncio.to_thread(grpc_server_serial, port, trust) == nxt.cert.serial_number != first
        assert reloader.generation == 2
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}",
                                           tls.grpc_channel_credentials(tls.TLSFiles.in_dir(pki.client))) as ch:
            assert await call(ch) == b"c1/peer/node-7"
        assert await call(old) == b"c1/peer/node-7"  # the old connection continues
        await old.close()
        assert echo.calls == 3
    finally:
        await server.stop(None)


# ---------------------------------------------------------------- an external PEM CA


def openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


async def test_external_openssl_ca_works_as_cluster_ca(tmp_path, caplog):
    debug_tls_failures(caplog)
    d = tmp_path / "corp"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem",
            "-days", "30", "-subj", "/O=Corp/CN=Corp Root", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    # a member certificate made entirely with openssl: the identity comes from OU/CN
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "key.pem",
            "-out", "m.csr", "-subj", "/O=Corp/OU=peer/CN=ossl-node", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
                               "basicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "m.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
            "-out", "cert.pem", "-days", "5", "-extfile", "ext.cnf", cwd=d)
    ossl_member = tls.TLSFiles(ca=d / "ca.pem", cert=d / "cert.pem", key=d / "key.pem")
    ident = tls.load_material(ossl_member).identity
    assert (ident.role, ident.host_id, ident.cluster) == ("peer", "ossl-node", None)
    # remora issues with the openssl CA too
    authority = ca.load_ca(d)
    assert authority.cluster == "default"
    ca.write_member(tmp_path / "srv", authority.issue("scheduler", "sched-1", ips=["127.0.0.1"]), authority.bundle_pem)
    async with Site(tls.server_context(tls.TLSFiles.in_dir(tmp_path / "srv"))) as site:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{site.port}/who", ssl=tls.client_context(ossl_member)) as resp:
                assert resp.status == 200
                assert tls.response_identity(resp).role == "scheduler"
                assert (await resp.json())["host_id"] == "ossl-node"
        # a member of our self-managed CA is not a member of the corp cluster
        own = Pki(tmp_path / "own")
        await assert_refused(site.port, raw_client_context(d / "ca.pem", own.client), caplog,
                             "unable to get local issuer certificate")


# ---------------------------------------------------------------- the command


def remora(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remora.cli", "certs", *args], capture_output=True, text=True,
                          timeout=60)


def test_certs_command(tmp_path):
    ca_dir, out = tmp_path / "ca", tmp_path / "node"
    assert remora("init", "--dir", str(ca_dir), "--cluster", "prod", "--days", "30").returncode == 0
    issued = remora("issue", "--dir", str(ca_dir), "--role", "scheduler", "--host-id", "s-1", "--dns", "s-1.local",
                    "--ip", "127.0.0.1", "--ip", "::1", "--out", str(out), "--days", "7")
    assert issued.returncode == 0, issued.stderr
    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
    shown = remora("show", str(out / "cert.pem"))
    assert shown.returncode == 0 and "s-1" in shown.stdout and "scheduler" in shown.stdout
    assert "spiffe://remora/prod/scheduler/s-1" in shown.stdout.replace("\n", "")
    info = json.loads(remora("show", "--json", str(out / "cert.pem")).stdout)[0]
    assert info["sans"] == ["URI:spiffe://remora/prod/scheduler/s-1", "DNS:s-1.local", "IP:127.0.0.1", "IP:::1"]
    assert 6 <= info["days_left"] <= 7 and info["cluster"] == "prod"
    # the issued files work together
    assert tls.load_material(tls.TLSFiles.in_dir(out)).identity.host_id == "s-1"
    # bad arguments: argparse's exit 2
    for bad in (["issue", "--dir", str(ca_dir), "--role", "admin", "--host-id", "x", "--out", str(out)],
                ["issue", "--dir", str(ca_dir), "--role", "peer", "--out", str(out)],
                ["init", "--dir", str(tmp_path / "x"), "--days", "0"],
                ["issue", "--dir", str(ca_dir), "--role", "peer", "--host-id", "x", "--ip", "nope", "--out", str(out)],
                ["init"]):
        proc = remora(*bad)
        assert proc.returncode == 2, (bad, proc.stderr)
    # no CA: a clear error naming the fix
    proc = remora("issue", "--dir", str(tmp_path / "none"), "--role", "peer", "--host-id", "x", "--out", str(out))
    assert proc.returncode == 5 and "no cluster CA" in proc.stderr and "remora certs init" in proc.stderr
    # an existing CA is not replaced by accident
    proc = remora("init", "--dir", str(ca_dir))
    assert proc.returncode == 2 and "--force" in proc.stderr
    help_text = remora("--help").stdout
    assert "any PEM CA works" in help_text and "remora certs issue" in help_text
    proc = remora("show", str(out / "key.pem"))
    assert proc.returncode == 3 and ("no certificate" in proc.stderr or "not a PEM" in proc.stderr), proc.stderr
