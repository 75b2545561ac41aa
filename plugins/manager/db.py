"""Storage of the manager: SQLAlchemy 2 models, the engine and schema migrations.

One embedded SQLite file by default (one command, nothing to install); PostgreSQL when several
manager replicas must share state. Times are float seconds since the epoch, read from an injectable
clock, so tests can move time without sleeping and both databases store them the same way.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from remora.errors import UsageError

DEFAULT_DB = "sqlite:////var/lib/remora/manager/manager.db"


class Clock:
    """Wall clock; tests pass a :class:`FakeClock` to age keepalives and tokens on demand."""

    def now(self) -> float:
        return time.time()


class FakeClock(Clock):
    def __init__(self, start: float = 1_800_000_000.0):
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # root | guest
    created_at: Mapped[float] = mapped_column(Float)


class Token(Base):
    """A personal access token; only its sha256 is stored (tokens are 256-bit random, so no KDF)."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    scopes: Mapped[list] = mapped_column(JSON)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class JoinToken(Base):
    """What a scheduler or peer presents to register and keep alive (hashed like PATs)."""

    __tablename__ = "join_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    cluster_id: Mapped[int | None] = mapped_column(ForeignKey("clusters.id", ondelete="CASCADE"), nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class Cluster(Base):
    __tablename__ = "clusters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    scopes: Mapped[dict] = mapped_column(JSON)  # {"idc": [...], "location": str, "cidrs": [...], "hostnames": [...]}
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Member(Base):
    """A scheduler, seed peer or peer known to the manager; state is derived from last_seen."""

    __tablename__ = "members"
    # ids are never reused (AUTOINCREMENT on SQLite): a deleted member's late keepalive must not
    # refresh a newcomer, and peers key job tasks by job/node id
    __table_args__ = (UniqueConstraint("type", "hostname", "ip", "port", name="uq_member_identity"),
                      {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(16), index=True)  # scheduler | seed_peer | peer
    hostname: Mapped[str] = mapped_column(String(255))
    ip: Mapped[str] = mapped_column(String(64))
    port: Mapped[int] = mapped_column(Integer)
    api_port: Mapped[int] = mapped_column(Integer, default=0)
    idc: Mapped[str] = mapped_column(String(128), default="")
    location: Mapped[str] = mapped_column(String(255), default="")
    version: Mapped[str] = mapped_column(String(64), default="")
    cluster_id: Mapped[int | None] = mapped_column(ForeignKey("clusters.id", ondelete="SET NULL"), nullable=True,
                                                   index=True)
    offline: Mapped[bool] = mapped_column(Boolean, default=False)
    offline_reason: Mapped[str] = mapped_column(Text, default="")
    last_seen: Mapped[float] = mapped_column(Float)
    registered_at: Mapped[float] = mapped_column(Float)
    stats: Mapped[dict] = mapped_column(JSON, default=dict)  # load, config_version, fallbacks, ...


class ConfigVersion(Base):
    """One immutable version of the dynamic config of a scope ('global' or 'cluster:<id>')."""

    __tablename__ = "config_versions"
    __table_args__ = (UniqueConstraint("scope", "version", name="uq_config_scope_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(16))  # preheat | sync-peers | delete-task | gc
    state: Mapped[str] = mapped_column(String(16), index=True)  # running | succeeded | failed | cancelled
    args: Mapped[dict] = mapped_column(JSON)
    scope: Mapped[dict] = mapped_column(JSON)
    max_attempts: Mapped[int] = mapped_column(Integer)
    timeout: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")


class JobNode(Base):
    """Progress of one job on one node: the unit the job engine claims, runs, polls and retries."""

    __tablename__ = "job_nodes"
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id", ondelete="SET NULL"), nullable=True)
    hostname: Mapped[str] = mapped_column(String(255))
    url: Mapped[str] = mapped_column(String(512))
    # pending|running|retry_wait|cancelling|succeeded|failed|cancelled
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    lease_owner: Mapped[str] = mapped_column(String(64), default="")
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_verified: Mapped[int] = mapped_column(BigInteger, default=0)
    blobs: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[str] = mapped_column(Text, default="")


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    detail: Mapped[dict] = mapped_column(JSON)


def make_engine(url: str) -> Engine:
    """An engine for ``url``: SQLite (WAL, busy timeout, foreign keys) or PostgreSQL via psycopg 3."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:"):
        path = url.split("sqlite:///", 1)[1] if "sqlite:///" in url else ""
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create the database directory of {url}: {exc}") from exc
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # pragma: no cover - exercised by every sqlite test
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
        return engine
    if url.startswith("postgresql+psycopg://"):
        return create_engine(url, pool_size=int(os.environ.get("REMORA_MANAGER_POOL", "10")),
                             max_overflow=20, pool_pre_ping=True)
    raise UsageError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://...")


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (run at every start; a no-op when current)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_db(url: str) -> tuple[Engine, sessionmaker]:
    engine = make_engine(url)
    migrate(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)
