"""The mesh's public-key infrastructure: a cluster CA, member certificates and mutual TLS.

Peers, schedulers and the manager talk to each other only over TLS with certificates issued by one
cluster CA (``remora certs init|issue``, or any PEM CA). :mod:`remora.pki.ca` makes and reads the
certificates, :mod:`remora.pki.tls` turns ``ca.pem`` + ``cert.pem`` + ``key.pem`` into ``ssl`` and
grpc credentials that require a member certificate on both sides, tells who the other side is, and
reloads rotated files without a restart. See docs/pki.md.

Importing this package is cheap; the submodules import ``cryptography`` and ``grpc`` themselves.
"""
from __future__ import annotations

ROLES = ("peer", "scheduler", "manager", "client")
"""What a member does; encoded in its certificate (URI SAN and subject OU)."""

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
CERT = "cert.pem"
KEY = "key.pem"
