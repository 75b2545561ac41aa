"""The peer under a manager: scheduler list, dynamic config and blocklist, applied without a restart.

Why here and not in daemon.py: the daemon wires listeners; this module decides what the manager's
answers mean for a running peer. :class:`ManagedPeer` runs the manager client's
:class:`~remora.plugins.manager.client.Agent` rounds (register, keep alive with the config version
applied and the registry fallbacks by cause, ask for schedulers, fetch the config) in a worker thread
and applies each answer on the daemon's event loop:

* schedulers: the scheduler client's ring is replaced (a dead scheduler leaves it at the first round
  after the manager marked it inactive); an empty list means "no scheduler": pulls go to the registry,
  counted as ``no_scheduler``. The last answer is kept in ``<data-dir>/manager-state.json``, so a
  peer restarted while the manager is down still uses the last known schedulers and config.
* dynamic config (version >= 1; version 0 means "the manager has none", the flags stay in force):
  upload concurrency (``upload_concurrency_limit``, also told to the scheduler), the upload rate given
  to the scheduler for its choice of parents (``upload_rate_limit``), piece size bounds, GC watermarks
  and interval, the blocklist. ``download_rate_limit`` is shown but not enforced by the peer yet.
* blocklist: content (repository, tag, digest) the mesh does not carry. The mirror refuses it with 403
  DENIED naming the rule and config version (containerd's hosts.toml then has the registry itself as
  the fallback server), the upload port refuses its pieces, and each refusal is counted as a registry
  fallback of reason ``blocklisted``.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import time

from aiohttp import web

from remora.piecelayout import MAX_PIECE_SIZE, MIN_PIECE_SIZE

from .config import Watermark, set_piece_bounds

log = logging.getLogger(__name__)

#: back-to-source reasons that are not a bypass of the mesh: the scheduler chose this peer as the seed.
NOT_FALLBACKS = ("seed", "reseed")
_BLOB = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_MANIFEST = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")


class Blocklist:
    """Repositories, tags and digests from the dynamic config; :meth:`match` says which rule hits."""

    def __init__(self, body: dict | None = None, version: int = 0):
        body = body or {}
        self.repositories = set(body.get("repositories") or [])
        self.tags = set(body.get("tags") or [])
        self.digests = set(body.get("digests") or [])
        self.version = version

    def __bool__(self) -> bool:
        return bool(self.repositories or self.tags or self.digests)

    def match(self, registry: str = "", repository: str = "", tag: str = "", digest: str = "") -> str:
        if digest and digest in self.digests:
            return f"digest {digest}"
        if repository and (repository in self.repositories or f"{registry}/{repository}" in self.repositories):
            return f"repository {repository}"
        if tag and tag in self.tags:
            return f"tag {tag}"
        return ""

    def message(self, rule: str) -> str:
        return (f"blocklisted by the cluster's dynamic config v{self.version} ({rule}): the P2P mirror does not "
                "carry it; pull it from the registry directly")


def fallbacks(metrics) -> dict[str, int]:
    """Registry fallbacks since start, by cause (what bypassed the mesh and why)."""
    out: dict[str, int] = {}
    for metric in metrics.registry.collect():
        if metric.name != "remora_peer_back_to_source":
            continue
        for s in metric.samples:
            reason = s.labels.get("reason", "")
            if s.name.endswith("_total") and reason and reason not in NOT_FALLBACKS and s.value:
                out[reason[:64]] = int(s.value)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:32])


def read_join_token(path) -> str:
    """The manager's join token from ``path`` (first line); a usage error when unreadable or empty."""
    from pathlib import Path

    from remora.errors import UsageError

    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read --manager-token-file {path}: {exc.strerror or exc}") from None
    if not token or len(token) > 512 or any(c.isspace() for c in token):
        raise UsageError(f"--manager-token-file {path}: no join token in it (one line, 'rmj_...')")
    return token


def member_hostname(host_id: str) -> str:
    """The manager's hostname field (a DNS-like name) from our host id."""
    name = re.sub(r"[^A-Za-z0-9.\-_]", "-", host_id).strip("-._")[:255]
    return name or "peer"


class ManagedPeer:
    def __init__(self, daemon, url: str, token: str):
        from remora.plugins.manager.client import Agent, ManagerClient

        cfg = daemon.cfg
        self.d = daemon
        self.url = url
        self.client = ManagerClient(url, token, timeout=3.0, state_file=cfg.data_dir / "manager-state.json",
                                    tls_dir=cfg.tls_dir)
        ip = daemon.host.ip
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            from remora.errors import UsageError

            raise UsageError(f"the manager needs this peer's IP address (--advertise IP), not {ip!r}") from None
        from remora import __version__

        self.registration = {"type": "seed_peer" if cfg.seed_peer else "peer", "hostname": member_hostname(cfg.host_id),
                             "ip": ip, "port": daemon.host.upload_port, "api_port": daemon.mirror_port,
                             "idc": cfg.idc, "location": cfg.location, "version": __version__}
        self._answer: dict | None = None
        self._config: tuple[int, dict] | None = None
        self.agent = Agent(self.client, self.registration, on_schedulers=self._got_schedulers,
                           on_config=self._got_config, load=lambda: float(daemon.upload.active),
                           fallbacks=lambda: fallbacks(daemon.metrics))
        self.schedulers_answer: dict = {}
        self.config_version = 0
        self.config_scope = "flags"
        self.config: dict = {}
        self.applied_at = 0.0
        self.blocklist = Blocklist()
        self.static = {"upload_slots": cfg.upload_slots, "upload_bandwidth": cfg.upload_bandwidth,
                       "gc_high": cfg.gc_high, "gc_low": cfg.gc_low, "gc_interval": cfg.gc_interval,
                       "offline_tag_max_age": cfg.offline_tag_max_age}

    # called in the agent's worker thread: only hand the answer over
    def _got_schedulers(self, answer: dict) -> None:
        self._answer = answer
        if answer.get("cluster") and not answer.get("stale"):
            # the config of the cluster we were matched to (else the global one) applies to us
            self.client.cluster_id = answer["cluster"]["id"]

    def _got_config(self, version: int, body: dict) -> None:
        self._config = (version, body)

    def apply_last_known(self) -> None:
        """Before serving: the last answers kept on disk (a restart while the manager is down)."""
        known = self.client.state
        if known.get("schedulers") is not None:
            self._answer = {**known["schedulers"], "stale": True}
        if known.get("config") is not None:
            self._config = (known["config"]["version"], known["config"]["config"])
        self.apply()

    async def first_round(self) -> None:
        """One round before the peer serves (Agent.first_round_async)."""
        await self.agent.first_round_async(self.apply, "peer")

    async def run(self) -> None:
        await self.agent.run_async(self.apply)

    def apply(self) -> None:
        """Apply what the last round brought (on the event loop)."""
        answer, self._answer = self._answer, None
        if answer is not None:
            self.schedulers_answer = answer
            addresses = [_address(m) for m in answer.get("schedulers") or []]
            self.d.set_schedulers(addresses, "manager (last known, manager unreachable)" if answer.get("stale")
                                  else "manager")
        config, self._config = self._config, None
        if config is not None:
            self._apply_config(*config)
        self.d.metrics.manager_up.set(1 if self.client.last_error == "" and self.client.last_ok else 0)

    def _apply_config(self, version: int, body: dict) -> None:
        cfg, d = self.d.cfg, self.d
        if version < 1:
            return   # the manager has no config: the flags stay in force
        peer = body.get("peer") or {}
        slots = int(peer.get("upload_concurrency_limit") or self.static["upload_slots"])
        d.upload.slots = slots
        d.host.upload_slots = slots
        # how long a kept tag record answers while the registry is unreachable (offline.py); the flag's
        # value when the manager's config does not name one
        max_age = peer.get("offline_tag_max_age_seconds")
        d.tasks.kept.set_tag_max_age(float(max_age) if isinstance(max_age, (int, float)) and max_age >= 0
                                     else self.static["offline_tag_max_age"])
        rate = int(peer.get("upload_rate_limit") or 0)
        d.host.upload_bandwidth = rate or self.static["upload_bandwidth"]
        # a field the config leaves out is the flag's (or the built-in) value again, not the last version's
        pieces = body.get("piece_size") or {}
        set_piece_bounds(int(pieces.get("min") or MIN_PIECE_SIZE), int(pieces.get("max") or MAX_PIECE_SIZE))
        gc = body.get("gc") or {}
        if gc.get("high_watermark_percent"):
            cfg.gc_high = Watermark(percent=float(gc["high_watermark_percent"]))
            cfg.gc_low = Watermark(percent=float(gc.get("low_watermark_percent") or 0))
        else:
            cfg.gc_high, cfg.gc_low = self.static["gc_high"], self.static["gc_low"]
        cfg.gc_interval = float(gc.get("interval_seconds") or self.static["gc_interval"])
        self.blocklist = Blocklist(body.get("blocklist"), version)
        self.config, self.config_version, self.applied_at = body, version, time.time()
        self.config_scope = (self.client.state.get("config") or {}).get("scope", "")
        d.metrics.config_version.set(version)
        log.info("dynamic config v%d (%s) applied: upload slots %d, piece size %s-%s, gc %s/%s every %.0fs, "
                 "blocklist %d repositories %d tags %d digests", version, self.config_scope, slots, pieces.get("min"),
                 pieces.get("max"), cfg.gc_high, cfg.gc_low, cfg.gc_interval, len(self.blocklist.repositories),
                 len(self.blocklist.tags), len(self.blocklist.digests))

    # -- the blocklist at the mirror and the upload port ------------------------------------------------
    def mirror_guard(self):
        @web.middleware
        async def blocklist_guard(request: web.Request, handler):
            bl = self.blocklist
            if bl:
                registry = request.query.get("ns", "")
                m = _BLOB.match(request.path)
                rule = ""
                if m:
                    rule = bl.match(registry, m["name"], digest=m["digest"])
                else:
                    m = _MANIFEST.match(request.path)
                    if m:
                        ref = m["ref"]
                        rule = bl.match(registry, m["name"], digest=ref if ref.startswith("sha256:") else "",
                                        tag="" if ref.startswith("sha256:") else ref)
                if rule:
                    self.d.metrics.back_to_source.labels("blocklisted").inc()
                    log.info("mirror: %s refused: %s", request.path[:200], bl.message(rule))
                    return web.json_response({"errors": [{"code": "DENIED", "message": bl.message(rule),
                                                          "detail": {"rule": rule, "config_version": bl.version}}]},
                                             status=403)
            return await handler(request)

        return blocklist_guard

    def wrap_authorize(self, authorize):
        """The upload port's check: blocklisted digests (and repositories a child names) are refused."""
        from .access import SOURCE_HEADER, AccessDenied, parse_source

        async def authorize_unless_blocklisted(digest: str, headers):
            bl = self.blocklist
            if bl:
                registry, repository = "", ""
                try:
                    registry, repository = parse_source(headers.get(SOURCE_HEADER, ""))
                except Exception:  # noqa: BLE001 - the access check below refuses a bad header anyway
                    pass
                rule = bl.match(registry, repository, digest=digest)
                if rule:
                    raise AccessDenied(bl.message(rule), status=403)
            return await authorize(digest, headers)

        return authorize_unless_blocklisted

    def status(self) -> dict:
        c = self.client
        answer = self.schedulers_answer
        return {"url": self.url, "member_id": c.member_id, "reachable": bool(c.last_ok) and not c.last_error,
                "last_answer_age": round(time.time() - c.last_ok, 1) if c.last_ok else None,
                "error": c.last_error, "cluster": (answer.get("cluster") or {}).get("name"),
                "stale": bool(answer.get("stale")), "refresh_interval": self.agent.refresh or c.interval,
                "config": {"version": self.config_version, "scope": self.config_scope, "applied_at": self.applied_at,
                           "effective": self.effective()}}

    def effective(self) -> dict:
        """The values in force now (from the manager's config, else the flags)."""
        cfg, d = self.d.cfg, self.d
        from .config import piece_bounds

        lo, hi = piece_bounds()
        peer = self.config.get("peer") or {}
        return {"upload_concurrency_limit": d.upload.slots, "upload_rate_limit": peer.get("upload_rate_limit", 0),
                "download_rate_limit": peer.get("download_rate_limit", 0), "download_rate_limit_enforced": False,
                "piece_size": {"min": lo, "max": hi}, "offline_tag_max_age_seconds": d.tasks.kept.tag_max_age,
                "gc": {"high": str(cfg.gc_high), "low": str(cfg.gc_low), "interval_seconds": cfg.gc_interval},
                "blocklist": {"repositories": sorted(self.blocklist.repositories), "tags": sorted(self.blocklist.tags),
                              "digests": sorted(self.blocklist.digests)}}


def _address(member: dict) -> str:
    ip = member["ip"]
    return f"[{ip}]:{member['port']}" if ":" in ip else f"{ip}:{member['port']}"
