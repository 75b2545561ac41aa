"""Sub-commands of the P2P plugins: ``remora scheduler`` and ``remora peer``.

Each plugin keeps its own parser code in its own ``cli`` module (``plugins/scheduler/cli.py``,
``plugins/peer/cli.py``) so the two are built and changed independently; this module only collects
them. ``register`` stays cheap: the modules below import their heavy dependencies inside ``run``.
"""
from __future__ import annotations

import importlib


def register(subparsers) -> None:
    from remora.plugins.scheduler.cli import register_scheduler

    register_scheduler(subparsers)
    try:
        peer_cli = importlib.import_module("remora.plugins.peer.cli")
    except ModuleNotFoundError as exc:
        if exc.name not in ("remora.plugins.peer", "remora.plugins.peer.cli"):
            raise
        return
    peer_cli.register_peer(subparsers)
