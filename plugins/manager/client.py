"""Client of the manager for schedulers and peers: register, keep alive, find schedulers, fetch config.

Small on purpose (requests only, no manager imports) so ``remora peer`` and ``remora scheduler`` can
use it without pulling in the server. The last good answers are kept in memory and, given a
``state_file``, on disk (written atomically), so a node keeps working from its last known scheduler
list and config while the manager is down or restarting; each answer says whether it is ``stale``.

Typical use (a peer)::

    mc = ManagerClient("http://manager:8080", join_token, state_file="/var/lib/remora/manager-state.json")
    agent = Agent(mc, dict(type="peer", hostname=..., ip=..., port=..., api_port=...),
                  on_schedulers=lambda answer: ..., on_config=lambda version, cfg: ...)
    agent.start()        # registers, then keeps alive / refreshes every keepalive interval
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

log = logging.getLogger("remora.manager.client")


class ManagerUnavailable(Exception):
    """The manager could not be reached or failed; callers fall back to their last known state."""


class ManagerClient:
    def __init__(self, url: str, join_token: str, *, timeout: float = 5.0, state_file: str | Path | None = None,
                 tls_dir: str | Path | None = None):
        self.url = url.rstrip("/")
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.headers["Authorization"] = f"Bearer {join_token}"
        if tls_dir is not None:
            # Mutual TLS with the node's member certificate; the manager must present one of the same CA
            # naming the address dialled. Paths, not contents: a rotated certificate is used by the next
            # connection.
            from remora.pki import CA_CERT, CERT, KEY

            d = Path(tls_dir)
            self.http.verify = str(d / CA_CERT)
            self.http.cert = (str(d / CERT), str(d / KEY))
        elif self.url.startswith("https://"):
            raise ValueError("an https:// manager needs the node's TLS directory (cluster CA and certificate)")
        self.timeout = timeout
        self.state_file = Path(state_file) if state_file else None
        self.member_id: int | None = None
        self.cluster_id: int | None = None
        self.interval: float = 10.0
        self.registration: dict | None = None
        self.state = {"schedulers": None, "config": None}
        self.last_ok: float = 0.0     # time.time() of the last answer from the manager
        self.last_error: str = ""
        if self.state_file and self.state_file.exists():
            try:
                loaded = json.loads(self.state_file.read_text())
                self.state.update({k: loaded.get(k) for k in self.state})
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable manager state %s: %s", self.state_file, exc)

    # -------------------------------------------------------------- transport
    def _call(self, method: str, path: str, **kw) -> requests.Response:
        import time

        try:
            r = self.http.request(method, self.url + path, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            self.last_error = f"unreachable: {type(exc).__name__}"
            raise ManagerUnavailable(f"manager {self.url} unreachable: {exc}") from exc
        if r.status_code >= 500:
            self.last_error = f"HTTP {r.status_code}"
            raise ManagerUnavailable(f"manager {self.url}: HTTP {r.status_code}")
        if r.status_code < 400:
            self.last_ok, self.last_error = time.time(), ""
        else:
            self.last_error = f"HTTP {r.status_code}"
        return r

    @staticmethod
    def _ok(r: requests.Response) -> dict:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text[:200]
            if r.status_code in (401, 403):
                raise PermissionError(detail)
            raise ValueError(f"HTTP {r.status_code}: {detail}")
        return r.json()

    def _save(self) -> None:
        if not self.state_file:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.state_file.parent, prefix=".manager-state.")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.state, fh)
        os.replace(tmp, self.state_file)

    # -------------------------------------------------------------- API
    def register(self, **info) -> dict:
        """Register (type, hostname, ip, port, api_port, idc, location, version, cluster)."""
        self.registration = info
        out = self._ok(self._call("POST", "/api/v1/agent/register", json=info))
        self.member_id, self.cluster_id, self.interval = out["id"], out["cluster_id"], float(out["keepalive_interval"])
        return out

    def keepalive(self, load: float = 0.0, config_version: int = 0, fallbacks: dict | None = None) -> dict:
        """Keep alive; registers again when the manager forgot us (404, e.g. deleted by an operator)."""
        if self.member_id is None:
            if self.registration is None:
                raise RuntimeError("register first")
            self.register(**self.registration)
        body = {"load": load, "config_version": config_version, "fallbacks": fallbacks or {}}
        r = self._call("POST", f"/api/v1/agent/{self.member_id}/keepalive", json=body)
        if r.status_code == 404 and self.registration is not None:
            self.register(**self.registration)
            r = self._call("POST", f"/api/v1/agent/{self.member_id}/keepalive", json=body)
        return self._ok(r)

    def certificate(self, role: str, host_id: str, out_dir: str | Path, dns: list[str] | None = None,
                    ips: list[str] | None = None, days: int = 30) -> dict:
        """Get a member certificate from the manager (the cluster CA) and write ca.pem, cert.pem and
        key.pem (0600) atomically into ``out_dir`` (what remora.pki.tls loads and reloads)."""
        from remora.pki import CA_CERT, CERT, KEY
        from remora.pki.ca import atomic_write

        out = self._ok(self._call("POST", "/api/v1/agent/certificate", json={
            "role": role, "host_id": host_id, "dns": dns or [], "ips": ips or [], "days": days}))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / KEY, out["key_pem"].encode(), 0o600)
        atomic_write(out_dir / CERT, out["cert_pem"].encode(), 0o644)
        atomic_write(out_dir / CA_CERT, out["ca_pem"].encode(), 0o644)
        return {"not_after": out["not_after"], "dir": str(out_dir)}

    def schedulers(self, ip: str = "", hostname: str = "", idc: str = "", location: str = "") -> dict:
        """The schedulers to use; the last known answer (``stale: True``) if the manager is down."""
        params = {"ip": ip, "hostname": hostname, "idc": idc, "location": location}
        if self.member_id is not None:
            params["member_id"] = self.member_id
        try:
            out = self._ok(self._call("GET", "/api/v1/agent/schedulers", params=params))
        except ManagerUnavailable as exc:
            if self.state["schedulers"] is None:
                raise
            log.warning("%s: using the last known scheduler list", exc)
            return {**self.state["schedulers"], "stale": True}
        self.state["schedulers"] = out
        self._save()
        return {**out, "stale": False}

    def config(self) -> dict:
        """The effective dynamic config: {version, config, changed, stale}."""
        known = self.state["config"]
        params = {"version": known["version"] if known else -1, "scope": known.get("scope", "") if known else ""}
        if self.cluster_id is not None:
            params["cluster_id"] = self.cluster_id
        try:
            out = self._ok(self._call("GET", "/api/v1/agent/config", params=params))
        except ManagerUnavailable as exc:
            if known is None:
                raise
            log.warning("%s: keeping dynamic config version %s", exc, known["version"])
            return {**known, "changed": False, "stale": True}
        if out["unchanged"]:
            return {**known, "changed": False, "stale": False}
        self.state["config"] = {"version": out["version"], "scope": out["scope"], "config": out["config"]}
        self._save()
        return {**self.state["config"], "changed": True, "stale": False}


class Agent:
    """Background loop: register, then keep alive + fetch config every keepalive period, and (peers)
    refresh the scheduler list every refresh period.

    The manager says both: the keepalive period in its register answer (schedulers and seed peers
    keep alive twice per interval), the refresh period in its scheduler answer (half an interval), so
    a dead scheduler leaves this peer's list within 3 intervals of its death (docs/manager.md).
    """

    def __init__(self, client: ManagerClient, registration: dict, *,
                 on_schedulers: Callable[[dict], None] | None = None,
                 on_config: Callable[[int, dict], None] | None = None,
                 load: Callable[[], float] = lambda: 0.0,
                 fallbacks: Callable[[], dict] = dict):
        self.c, self.registration = client, registration
        self.on_schedulers, self.on_config, self.load, self.fallbacks = on_schedulers, on_config, load, fallbacks
        self.applied_version = 0
        self.refresh: float | None = None   # scheduler refresh period told by the manager
        self._register_failures = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="manager-agent", daemon=True)

    @property
    def wants_schedulers(self) -> bool:
        return self.registration.get("type") in ("peer", "seed_peer") and self.on_schedulers is not None

    def start(self) -> Agent:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)

    def tick(self, keepalive: bool = True) -> None:
        """One round; with the manager down, the last known schedulers and config still apply.
        ``keepalive=False``: only refresh the scheduler list (the rounds between keepalives)."""
        if keepalive:
            try:
                if self.c.member_id is None:
                    self.c.register(**self.registration)
                self.c.keepalive(self.load(), self.applied_version, self.fallbacks())
            except ManagerUnavailable as exc:
                log.warning("manager keepalive: %s", exc)
        if self.wants_schedulers:
            answer = self.c.schedulers(self.registration.get("ip", ""), self.registration.get("hostname", ""),
                                       self.registration.get("idc", ""), self.registration.get("location", ""))
            if answer.get("refresh_interval"):
                self.refresh = float(answer["refresh_interval"])
            self.on_schedulers(answer)
        if not keepalive:
            return
        cfg = self.c.config()
        if (cfg["version"] != self.applied_version or cfg["changed"]) and self.on_config is not None:
            self.on_config(cfg["version"], cfg["config"])
        if cfg["version"] != self.applied_version:
            self.applied_version = cfg["version"]
            # the round's keepalive went out before the new version was applied: tell the manager now,
            # not an interval later (operators watch the version roll out in the member list)
            try:
                self.c.keepalive(self.load(), self.applied_version, self.fallbacks())
            except ManagerUnavailable as exc:
                log.warning("manager keepalive: %s", exc)

    def _next_keepalive(self, started: float, scheduled: float) -> float:
        """When the next full round is due: as scheduled, or sooner while this agent is not registered
        yet (the manager was unreachable or slow): 0.5 s, doubling up to the keepalive interval. Until the
        manager answers once, the interval is only the client's default (10 s), which is no reason to
        leave a starting peer out of the cluster that long."""
        if self.c.member_id is not None:
            self._register_failures = 0
            return min(scheduled, started + self.c.interval)   # the manager's interval, once it has told it
        self._register_failures += 1
        return min(scheduled, started + min(self.c.interval, 0.5 * 2 ** (self._register_failures - 1)))

    def _period(self) -> float:
        """Seconds between rounds: the keepalive period, or the (shorter) scheduler refresh period."""
        if self.wants_schedulers and self.refresh:
            return max(0.05, min(self.c.interval, self.refresh))
        return max(0.05, self.c.interval)

    async def first_round_async(self, after_tick: Callable[[], None], what: str = "daemon") -> None:
        """One round before the daemon serves (its first request already knows the manager's answer),
        then ``after_tick`` on the event loop. A manager problem never stops the daemon from starting:
        the last known state applies."""
        import asyncio

        try:
            await asyncio.to_thread(self.tick)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("manager %s: %s (the %s continues with the last known state, if any)",
                        self.c.url, exc, what)
        after_tick()

    async def run_async(self, after_tick: Callable[[], None] | None = None) -> None:
        """The same loop for an asyncio daemon: each round runs in a worker thread (``requests`` blocks),
        then ``after_tick`` runs on the event loop; until cancelled. The callbacks run in the worker
        thread: they should only hand their answer over (the daemons apply it in ``after_tick``)."""
        import asyncio

        loop = asyncio.get_running_loop()
        next_keepalive = loop.time()   # the caller ran the first full round (or we run it now)
        while True:
            started = loop.time()
            keepalive = started >= next_keepalive - 0.01
            if keepalive:
                # a fixed cadence: a slow round (a loaded manager) must not stretch the keepalive period
                # towards the 3 missed keepalives after which the manager calls us inactive
                next_keepalive = max(next_keepalive + self.c.interval, started + 0.05)
            try:
                await asyncio.to_thread(self.tick, keepalive)
            except (ManagerUnavailable, ValueError, PermissionError) as exc:
                log.warning("manager: %s", exc)
            except Exception:  # the agent must never stop for good
                log.exception("manager agent round failed")
            next_keepalive = self._next_keepalive(started, next_keepalive)
            if after_tick is not None:
                try:
                    after_tick()
                except Exception:
                    log.exception("applying the manager's answer failed")
            wake = min(started + self._period(), next_keepalive)
            await asyncio.sleep(max(0.02, wake - loop.time()))

    def _run(self) -> None:
        next_keepalive = time.monotonic()
        while not self.stop_event.is_set():
            started = time.monotonic()
            keepalive = started >= next_keepalive - 0.01
            if keepalive:
                next_keepalive = max(next_keepalive + self.c.interval, started + 0.05)
            try:
                self.tick(keepalive)
            except (ManagerUnavailable, ValueError, PermissionError) as exc:
                log.warning("manager: %s", exc)
            except Exception:  # the agent must never stop for good
                log.exception("manager agent round failed")
            next_keepalive = self._next_keepalive(started, next_keepalive)
            self.stop_event.wait(max(0.02, min(started + self._period(), next_keepalive) - time.monotonic()))
