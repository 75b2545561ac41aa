"""Run mypy on remora under its import names (``.ci/run``, pre-commit and tests/core/test_hygiene.py).

Why a wrapper: setup.py maps ``remora.converter`` to ``converter/``, ``remora.snapshotter`` to
``snapshotter/`` and so on (its ``ROOTS``), and an editable install serves that map through an import
hook. mypy finds modules by walking directories and cannot follow the hook, so ``remora.snapshotter``
does not exist for it. This script lays the map out as a tree of symlinks (``build/mypy-tree/remora``:
every entry of ``remora/`` plus one link per component), runs mypy with that tree first on its path
(``mypy_path`` in pyproject.toml) and prints each path as the real file's, so that editors, CI logs
and pre-commit point at ``snapshotter/storage.py`` rather than at the link. What is checked, and how
strictly, is all in ``[tool.mypy]``; extra arguments go to mypy as they are.

    .venv/bin/python scripts/typecheck.py
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = Path("build") / "mypy-tree"  # relative to ROOT; equal to mypy_path in pyproject.toml


def roots() -> dict[str, str]:
    """setup.py's ROOTS (import name → folder), read without running setup.py."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ROOTS" for t in node.targets):
            value = ast.literal_eval(node.value)
            assert isinstance(value, dict)
            return {str(k): str(v) for k, v in value.items()}
    raise SystemExit("typecheck: no ROOTS in setup.py")


def build_tree() -> dict[str, str]:
    """(Re)build the symlink tree; return {tree path prefix: real path prefix} for the output."""
    links: dict[Path, Path] = {}
    for name, folder in roots().items():
        parts = name.split(".")
        if parts == ["remora"]:
            for entry in (ROOT / folder).iterdir():
                if entry.name != "__pycache__":
                    links[TREE / "remora" / entry.name] = entry
        else:
            links[TREE.joinpath(*parts)] = ROOT / folder
    base = ROOT / TREE / "remora"
    base.mkdir(parents=True, exist_ok=True)
    for entry in base.iterdir():  # entries removed from remora/ since the last run
        if entry.is_symlink() and (TREE / "remora" / entry.name) not in links:
            entry.unlink()
    for link, target in links.items():
        path = ROOT / link
        if not (path.is_symlink() and os.readlink(path) == str(target)):
            if path.is_symlink():
                path.unlink()
            path.symlink_to(target, target_is_directory=target.is_dir())
    # Longest prefix first: remora/snapshotter/ before remora/.
    prefixes = {f"{link.as_posix()}/": f"{target.relative_to(ROOT).as_posix()}/"
                for link, target in links.items() if target.is_dir()}
    prefixes.update({link.as_posix(): target.relative_to(ROOT).as_posix()
                     for link, target in links.items() if not target.is_dir()})
    return dict(sorted(prefixes.items(), key=lambda kv: -len(kv[0])))


def main(argv: list[str]) -> int:
    prefixes = build_tree()
    pattern = re.compile("|".join(re.escape(p) for p in prefixes))
    proc = subprocess.run([sys.executable, "-m", "mypy", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    sys.stdout.write(pattern.sub(lambda m: prefixes[m.group(0)], proc.stdout))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
