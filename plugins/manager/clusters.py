"""Scheduler clusters and their scopes, and the rule that matches a peer to the best cluster.

A peer (or seed peer) describes itself by IP, hostname, IDC and location; every cluster declares
scopes. Each cluster gets a score, the sum of the weights of the scopes the peer matches:

=================  ======  ==============================================================
scope              weight  matches when
=================  ======  ==============================================================
CIDR               0.40    the peer's IP is inside one of the cluster's CIDRs
hostname regex     0.30    one of the cluster's regexes fully matches the peer's hostname
IDC                0.20    the peer's IDC equals one of the cluster's IDCs (case-insensitive)
location prefix    0.10    scaled by the shared leading '|'-separated elements of the two
                           locations (``cn|hz|a`` vs ``cn|hz|b`` share 2 of 3 = 0.0667)
=================  ======  ==============================================================

Network position (CIDR) outranks naming (hostname) which outranks the coarser IDC and location, as
in Dragonfly's searcher. Only clusters with at least one active scheduler are candidates, so a
cluster whose schedulers all died stops being chosen at the peer's next refresh. Ties (and peers
that match nothing) go to the default cluster, then to the lowest id.
"""
from __future__ import annotations

import ipaddress
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

WEIGHTS = {"cidr": 0.40, "hostname": 0.30, "idc": 0.20, "location": 0.10}
MAX_LOCATION_DEPTH = 5


class Scopes(BaseModel):
    """What a cluster serves; every field is validated (bad CIDR or regex → 422)."""

    model_config = ConfigDict(extra="forbid")
    idc: list[str] = Field(default_factory=list, max_length=64)
    location: str = Field(default="", max_length=255)
    cidrs: list[str] = Field(default_factory=list, max_length=256)
    hostnames: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("idc")
    @classmethod
    def _idc(cls, v: list[str]) -> list[str]:
        for item in v:
            if not item or len(item) > 128:
                raise ValueError("an IDC is 1..128 characters")
        return v

    @field_validator("location")
    @classmethod
    def _location(cls, v: str) -> str:
        if v and len(v.split("|")) > MAX_LOCATION_DEPTH:
            raise ValueError(f"a location has at most {MAX_LOCATION_DEPTH} '|'-separated elements")
        return v

    @field_validator("cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        out = []
        for item in v:
            try:
                out.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError as exc:
                raise ValueError(f"bad CIDR {item!r}: {exc}") from None
        return out

    @field_validator("hostnames")
    @classmethod
    def _hostnames(cls, v: list[str]) -> list[str]:
        for item in v:
            if not item or len(item) > 255:
                raise ValueError("a hostname regex is 1..255 characters")
            try:
                re.compile(item)
            except re.error as exc:
                raise ValueError(f"bad hostname regex {item!r}: {exc}") from None
        return v


class PeerInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ip: str = ""
    hostname: str = ""
    idc: str = ""
    location: str = ""


def location_score(a: str, b: str) -> float:
    """Shared leading elements of two 'a|b|c' locations over the longer one, in [0, 1]."""
    if not a or not b:
        return 0.0
    xa, xb = a.split("|")[:MAX_LOCATION_DEPTH], b.split("|")[:MAX_LOCATION_DEPTH]
    shared = 0
    for p, q in zip(xa, xb):
        if p != q:
            break
        shared += 1
    return shared / max(len(xa), len(xb))


def score(scopes: dict, peer: PeerInfo) -> float:
    total = 0.0
    if peer.ip and scopes.get("cidrs"):
        try:
            addr = ipaddress.ip_address(peer.ip)
        except ValueError:
            addr = None
        if addr is not None and any(addr in ipaddress.ip_network(c, strict=False) for c in scopes["cidrs"]
                                    if ipaddress.ip_network(c, strict=False).version == addr.version):
            total += WEIGHTS["cidr"]
    if peer.hostname and any(re.fullmatch(rx, peer.hostname) for rx in scopes.get("hostnames") or ()):
        total += WEIGHTS["hostname"]
    if peer.idc and peer.idc.lower() in {i.lower() for i in scopes.get("idc") or ()}:
        total += WEIGHTS["idc"]
    total += WEIGHTS["location"] * location_score(peer.location, scopes.get("location") or "")
    return round(total, 6)


def rank(clusters: list, peer: PeerInfo) -> list[tuple[float, object]]:
    """Clusters (objects with .id, .scopes, .is_default) best first, each with its score."""
    scored = [(score(c.scopes or {}, peer), c) for c in clusters]
    scored.sort(key=lambda sc: (-sc[0], not sc[1].is_default, sc[1].id))
    return scored
