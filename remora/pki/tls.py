"""Mutual TLS for the mesh: contexts and grpc credentials from ``ca.pem`` + ``cert.pem`` + ``key.pem``.

Why this module: every listener of the mesh (the upload port, the scheduler) must accept only cluster
members, every client must check it talks to one, and certificates must rotate without a restart.

- :func:`load_material` reads the three files once, bounded, and checks them together (the key
  belongs to the certificate, the certificate is signed by a CA of the bundle and is valid now), so a
  daemon never starts or switches to files that would fail every handshake.
- :func:`server_context` REQUIRES a client certificate (``CERT_REQUIRED``, TLS 1.2 minimum);
  :func:`client_context` verifies the server against the cluster CA and presents our certificate.
- :class:`Reloader` re-reads the files when they change (mtime, inode, size) and loads them IN PLACE
  into the contexts it made: OpenSSL copies the certificate into each connection when it is created,
  so new connections get the new certificate and open ones keep theirs. For grpc it provides
  ``dynamic_ssl_server_credentials`` whose fetcher grpc calls before each new handshake.
- :func:`request_identity` / :func:`grpc_identity` say who the verified other side is.

A half-written rotation (new key, old certificate) is refused by :func:`load_material` and the
reloader keeps the material it has until the files agree again.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import os
import ssl
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from remora.errors import InvalidInput
from remora.pki import CA_CERT, CERT, KEY
from remora.pki.ca import Identity, identity_from_der, identity_of, load_certificates, load_private_key, read_pem

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """Where a daemon's trust (``ca``), certificate chain (``cert``) and private key (``key``) are."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path | str) -> TLSFiles:
        """The layout ``remora certs issue --out DIR`` writes: DIR/ca.pem, DIR/cert.pem, DIR/key.pem."""
        d = Path(directory)
        return cls(ca=d / CA_CERT, cert=d / CERT, key=d / KEY)

    def stamp(self) -> tuple[tuple[int, int, int, int] | None, ...]:
        """What changes when any of the files is replaced or rewritten (missing files count too)."""
        out: list[tuple[int, int, int, int] | None] = []
        for p in (self.ca, self.cert, self.key):
            try:
                st = os.stat(p)
                out.append((st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class Material:
    """One consistent, checked snapshot of the three files."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes  # PKCS#8 PEM, whatever format the file had
    identity: Identity  # who our own certificate names
    stamp: tuple = ()


def load_material(files: TLSFiles) -> Material:
    """Read and check ``files``: raises :class:`~remora.errors.InvalidInput` (or NotFound) when they
    would not work together, so that a bad rotation never replaces working material."""
    stamp = files.stamp()
    ca_pem = read_pem(files.ca, "CA bundle")
    cert_pem = read_pem(files.cert, "certificate")
    key_pem = read_pem(files.key, "private key")
    cas = load_certificates(ca_pem, f"CA bundle {files.ca}")
    chain = load_certificates(cert_pem, f"certificate {files.cert}")
    key = load_private_key(key_pem, f"private key {files.key}")
    try:
        if os.stat(files.key).st_mode & 0o077:
            log.warning("private key %s is readable by group or others: chmod 0600 it", files.key)
    except OSError:
        pass
    leaf = chain[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise InvalidInput(f"private key {files.key} does not belong to certificate {files.cert}")
    now = dt.datetime.now(dt.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise InvalidInput(f"certificate {files.cert} is not valid now "
                           f"(valid {leaf.not_valid_before_utc:%Y-%m-%d %H:%M}"
                           f" to {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
    if not _issued_by_any(chain, cas):
        raise InvalidInput(f"certificate {files.cert} is not signed by a CA of {files.ca}: the other members "
                           "would refuse it")
    key_pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    return Material(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pkcs8, identity=identity_of(leaf), stamp=stamp)


def _issued_by_any(chain: list[x509.Certificate], cas: list[x509.Certificate]) -> bool:
    """True when the chain (leaf first, then intermediates) leads by signatures to a certificate of ``cas``."""
    issuers = cas + chain[1:]
    cert = chain[0]
    for _ in range(len(chain)):
        parent = None
        for cand in issuers:
            if cand.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(cand)
            except Exception:  # noqa: BLE001 - InvalidSignature, unsupported key types: not this one
                continue
            parent = cand
            break
        if parent is None:
            return False
        if any(parent is c for c in cas):
            return True
        cert = parent
    return False


# ---------------------------------------------------------------- ssl contexts


def _load_into(ctx: ssl.SSLContext, material: Material) -> None:
    """Load our certificate chain and key, and the CA bundle, into ``ctx`` (in place).

    ``load_cert_chain`` only takes paths; the bytes go through an anonymous memory file so that what
    is loaded is exactly what :func:`load_material` checked (no second read of files that may be
    changing) and the key never touches another file.
    """
    fd = os.memfd_create("remora-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, material.cert_pem.rstrip(b"\n") + b"\n" + material.key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    ctx.load_verify_locations(cadata=material.ca_pem.decode("ascii", "replace"))


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2 suites; TLS 1.3 suites are all fine


def server_context(material: Material | TLSFiles) -> ssl.SSLContext:
    """A server context that refuses every client without a certificate of the cluster CA."""
    material = load_material(material) if isinstance(material, TLSFiles) else material
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    _load_into(ctx, material)
    return ctx


def client_context(material: Material | TLSFiles, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context that presents our certificate and accepts only a server of the cluster CA.

    ``check_hostname`` also checks the address dialled against the server's DNS/IP SANs; turn it off
    only when the caller checks the server's :class:`Identity` itself (e.g. peers that dial each other
    by an address learnt from the scheduler and compare the host id).
    """
    material = load_material(material) if isinstance(material, TLSFiles) else material
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = check_hostname
    _load_into(ctx, material)
    return ctx


# ---------------------------------------------------------------- who is on the other side


@functools.lru_cache(maxsize=1024)
def _identity_der(der: bytes) -> Identity:
    return identity_from_der(der)


def ssl_identity(ssl_object) -> Identity | None:
    """The identity of the verified certificate of an ``ssl.SSLObject``/``SSLSocket``, or None."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return _identity_der(der) if der else None


def request_identity(request) -> Identity | None:
    """Who sent an aiohttp ``request`` (over a :func:`server_context`), or None over plain HTTP."""
    transport = request.transport
    return ssl_identity(transport.get_extra_info("ssl_object")) if transport is not None else None


def response_identity(response) -> Identity | None:
    """Who answered an aiohttp client ``response`` (e.g. to compare a parent's host id).

    aiohttp releases the connection as soon as the body has arrived (for a small body, before the
    caller sees the response), so this falls back to the response's protocol, whose transport is the
    connection the response came on while it stays open.
    """
    conn = response.connection
    transport = conn.transport if conn is not None else \
        getattr(getattr(response, "_protocol", None), "transport", None)
    return ssl_identity(transport.get_extra_info("ssl_object")) if transport is not None else None


@functools.lru_cache(maxsize=1024)
def _identity_pem(pem: bytes) -> Identity:
    return identity_of(x509.load_pem_x509_certificate(pem))


def grpc_identity(context) -> Identity | None:
    """Who called a grpc method (sync or asyncio servicer context), from ``context.auth_context()``."""
    pems = context.auth_context().get("x509_pem_cert") or []
    return _identity_pem(bytes(pems[0])) if pems else None


@functools.cache
def request_key():
    """The key under which :func:`aiohttp_member_middleware` stores the caller's :class:`Identity`:
    ``request[request_key()]`` (an ``aiohttp.web.RequestKey`` where aiohttp has them)."""
    from aiohttp import web

    key_type = getattr(web, "RequestKey", None)
    return key_type("remora_identity", Identity) if key_type else "remora_identity"


def aiohttp_member_middleware(cluster: str | None = None, roles: tuple[str, ...] | None = None):
    """An aiohttp middleware that answers 403 to a client whose certificate names no member role
    (of ``roles``/``cluster`` when given) and stores its :class:`Identity` at ``request[request_key()]``."""
    from aiohttp import web

    key = request_key()

    @web.middleware
    async def member_only(request, handler):
        ident = request_identity(request)
        if ident is None or not ident.is_member(cluster, roles):
            raise web.HTTPForbidden(text="cluster members only\n")
        request[key] = ident
        return await handler(request)

    return member_only


# ---------------------------------------------------------------- grpc


def grpc_channel_credentials(material: Material | TLSFiles):
    """grpc channel credentials: verify the server against the CA bundle, present our certificate."""
    import grpc

    material = load_material(material) if isinstance(material, TLSFiles) else material
    return grpc.ssl_channel_credentials(root_certificates=material.ca_pem, private_key=material.key_pem,
                                        certificate_chain=material.cert_pem)


def grpc_server_certificate_configuration(material: Material):
    import grpc

    return grpc.ssl_server_certificate_configuration([(material.key_pem, material.cert_pem)],
                                                     root_certificates=material.ca_pem)


def grpc_server_credentials(material: Material | TLSFiles):
    """Static grpc server credentials that require a client certificate of the CA bundle."""
    import grpc

    material = load_material(material) if isinstance(material, TLSFiles) else material
    return grpc.ssl_server_credentials([(material.key_pem, material.cert_pem)], root_certificates=material.ca_pem,
                                       require_client_auth=True)


# ---------------------------------------------------------------- rotation


class Reloader:
    """The current material of a daemon, re-read when the files change; see the module docstring.

    ``check()`` is cheap (three ``stat`` calls, at most every ``min_interval`` seconds unless
    ``force``); it runs before each new handshake of a server made here (ssl and grpc alike) and from
    :meth:`watch` for clients.

    Servers: a context from :meth:`server_context` hands every new connection, in its SNI callback
    (which OpenSSL calls for every ClientHello, SNI or not), to a FRESH context built from the current
    files: certificate, key and CA bundle all change, including a CA dropped from the bundle.
    Connections already open keep the context they started with.

    Clients: contexts from :meth:`client_context` are reloaded in place (certificate and key replaced,
    CA certificates added; OpenSSL's store only grows, so a CA dropped from the bundle stays trusted by
    that context: make a new one when :attr:`generation` moves). grpc channels have fixed credentials:
    make a new channel with :meth:`grpc_channel_credentials` when :attr:`generation` moved.
    """

    def __init__(self, files: TLSFiles, *, min_interval: float = 1.0):
        self.files = files
        self.min_interval = min_interval
        self.material = load_material(files)
        self.generation = 1
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self._contexts: list[ssl.SSLContext] = []  # updated in place on reload
        self._serving: ssl.SSLContext | None = None  # fresh server context of the current material
        self._grpc_seen: dict[int, int] = {}

    @property
    def identity(self) -> Identity:
        return self.material.identity

    def check(self, force: bool = False) -> bool:
        """Reload when the files changed since the last load; True when new material is in use."""
        now = time.monotonic()
        if not force and now - self._checked < self.min_interval:
            return False
        with self._lock:
            self._checked = now
            stamp = self.files.stamp()
            if stamp == self.material.stamp:
                return False
            try:
                material = load_material(self.files)
                fresh = server_context(material)  # OpenSSL's own check, before touching a live context
            except Exception as exc:  # noqa: BLE001 - keep serving with what works, say why
                log.warning("TLS files changed but are not usable yet, keeping serial %x: %s",
                            self.material.identity.serial, exc)
                return False
            for ctx in self._contexts:
                _load_into(ctx, material)
            if self._serving is not None:
                self._serving = fresh
            old = self.material.identity.serial
            self.material = material
            self.generation += 1
            log.info("TLS certificate reloaded: serial %x -> %x (expires %s)", old, material.identity.serial,
                     material.identity.not_after.isoformat())
            return True

    def server_context(self) -> ssl.SSLContext:
        """A server context (for aiohttp's ``TCPSite(ssl_context=...)``) that always serves the current files."""
        front = server_context(self.material)
        front.sni_callback = self._switch
        with self._lock:
            self._contexts.append(front)  # in place too: what it serves if a switch ever failed
            if self._serving is None:
                self._serving = front
        return front

    def _switch(self, ssl_object, server_name, front) -> None:
        try:
            self.check()
            serving = self._serving
            if serving is not None and ssl_object.context is not serving:
                ssl_object.context = serving
        except Exception:
            log.exception("TLS context switch failed, serving the in-place reloaded context")
        return None

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        ctx = client_context(self.material, check_hostname=check_hostname)
        with self._lock:
            self._contexts.append(ctx)
        return ctx

    def grpc_channel_credentials(self):
        return grpc_channel_credentials(self.material)

    def grpc_server_credentials(self):
        """``dynamic_ssl_server_credentials`` requiring client certificates, following the files."""
        import grpc

        key = len(self._grpc_seen)
        self._grpc_seen[key] = self.generation

        def fetch():
            # Called by grpc (any thread) before each new handshake: None means "keep the current one".
            try:
                self.check()
            except Exception:
                log.exception("TLS reload check failed")
            if self._grpc_seen[key] == self.generation:
                return None
            material = self.material
            self._grpc_seen[key] = self.generation
            return grpc_server_certificate_configuration(material)

        return grpc.dynamic_ssl_server_credentials(grpc_server_certificate_configuration(self.material), fetch,
                                                   require_client_authentication=True)

    async def watch(self, interval: float = 5.0) -> None:
        """Check the files every ``interval`` seconds until cancelled (run it as an asyncio task)."""
        import asyncio

        while True:
            await asyncio.sleep(interval)
            try:
                self.check(force=True)
            except Exception:
                log.exception("TLS reload failed")
