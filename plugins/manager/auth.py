"""Users, personal access tokens, join tokens and the audit log.

Roles: ``root`` may change anything; ``guest`` may only read. A personal access token (PAT) carries
scopes: ``cluster`` (clusters, members, dynamic config, join tokens) and ``job`` (jobs); a write
needs the scope of what it changes, a read needs any valid token. Users and tokens themselves are
managed by root tokens only. Tokens are 256-bit random strings; the database holds their sha256
(a leaked database does not leak usable tokens) and a short prefix for display. Peers and
schedulers authenticate with a join token, optionally bound to one cluster.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from remora.plugins.manager.db import AuditEntry, JoinToken, Token, User

ROLES = ("root", "guest")
SCOPES = ("job", "cluster")
PAT_PREFIX, JOIN_PREFIX = "rmt_", "rmj_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


@dataclass
class Principal:
    """Who is calling: a user through one of their tokens."""

    user: str
    role: str
    scopes: tuple[str, ...]
    token_id: int


class AuthFailure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def authenticate(session: Session, token: str | None, now: float) -> Principal:
    """The principal of a bearer PAT, or AuthFailure(401) for a missing/unknown/expired/revoked one."""
    if not token or not token.startswith(PAT_PREFIX) or len(token) > 128:
        raise AuthFailure(401, "a personal access token is required (Authorization: Bearer rmt_...)")
    row = session.scalar(select(Token).where(Token.hash == hash_token(token)))
    if row is None or not hmac.compare_digest(row.hash, hash_token(token)):
        raise AuthFailure(401, "unknown token")
    if row.revoked:
        raise AuthFailure(401, "token revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise AuthFailure(401, "token expired")
    user = session.get(User, row.user_id)
    return Principal(user=user.name, role=user.role, scopes=tuple(row.scopes), token_id=row.id)


def require(principal: Principal, scope: str | None, write: bool) -> None:
    """403 unless the principal may do this: reads need any token, writes root + the scope."""
    if not write:
        return
    if principal.role != "root":
        raise AuthFailure(403, f"user {principal.user} has role {principal.role}: read-only")
    if scope is not None and scope not in principal.scopes:
        raise AuthFailure(403, f"token lacks the {scope!r} scope")


def check_join(session: Session, token: str | None, now: float) -> JoinToken:
    if not token or not token.startswith(JOIN_PREFIX) or len(token) > 128:
        raise AuthFailure(401, "a join token is required (Authorization: Bearer rmj_...)")
    row = session.scalar(select(JoinToken).where(JoinToken.hash == hash_token(token)))
    if row is None:
        raise AuthFailure(401, "unknown join token")
    if row.revoked:
        raise AuthFailure(401, "join token revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise AuthFailure(401, "join token expired")
    return row


def create_token(session: Session, user: User, name: str, scopes: list[str], expires_at: float | None,
                 now: float) -> tuple[str, Token]:
    secret = new_token(PAT_PREFIX)
    row = Token(user_id=user.id, name=name, hash=hash_token(secret), prefix=secret[:12], scopes=sorted(set(scopes)),
                expires_at=expires_at, revoked=False, created_at=now)
    session.add(row)
    session.flush()
    return secret, row


def create_join_token(session: Session, name: str, cluster_id: int | None, expires_at: float | None,
                      now: float) -> tuple[str, JoinToken]:
    secret = new_token(JOIN_PREFIX)
    row = JoinToken(name=name, hash=hash_token(secret), prefix=secret[:12], cluster_id=cluster_id,
                    expires_at=expires_at, revoked=False, created_at=now)
    session.add(row)
    session.flush()
    return secret, row


def audit(session: Session, now: float, actor: str, action: str, target: str, detail: dict | None = None) -> None:
    """Record one change; written in the same transaction as the change, so neither exists alone."""
    session.add(AuditEntry(ts=now, actor=actor, action=action, target=target, detail=detail or {}))


def bootstrap_root(session: Session, token_file: Path | None, now: float) -> str | None:
    """On an empty database create user ``root`` and a PAT with every scope, written to ``token_file``.

    Returns the token (or None when users already exist). The file is created 0600 before the
    secret is written into it.
    """
    if session.scalar(select(User).limit(1)) is not None:
        return None
    user = User(name="root", role="root", created_at=now)
    session.add(user)
    session.flush()
    secret, _ = create_token(session, user, "bootstrap", list(SCOPES), None, now)
    audit(session, now, "manager", "user.bootstrap", "user:root", {"token_file": str(token_file or "")})
    if token_file is not None:
        token_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
    return secret
