"""Versioned dynamic config delivered to schedulers and peers and applied without a restart.

The manager keeps one immutable row per version of each scope: ``global`` and ``cluster:<id>``. A
member receives the newest version of its cluster's scope, else the global one, else the built-in
defaults (version 0). Members poll with the version they hold and get the body only when it changed.
Every field is bounded: an absurd value is refused (422) before it can reach a node.

A field left out (``None``) keeps the daemon's own value (its flag, or the mesh's built-in piece size
bounds): publishing a config that names only a blocklist must not retune anything else. Each default
below is therefore "what a daemon started with no flags runs", never a second opinion of the manager.
"""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from remora.piecelayout import MAX_PIECE_SIZE, MIN_PIECE_SIZE
from remora.plugins.manager.db import ConfigVersion

GiB = 1 << 30
DIGEST_RE = r"^sha256:[0-9a-f]{64}$"
REPO_RE = r"^[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$"
TAG_RE = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidate_parent_limit: int | None = Field(None, ge=1, le=20, description="parents handed to a peer per "
                                               "request (None: the scheduler's --parent-limit)")
    filter_parent_limit: int | None = Field(None, ge=1, le=1000, description="peers sampled per decision "
                                            "(None: the scheduler's --candidate-limit)")

    @model_validator(mode="after")
    def _order(self):
        if (self.candidate_parent_limit is not None and self.filter_parent_limit is not None
                and self.candidate_parent_limit > self.filter_parent_limit):
            raise ValueError("candidate_parent_limit must not exceed filter_parent_limit")
        return self


class PeerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    upload_rate_limit: int = Field(0, ge=0, le=100 * GiB, description="bytes/s a peer serves to others, told to "
                                   "the scheduler for its choice of parents (0: the peer's --upload-bandwidth)")
    download_rate_limit: int = Field(0, ge=0, le=100 * GiB, description="bytes/s fetched, 0 = unlimited")
    upload_concurrency_limit: int | None = Field(None, ge=1, le=10_000, description="concurrent uploads (load "
                                                 "limit; None: the peer's --upload-slots)")
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
    """Bounds of the piece sizes of new blobs, within what every peer and scheduler accepts
    (:mod:`remora.piecelayout`); the defaults are the mesh's built-in bounds."""

    model_config = ConfigDict(extra="forbid")
    min: int = Field(MIN_PIECE_SIZE, ge=MIN_PIECE_SIZE, le=MAX_PIECE_SIZE)
    max: int = Field(MAX_PIECE_SIZE, ge=MIN_PIECE_SIZE, le=MAX_PIECE_SIZE)

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
    high_watermark_percent: int | None = Field(None, ge=1, le=100, description="start evicting above this "
                                               "disk use (None: the peer's --gc-high and --gc-low)")
    low_watermark_percent: int | None = Field(None, ge=0, le=99, description="evict down to this disk use")
    interval_seconds: int | None = Field(None, ge=1, le=86_400, description="None: the peer's --gc-interval")

    @model_validator(mode="after")
    def _order(self):
        if (self.high_watermark_percent is None) != (self.low_watermark_percent is None):
            raise ValueError("gc.high_watermark_percent and gc.low_watermark_percent go together")
        if self.high_watermark_percent is not None and self.low_watermark_percent is not None \
                and self.low_watermark_percent >= self.high_watermark_percent:
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
