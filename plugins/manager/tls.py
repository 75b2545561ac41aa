"""The manager over HTTPS: a server certificate of the cluster CA, client certificates of members.

Why: schedulers and peers take their scheduler lists and dynamic config from the manager, so a host
that could register or keep alive in their name could steer the mesh. The manager therefore serves
TLS with its own member certificate (role ``manager``, ``remora certs issue --role manager``) and
asks every client for a certificate (``CERT_OPTIONAL``: the console and the operators' commands,
which authenticate with personal access tokens, need not have one). The daemons' endpoints
(``/api/v1/agent/...`` except the first-certificate request) then require a certificate of the
cluster CA with a member role, checked per request by :func:`identity`.

uvicorn puts nothing about the TLS peer into the ASGI scope, so :class:`MemberTLSProtocol` is a
uvicorn HTTP protocol that records the verified client certificate's :class:`Identity` in the
connection's ``state`` (``request.state.remora_identity``) when the connection is made, after the
handshake. The context is reloaded in place when the files rotate (new connections get the new
certificate, see :class:`remora.pki.tls.Reloader`).
"""
from __future__ import annotations

import logging
import ssl
from pathlib import Path

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from remora.pki.tls import ssl_identity

log = logging.getLogger("remora.manager.tls")

STATE_KEY = "remora_identity"
#: Certificate roles that may use the agent endpoints, by member type registered.
ROLE_OF_TYPE = {"scheduler": "scheduler", "seed_peer": "peer", "peer": "peer"}
AGENT_ROLES = ("peer", "scheduler")


def reloader(tls_dir: Path):
    """The manager's TLS material (ca.pem, cert.pem, key.pem of role manager), checked now."""
    from remora.errors import UsageError
    from remora.pki.tls import Reloader, TLSFiles

    r = Reloader(TLSFiles.in_dir(tls_dir))
    if r.identity.role != "manager":
        raise UsageError(f"{tls_dir}/cert.pem is a {r.identity.role!r} certificate; the manager needs one of role "
                         "manager ('remora certs issue --role manager --host-id NAME --ip ADDRESS')")
    return r


class SSLContextFactory:
    """A uvicorn ``ssl_context_factory``: our context, client certificates asked for but optional.

    A picklable class (uvicorn hands it to each ``--workers`` process), holding only the directory:
    each process loads and reloads the files itself.
    """

    def __init__(self, tls_dir: Path | str):
        self.tls_dir = str(tls_dir)

    def __getstate__(self) -> dict:
        return {"tls_dir": self.tls_dir}

    def __call__(self, _config, _default) -> ssl.SSLContext:
        rel = self._rel = reloader(Path(self.tls_dir))
        ctx = rel.server_context()
        # Reloader.server_context switches each connection to a fresh CERT_REQUIRED context in its SNI
        # callback; here client certificates are optional (humans use tokens), so reload in place instead.
        ctx.sni_callback = lambda *_: (rel.check(), None)[1]
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx


class MemberTLSProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, recording the client certificate's identity per connection."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        try:
            ident = ssl_identity(transport.get_extra_info("ssl_object"))
        except Exception:  # noqa: BLE001 - an unreadable certificate is no certificate
            ident = None
        self.app_state = {**self.app_state, STATE_KEY: ident}
        super().connection_made(transport)


def identity(request):
    """The verified client certificate's identity of a request, or None."""
    return getattr(request.state, STATE_KEY, None)


def require_member(request, cluster: str | None, member_type: str | None = None):
    """The caller's identity if it is a member of ``cluster`` (of the role ``member_type`` needs);
    raises PermissionError with the reason otherwise."""
    ident = identity(request)
    roles = (ROLE_OF_TYPE[member_type],) if member_type else AGENT_ROLES
    if ident is None:
        raise PermissionError("a client certificate of a cluster member is required (mutual TLS; "
                              "'remora certs issue --role peer|scheduler')")
    if not ident.is_member(cluster, roles):
        raise PermissionError(f"certificate of role {ident.role!r}, cluster {ident.cluster!r}: this needs role "
                              f"{' or '.join(roles)} of cluster {cluster!r}")
    return ident
