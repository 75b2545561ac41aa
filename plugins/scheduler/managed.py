"""The scheduler under a manager: membership (register + keepalives) and dynamic config without restart.

Why: peers learn their schedulers from the manager, which hands out only schedulers that keep alive;
and operators change the parent limits, the piece size bounds and the blocklist for a whole cluster
at once. :class:`ManagedScheduler` runs the manager client's agent rounds in a worker thread and
applies each new config version on the scheduler's event loop:

* ``scheduler.candidate_parent_limit`` -> parents handed out per request; ``filter_parent_limit`` ->
  peers sampled per decision (the selector reads its config at each decision);
* ``piece_size`` -> the piece size bounds layouts are checked against (peers apply the same version);
* ``blocklist.digests`` -> tasks the scheduler does not schedule: every peer asking is sent to the
  registry with reason ``blocklisted`` (counted on both sides);
* version 0 (the manager has no config): the flags stay in force.

The version and the values in force are exported as metrics (``remora_scheduler_config_version``,
``remora_scheduler_config_value{name}``); the last answers are kept on disk (``--manager-state``), so a
scheduler restarted while the manager is down applies the last config it knew.
"""
from __future__ import annotations

import ipaddress
import logging

from remora.errors import UsageError
from remora.piecelayout import MAX_PIECE_SIZE, MIN_PIECE_SIZE, set_piece_bounds

log = logging.getLogger(__name__)


class ManagedScheduler:
    def __init__(self, server, url: str, token: str, *, cluster: str | None, state_file, tls_dir=None,
                 advertise: str = "", idc: str = "", location: str = "", hostname: str = ""):
        from remora import __version__
        from remora.plugins.manager.client import Agent, ManagerClient

        self.server, self.url = server, url
        self.client = ManagerClient(url, token, timeout=3.0, state_file=state_file, tls_dir=tls_dir)
        self.registration = {"type": "scheduler", "hostname": hostname, "ip": advertise, "port": 0, "idc": idc,
                             "location": location, "version": __version__, "cluster": cluster}
        self.static = {"parent_limit": server.config.selection.parent_limit,
                       "candidate_limit": server.config.selection.candidate_limit}
        self._config: tuple[int, dict] | None = None
        self.version = 0
        self.agent = Agent(self.client, self.registration, on_config=self._got_config,
                           load=lambda: float(len(server.state.peers)))

    def bind(self, address: str) -> None:
        """Fill in the address peers dial (known once the gRPC port is bound)."""
        host, _, port = address.rpartition(":")
        host = self.registration["ip"] or host.strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"the manager needs the scheduler's IP address (--advertise IP), not {host!r}") from None
        self.registration["ip"], self.registration["port"] = host, int(port)
        if not self.registration["hostname"]:
            import re
            import socket

            self.registration["hostname"] = re.sub(r"[^A-Za-z0-9.\-_]", "-", socket.gethostname())[:255] or "scheduler"

    def _got_config(self, version: int, body: dict) -> None:   # worker thread: hand over only
        self._config = (version, body)

    async def first_round(self) -> None:
        """One round before the scheduler serves (Agent.first_round_async)."""
        await self.agent.first_round_async(self.apply, "scheduler")

    async def run(self) -> None:
        await self.agent.run_async(self.apply)

    def apply(self) -> None:
        metrics = self.server.service.metrics
        metrics.manager_up.set(1 if self.client.last_ok and not self.client.last_error else 0)
        config, self._config = self._config, None
        if config is None or config[0] < 1:
            return
        version, body = config
        sel = self.server.config.selection
        sched = body.get("scheduler") or {}
        sel.parent_limit = int(sched.get("candidate_parent_limit") or self.static["parent_limit"])
        sel.candidate_limit = int(sched.get("filter_parent_limit") or self.static["candidate_limit"])
        # left out: the mesh's built-in bounds again (the peers of the cluster do the same)
        pieces = body.get("piece_size") or {}
        set_piece_bounds(int(pieces.get("min") or MIN_PIECE_SIZE), int(pieces.get("max") or MAX_PIECE_SIZE))
        digests = (body.get("blocklist") or {}).get("digests") or []
        self.server.service.blocked_digests = frozenset(digests)
        self.version = version
        metrics.config_applied(version, self.server.service)
        log.info("dynamic config v%d applied: %d parents of %d sampled, %d blocklisted digests", version,
                 sel.parent_limit, sel.candidate_limit, len(digests))
