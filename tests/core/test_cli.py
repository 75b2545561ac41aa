"""The ``remora`` console script: every command is reachable, and a command line loads only its own
component (its start-up is on the cold-start path of ``remora pull``)."""
from __future__ import annotations

import json
import subprocess
import sys

from remora import cli


def _commands(parser) -> set[str]:
    return set(parser._subparsers._group_actions[0].choices)


def test_command_map_names_every_command_and_module():
    full = _commands(cli.build_parser())
    assert full == set(cli.COMMANDS), full ^ set(cli.COMMANDS)
    assert set(cli.COMMANDS.values()) == set(cli.COMMAND_MODULES)
    # naming a command (after global options too) builds only its module's commands
    assert _commands(cli.build_parser(["-v", "pull", "img"])) == {"pull"}
    assert _commands(cli.build_parser(["trace", "--", "ls"])) == {c for c, m in cli.COMMANDS.items()
                                                                  if m == "remora.converter.cli"}
    assert _commands(cli.build_parser(["nonsense"])) == full  # argparse then lists the valid choices


def test_pull_command_line_loads_no_other_component():
    code = ("import sys, remora.cli\n"
            "try:\n    remora.cli.main(['pull', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(__import__('json').dumps(sorted(m for m in sys.modules if m.startswith('remora'))),"
            " file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    assert "usage: remora pull" in proc.stdout
    others = ("remora.converter", "remora.plugins", "remora_testing.demo")
    assert not [m for m in loaded if m.startswith(others)], loaded
    # and a bad command still gets argparse's list of commands
    bad = subprocess.run([sys.executable, "-m", "remora.cli", "pul"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "pull" in bad.stderr and "convert" in bad.stderr
