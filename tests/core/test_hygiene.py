"""Lint and type checks, run the way ``.ci/run`` and the pre-commit hooks run them.

Here too so that a contributor who only runs pytest sees a finding, with its file and line, in the
test's failure message. What is checked and how strictly lives in pyproject.toml ([tool.ruff],
[tool.mypy]); scripts/typecheck.py explains why mypy runs through a wrapper.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    proc = _run("-m", "ruff", "check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_finds_nothing():
    proc = _run("scripts/typecheck.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout, proc.stdout


def test_mypy_sees_components_under_their_import_names(tmp_path):
    """The wrapper's point: ``remora.snapshotter`` (folder snapshotter/) resolves for mypy, so a type
    error against the snapshotter core is reported as one, not hidden as a missing module."""
    probe = tmp_path / "probe.py"
    probe.write_text("from remora.snapshotter.storage import Kind\nx: str = Kind.ACTIVE\n")
    # its own cache: mypy's shared one remembers a module named "probe" at an earlier run's path
    proc = _run("scripts/typecheck.py", "--cache-dir", str(tmp_path / "cache"), str(probe))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f'{probe}:2: error: Incompatible types in assignment (expression has type "Kind", variable has ' \
        'type "str")' in proc.stdout, proc.stdout
    assert "Found 1 error in 1 file" in proc.stdout, proc.stdout
