"""The ``remora`` command: one console script, one sub-command per job.

Each component contributes its sub-commands through a ``register(subparsers)`` function in its own
``cli`` module (listed in :data:`COMMAND_MODULES`); a sub-command sets ``func`` with
``parser.set_defaults(func=...)`` and that function returns the exit code. Errors derived from
:class:`remora.errors.RemoraError` are printed as one clear line and mapped to their exit code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from remora import __version__
from remora.errors import RemoraError, UsageError

# The one table of commands: which module registers each (its ``register(subparsers)``). A command line
# naming one loads only that module (the CLI's start-up is on the cold-start path of 'remora pull');
# --help and unknown commands load them all. A new component adds its lines here and nowhere else.
COMMANDS = {
    "convert": "remora.converter.cli", "dict": "remora.converter.cli", "check": "remora.converter.cli",
    "unpack": "remora.converter.cli", "trace": "remora.converter.cli",
    "snapshotter": "remora.snapshotter.cli", "stats": "remora.snapshotter.cli",
    "credential-provider": "remora.snapshotter.cli",
    "pull": "remora.snapshotter.pull",
    "peer": "remora.plugins.cli", "scheduler": "remora.plugins.cli",
    "place": "remora.placement.cli",
    "certs": "remora.pki.cli",
    "manager": "remora.plugins.manager.cli", "job": "remora.plugins.manager.cli",
    "cluster": "remora.plugins.manager.cli", "trainer": "remora.plugins.trainer.cli",
    # The lab tooling is a distribution of its own (testing/, not in the runtime wheel): without it
    # `remora demo` says how to get it instead of vanishing from the list.
    "demo": "remora_testing.demo",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))  # in table order, each once

EPILOG = """\
examples:
  remora demo                                   start a local registry, build and convert a real image
  remora convert registry.local/app:1 registry.local/app:1-remora
  remora convert oci:./app-layout:1 oci:./out:1 --prefetch-list hot.txt
  remora snapshotter --root /var/lib/remora --address /run/remora/snapshotter.sock
  remora pull registry.local/app:1-remora
  remora certs init --dir /etc/remora/ca        a cluster CA for the mesh's mutual TLS
  remora peer --tls-dir /etc/remora/tls --listen 127.0.0.1:65001
  remora manager                                control plane on an embedded SQLite, 127.0.0.1:8080
  remora place plan examples/placement/app.yaml --algorithm heuristic

Run 'remora COMMAND --help' for the options of one command.
"""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``remora`` parser; given ``argv`` that names a known command, with that command only."""
    parser = argparse.ArgumentParser(
        prog="remora",
        description="Lazy-loading container images for containerd: convert, snapshot, distribute.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"remora {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    command = next((a for a in argv or () if not a.startswith("-")), None)
    for name in ([COMMANDS[command]] if command in COMMANDS else COMMAND_MODULES):
        # One broken or absent component must not take every other command down with it: its commands
        # stay listed and say why they cannot run.
        try:
            importlib.import_module(name).register(sub)
        except Exception as exc:  # noqa: BLE001
            _register_unavailable(sub, name, exc)
    return parser


def _register_unavailable(sub, module: str, exc: BaseException) -> None:
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "remora_testing":
        why = ("it is part of remora's lab tooling, which this installation lacks "
               "(pip install --no-deps -e testing/ from a remora checkout, or bash scripts/setup.sh)")
    else:
        why = f"{module} failed to load: {exc.__class__.__name__}: {exc}"
        logging.getLogger(__name__).warning("commands of %s unavailable: %s", module, exc)
    for command in (c for c, m in COMMANDS.items() if m == module):
        parser = sub.add_parser(command, help=f"(unavailable: {why.split(':')[0].split(' (')[0]})",
                                description=f"remora {command} is unavailable: {why}")
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        parser.set_defaults(func=_unavailable(command, why))


def _unavailable(command: str, why: str):
    def run(args) -> int:
        raise UsageError(f"remora {command} is unavailable: {why}")
    return run


def setup_logging(verbosity: int) -> None:
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    if os.environ.get("REMORA_LOG_LEVEL", "").isdigit():
        level = int(os.environ["REMORA_LOG_LEVEL"])
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The ``remora`` command. Called without ``argv`` (the console script, ``python -m remora.cli``),
    a command that sets ``args.exit_fast`` (the thin ``remora pull``) ends the process at once: see
    :func:`exit_now`."""
    own_process = argv is None
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        code = int(func(args) or 0)
    except RemoraError as exc:
        print(f"remora {args.command}: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print(f"remora {args.command}: interrupted", file=sys.stderr)
        code = 130
    if own_process and getattr(args, "exit_fast", False):
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown, which finalises every module and object:
    ~80 ms of a thin ``remora pull`` (its work done, its output written) that a cold start waits for.
    What must not be lost is done first: the atexit handlers (logging's flush among them), then
    stdout and stderr flushed; a failed flush exits 120, as the interpreter itself would."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                code = code or 120
        os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
