"""Versioned dynamic config delivered to schedulers and peers and applied without a restart.

The manager keeps one immutable row per version of each scope: ``global`` and ``cluster:<id>``. A
member receives the newest version of its cluster's scope, else the global one, else the built-in
defaults (version 0). Members poll with the version they hold and get the body only when it changed.
Every field is bounded: an absurd value is refused (422) before it can reach a node.
"""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from remora.plugins.manager.db import ConfigVersion

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DIGEST_RE = r"^sha256:[0-9a-f]{64}$"
REPO_RE = r"^[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$"
TAG_RE = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidate_parent_limit: int = Field(4, ge=1, le=20, description="parents handed to a peer per request")
    filter_parent_limit: int = Field(40, ge=1, le=1000, description="peers sampled per decision")

    @model_validator(mode="after")
    def _order(self):
        if self.candidate_parent_limit > self.filter_parent_limit:
            raise ValueError("candidate_parent_limit must not exceed filter_parent_limit")
        return self


class PeerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    upload_rate_limit: int = Field(0, ge=0, le=100 * GiB, description="bytes/s served to other peers, 0 = unlimited")
    download_rate_limit: int = Field(0, ge=0, le=100 * GiB, description="bytes/s fetched, 0 = unlimited")
    upload_concurrency_limit: int = Field(50, ge=1, le=10_000, description="concurrent uploads (load limit)")
    offline_tag_max_age_seconds: float | None = Field(
        None, ge=0, le=30 * 86400,
        description="while the registry cannot be reached, a tag is answered from the peer's kept record "
                    "no older than this (None: the peer's --offline-tag-max-age; 0: by digest only)")


class Blocklist(BaseModel):
    """Content never served through P2P (fetched from the registry instead, with that reason logged)."""

    model_config = ConfigDict(extra="forbid")
    repositories: list[str] = Field(default_factory=list, max_length=1000)
    tags: list[str] = Field(default_factory=list, max_length=1000)
    digests: list[str] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _syntax(self):
        for repo in self.repositories:
            if len(repo) > 255 or not re.match(REPO_RE, repo):
                raise ValueError(f"bad repository {repo!r}")
        for tag in self.tags:
            if not re.match(TAG_RE, tag):
                raise ValueError(f"bad tag {tag!r}")
        for dig in self.digests:
            if not re.match(DIGEST_RE, dig):
                raise ValueError(f"bad digest {dig!r}: expected sha256:<64 lowercase hex>")
        return self


class PieceSize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: int = Field(1 * MiB, ge=64 * KiB, le=64 * MiB)
    max: int = Field(16 * MiB, ge=64 * KiB, le=64 * MiB)

    @model_validator(mode="after")
    def _order(self):
        for v in (self.min, self.max):
            if v & (v - 1):
                raise ValueError(f"piece size {v} is not a power of two")
        if self.min > self.max:
            raise ValueError("piece_size.min must not exceed piece_size.max")
        return self


class GCConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    high_watermark_percent: int = Field(85, ge=1, le=100, description="start evicting above this disk use")
    low_watermark_percent: int = Field(70, ge=0, le=99, description="evict down to this disk use")
    interval_seconds: int = Field(60, ge=1, le=86_400)

    @model_validator(mode="after")
    def _order(self):
        if self.low_watermark_percent >= self.high_watermark_percent:
            raise ValueError("gc.low_watermark_percent must be below gc.high_watermark_percent")
        return self


class DynamicConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    peer: PeerConfig = Field(default_factory=PeerConfig)
    blocklist: Blocklist = Field(default_factory=Blocklist)
    piece_size: PieceSize = Field(default_factory=PieceSize)
    gc: GCConfig = Field(default_factory=GCConfig)


def scope_key(cluster_id: int | None) -> str:
    return "global" if cluster_id is None else f"cluster:{cluster_id}"


def latest(session: Session, scope: str) -> ConfigVersion | None:
    return session.scalars(select(ConfigVersion).where(ConfigVersion.scope == scope)
                           .order_by(ConfigVersion.version.desc()).limit(1)).first()


def effective(session: Session, cluster_id: int | None) -> tuple[str, int, dict]:
    """(scope, version, body) a member of ``cluster_id`` should run with."""
    for scope in ([scope_key(cluster_id)] if cluster_id is not None else []) + ["global"]:
        row = latest(session, scope)
        if row is not None:
            return scope, row.version, row.body
    return "default", 0, DynamicConfig().model_dump()


def put(session: Session, scope: str, body: DynamicConfig, actor: str, now: float,
        expected_version: int | None = None) -> ConfigVersion:
    """Store a new version; ``expected_version`` guards against lost updates (ValueError on mismatch)."""
    current = session.scalar(select(func.max(ConfigVersion.version)).where(ConfigVersion.scope == scope)) or 0
    if expected_version is not None and expected_version != current:
        raise ValueError(f"config of {scope} is at version {current}, not {expected_version}")
    row = ConfigVersion(scope=scope, version=current + 1, body=body.model_dump(), created_by=actor, created_at=now)
    session.add(row)
    session.flush()
    return row
