"""A self-managed cluster CA: create it, issue member certificates, read who a certificate names.

Why a CA of our own: the mesh must let in only cluster members (a host on the cluster network without a
certificate cannot register, announce or download pieces), and most clusters have no PKI for node
daemons. ``remora certs init`` makes one in a directory; any PEM CA works instead (docs/pki.md).

A member certificate says who it is in two places, so that certificates made by other tools work too:

- a URI SAN ``spiffe://remora/<cluster>/<role>/<host-id>`` (what remora writes and reads first);
- the subject: ``OU=<role>``, ``CN=<host-id>`` (the fallback for a CA that cannot write URI SANs).

Keys are ECDSA P-256 (accepted by OpenSSL, BoringSSL in grpc, and every TLS 1.2/1.3 stack); member
certificates carry both serverAuth and clientAuth (a peer is a server to its children and a client of
its parents) except role ``client``, which gets clientAuth only. Private keys are written 0600,
atomically (temporary file, fsync, rename), so a daemon reloading its files never sees half a key.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from remora.errors import InvalidInput, NotFound, StorageError, UsageError
from remora.pki import CA_CERT, CA_KEY, CERT, KEY, ROLES

SPIFFE_DOMAIN = "remora"
DEFAULT_CLUSTER = "default"
CA_DAYS = 3650
MEMBER_DAYS = 90
MAX_PEM = 1 << 20  # a certificate bundle or key larger than 1 MiB is not one: refuse, bounded memory
CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates start a little in the past: nodes' clocks differ
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DNS = re.compile(r"^(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                  r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$")


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a (verified) certificate names. ``role``/``cluster`` are None when it does not say."""

    host_id: str | None
    role: str | None
    cluster: str | None
    serial: int
    fingerprint: str  # sha256 of the DER certificate, hex
    not_after: dt.datetime

    def is_member(self, cluster: str | None = None, roles: tuple[str, ...] | set[str] | None = None) -> bool:
        """True when the certificate names a role (of ``roles``, if given) and ``cluster`` (if given)."""
        if self.role is None or self.host_id is None:
            return False
        if roles is not None and self.role not in roles:
            return False
        return cluster is None or self.cluster == cluster


@dataclasses.dataclass(frozen=True)
class Issued:
    """A freshly issued member certificate with its private key, both PEM."""

    cert: x509.Certificate
    cert_pem: bytes
    key_pem: bytes


def check_name(what: str, value: str) -> str:
    """A cluster name or host id: it goes into a URI path and a subject, so a small alphabet only."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise UsageError(f"bad {what} {value!r}: use 1-128 of A-Z a-z 0-9 . _ - (starting with a letter or digit)")
    return value


def spiffe_id(cluster: str, role: str, host_id: str) -> str:
    return f"spiffe://{SPIFFE_DOMAIN}/{cluster}/{role}/{host_id}"


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _sign_hash(key):
    """The digest to sign with: none for EdDSA keys, SHA-256 otherwise."""
    return None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------- files


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` so that readers see the old file or the new one.

    The temporary file is created with ``mode`` from the start (O_EXCL, never a moment more
    readable), fsynced, renamed over ``path`` (a symlink at ``path`` is replaced, never followed),
    then the directory is fsynced so the rename survives a crash.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; keys must be exactly 0600
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file, at most :data:`MAX_PEM`, with a clear error when missing."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM + 1)
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise StorageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_PEM:
        raise InvalidInput(f"{what} {path} is larger than {MAX_PEM} bytes: not a PEM file")
    return data


def load_certificates(data: bytes, what: str = "certificate") -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (at least one)."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InvalidInput(f"{what}: not a PEM certificate: {exc}") from None
    if not certs:
        raise InvalidInput(f"{what}: no certificate found")
    return certs


def load_private_key(data: bytes, what: str = "private key"):
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise InvalidInput(f"{what} is encrypted: remora needs an unencrypted PEM key (file mode 0600)") from None
    except ValueError as exc:
        raise InvalidInput(f"{what}: not a PEM private key: {exc}") from None


def _mkdir_private(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {directory}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------- the CA


@dataclasses.dataclass
class CertificateAuthority:
    """A CA certificate and its key: what ``issue`` signs with. ``bundle_pem`` is what members trust."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    cluster: str
    bundle_pem: bytes

    def issue(self, role: str, host_id: str, *, dns: tuple[str, ...] | list[str] = (),
              ips: tuple[str, ...] | list[str] = (), days: int = MEMBER_DAYS, cluster: str | None = None,
              not_before: dt.datetime | None = None) -> Issued:
        """A member certificate for ``host_id`` in ``role`` with the given DNS and IP SANs.

        ``not_before`` exists for tests (an already expired certificate); it defaults to now minus
        :data:`CLOCK_SKEW`. The certificate never outlives the CA.
        """
        if role not in ROLES:
            raise UsageError(f"bad role {role!r}: one of {', '.join(ROLES)}")
        check_name("host id", host_id)
        cluster = check_name("cluster name", cluster or self.cluster)
        if not isinstance(days, int) or days < 1:
            raise UsageError(f"bad validity {days!r}: a number of days >= 1")
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(cluster, role, host_id))]
        for name in dns:
            if not _DNS.match(name) or len(name) > 253:
                raise UsageError(f"bad DNS name {name!r}")
            sans.append(x509.DNSName(name))
        for ip in ips:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError:
                raise UsageError(f"bad IP address {ip!r}") from None
        start = not_before or (_now() - CLOCK_SKEW)
        end = min(start + CLOCK_SKEW + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        if end <= start:
            raise UsageError("the CA has expired: renew it before issuing (docs/pki.md)")
        key = generate_key()
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if role == "client" else \
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"remora {cluster}"),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                             x509.NameAttribute(NameOID.COMMON_NAME, host_id)])
        cert = (x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(self.cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start)
                .not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, _sign_hash(self.key)))
        return Issued(cert=cert, cert_pem=cert_pem(cert), key_pem=key_pem(key))


def init_ca(directory: Path | str, cluster: str = DEFAULT_CLUSTER, days: int = CA_DAYS,
            force: bool = False) -> CertificateAuthority:
    """Create a cluster CA in ``directory``: ``ca.pem`` (0644) and ``ca-key.pem`` (0600).

    Refuses to replace an existing CA key unless ``force``: every member certificate depends on it.
    """
    directory = Path(directory)
    check_name("cluster name", cluster)
    if not isinstance(days, int) or days < 1:
        raise UsageError(f"bad validity {days!r}: a number of days >= 1")
    if (directory / CA_KEY).exists() and not force:
        raise UsageError(f"a CA already exists in {directory} ({CA_KEY}); replacing it invalidates every "
                         "member certificate: pass --force if that is what you want")
    _mkdir_private(directory)
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"remora {cluster}"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"remora cluster CA {cluster}")])
    start = _now() - CLOCK_SKEW
    cert = (x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + CLOCK_SKEW + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{SPIFFE_DOMAIN}/{cluster}")]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    atomic_write(directory / CA_KEY, key_pem(key), 0o600)
    atomic_write(directory / CA_CERT, cert_pem(cert), 0o644)
    return CertificateAuthority(cert=cert, key=key, cluster=cluster, bundle_pem=cert_pem(cert))


def load_ca(directory: Path | str, cluster: str | None = None) -> CertificateAuthority:
    """The CA in ``directory`` (``ca.pem`` + ``ca-key.pem``), made by ``init_ca`` or by any other tool.

    ``ca.pem`` may be a bundle: the certificate whose public key matches ``ca-key.pem`` signs, the
    whole bundle is what members trust (e.g. old and new CA during a CA rotation). The cluster name
    comes from ``cluster``, else from the CA's own ``spiffe://remora/<cluster>`` SAN, else "default".
    """
    directory = Path(directory)
    missing = [n for n in (CA_CERT, CA_KEY) if not (directory / n).exists()]
    if missing:
        raise NotFound(f"no cluster CA in {directory}: {' and '.join(missing)} missing (run 'remora certs init "
                       f"--dir {directory}', or put an existing PEM CA there as {CA_CERT} + {CA_KEY})")
    bundle = read_pem(directory / CA_CERT, "CA certificate")
    certs = load_certificates(bundle, f"CA certificate {directory / CA_CERT}")
    key = load_private_key(read_pem(directory / CA_KEY, "CA key"), f"CA key {directory / CA_KEY}")
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey,
                            ed448.Ed448PrivateKey)):
        raise InvalidInput(f"CA key {directory / CA_KEY}: unsupported key type {type(key).__name__}")
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    signer = next((c for c in certs if c.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == pub), None)
    if signer is None:
        raise InvalidInput(f"{directory / CA_KEY} does not belong to any certificate of {directory / CA_CERT}")
    try:
        bc = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise InvalidInput(f"{directory / CA_CERT} is not a CA certificate (basicConstraints CA:TRUE missing)")
    return CertificateAuthority(cert=signer, key=key,
                                cluster=check_name("cluster name", cluster or _ca_cluster(signer)), bundle_pem=bundle)


def _ca_cluster(cert: x509.Certificate) -> str:
    for uri in _uris(cert):
        parts = urlsplit(uri)
        path = parts.path.strip("/").split("/")
        if parts.scheme == "spiffe" and parts.netloc == SPIFFE_DOMAIN and len(path) == 1 and _NAME.match(path[0]):
            return path[0]
    return DEFAULT_CLUSTER


def write_member(out_dir: Path | str, issued: Issued, ca_bundle_pem: bytes) -> dict[str, Path]:
    """Write ``ca.pem``, ``key.pem`` (0600) and ``cert.pem`` into ``out_dir``, each atomically.

    The key goes first and the certificate last: a reloader that reads a new key with the old
    certificate sees a mismatch and keeps what it has until the certificate follows.
    """
    out_dir = Path(out_dir)
    _mkdir_private(out_dir)
    paths = {"ca": out_dir / CA_CERT, "key": out_dir / KEY, "cert": out_dir / CERT}
    atomic_write(paths["ca"], ca_bundle_pem, 0o644)
    atomic_write(paths["key"], issued.key_pem, 0o600)
    atomic_write(paths["cert"], issued.cert_pem, 0o644)
    return paths


# ---------------------------------------------------------------- reading certificates


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _attr(name: x509.Name, oid) -> str | None:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else None


def identity_of(cert: x509.Certificate) -> Identity:
    """Who ``cert`` names: from its ``spiffe://remora/<cluster>/<role>/<host-id>`` SAN, else OU/CN.

    Call it only on a certificate the TLS stack has verified against the cluster CA; it checks
    nothing about trust itself. A certificate that names no known role gets ``role=None``.
    """
    host = role = cluster = None
    for uri in _uris(cert):
        parts = urlsplit(uri)
        path = parts.path.strip("/").split("/")
        if parts.scheme == "spiffe" and parts.netloc == SPIFFE_DOMAIN and len(path) == 3 \
                and path[1] in ROLES and all(_NAME.match(p) for p in (path[0], path[2])):
            cluster, role, host = path
            break
    else:
        ou = _attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
        cn = _attr(cert.subject, NameOID.COMMON_NAME)
        if ou in ROLES and cn and _NAME.match(cn):
            role, host = ou, cn
    return Identity(host_id=host, role=role, cluster=cluster, serial=cert.serial_number,
                    fingerprint=fingerprint(cert), not_after=cert.not_valid_after_utc)


def identity_from_der(der: bytes) -> Identity:
    return identity_of(x509.load_der_x509_certificate(der))


def identity_from_pem(pem: bytes) -> Identity:
    return identity_of(x509.load_pem_x509_certificate(pem))


def describe(cert: x509.Certificate) -> dict:
    """Everything ``remora certs show`` prints about one certificate, JSON-friendly."""
    ident = identity_of(cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [f"URI:{v}" for v in san.get_values_for_type(x509.UniformResourceIdentifier)] + \
               [f"DNS:{v}" for v in san.get_values_for_type(x509.DNSName)] + \
               [f"IP:{v}" for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        sans = []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        names = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        eku = [names.get(u, u.dotted_string) for u in usages]
    except x509.ExtensionNotFound:
        eku = []
    pub = cert.public_key()
    key_type = (f"EC {pub.curve.name}" if isinstance(pub, ec.EllipticCurvePublicKey)
                else f"RSA {pub.key_size}" if isinstance(pub, rsa.RSAPublicKey) else type(pub).__name__.lstrip("_"))
    now = _now()
    return {
        "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(), "ca": is_ca,
        "role": ident.role, "host_id": ident.host_id, "cluster": ident.cluster, "sans": sans,
        "extended_key_usage": eku, "key": key_type,
        "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat(),
        "expired": not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc),
        "days_left": (cert.not_valid_after_utc - now).days,
        "serial": format(cert.serial_number, "x"), "sha256": ident.fingerprint,
    }
