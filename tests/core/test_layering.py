"""The house's shape, checked: the runtime wheel carries no test tooling, and imports point one way.

Arrows (docs/architecture.md): the core (``remora/``) imports no component and no lab tooling; a
component (``converter/``, ``snapshotter/``, ``plugins/``, ``placement/``) imports the core and
itself, never another component (they meet through the core's interfaces: the format, the registry
client, :mod:`remora.taskapi`); nothing that ships imports ``remora_testing``.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = {"converter": "remora.converter", "snapshotter": "remora.snapshotter", "plugins": "remora.plugins",
              "placement": "remora.placement"}


def _owner(module: str) -> str | None:
    """Which top-level package a dotted module name belongs to."""
    if module == "remora_testing" or module.startswith("remora_testing."):
        return "testing"
    for folder, name in COMPONENTS.items():
        if module == name or module.startswith(name + "."):
            return folder
    if module == "remora" or module.startswith("remora."):
        return "core"
    return None


def _imports(path: Path, package: str) -> set[str]:
    """Every remora module ``path`` imports (relative imports resolved against ``package``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from remora import oci`
    return {m for m in out if _owner(m)}


def _import_graph() -> dict[tuple[str, str], list[str]]:
    roots = {"core": (ROOT / "remora", "remora"), **{f: (ROOT / f, n) for f, n in COMPONENTS.items()}}
    edges: dict[tuple[str, str], list[str]] = {}
    for owner, (folder, name) in roots.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            package = ".".join([name, *parts[:-1]] if path.name != "__init__.py" else [name, *parts])
            for mod in _imports(path, package):
                target = _owner(mod)
                if target and target != owner:
                    edges.setdefault((owner, target), []).append(f"{path.relative_to(ROOT)} -> {mod}")
    return edges


def test_imports_point_one_way():
    edges = _import_graph()
    wrong = {k: v for k, v in edges.items() if k[1] != "core"}
    assert not wrong, "imports against the arrows:\n" + "\n".join(f"{a} -> {b}: {v}" for (a, b), v in wrong.items())
    # and the check is not vacuous: every component does use the core
    assert {a for a, b in edges if b == "core"} == set(COMPONENTS)


def test_the_check_sees_a_wrong_arrow(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from remora.converter.image import RemoraImage\nfrom ..peer import daemon\n"
                   "import remora_testing.netlab\n")
    found = {_owner(m) for m in _imports(bad, "remora.plugins.scheduler")}
    assert found == {"converter", "plugins", "testing"}, found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--disable-pip-version-check", "-w", str(out), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    (path,) = out.glob("remora-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_has_no_test_tooling(wheel):
    names = wheel.namelist()
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert packages == {"remora"}, packages
    # every component is in it, mapped into the namespace ...
    for name in COMPONENTS.values():
        assert f"{name.replace('.', '/')}/__init__.py" in names, name
    assert "remora/format/bootstrap_layer.py" in names and "remora/_proto/remora_scheduler_pb2.pyi" in names
    # ... and none of the lab: no image/tar builders, runtimes, netlab, local registry, tests
    lab = [n for n in names if any(w in n for w in ("testenv", "netlab", "imagebuild", "tarbuild",
                                                       "registry/local", "remora_testing", "tests/", "demo"))]
    assert not lab, lab


def test_shipped_code_never_imports_the_lab(wheel):
    for name in wheel.namelist():
        if name.endswith(".py"):
            tree = ast.parse(wheel.read(name))
            for node in ast.walk(tree):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not [m for m in mods if m.startswith("remora_testing")], name


def test_demo_without_the_lab_says_how_to_get_it():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'remora_testing':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from remora.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    run = subprocess.run([sys.executable, "-c", code, "demo"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run
    assert "remora demo is unavailable" in run.stderr and "testing/" in run.stderr, run.stderr
    listing = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "demo" in listing.stdout and "unavailable" in listing.stdout
