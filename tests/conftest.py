"""Fixtures shared by the whole suite: real registries on loopback.

Component fixtures live in ``tests/<component>/conftest.py``. Everything here runs the real thing
(Debian's docker-registry); a missing prerequisite is an error, never a skip: ``.ci/run`` installs it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from remora_testing.registry import LocalRegistry

# Property tests explore new inputs on every local run; in CI (``.ci/run`` sets CI) they are
# derandomized, so that a CI verdict is a function of the commit (a failure reproduces by running the
# same test again) rather than of the examples one run happened to draw. tests/fuzz has its own profile.
settings.register_profile("remora-ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("remora-ci")

# Tests spawn `remora` and `python3` by name: they must be the interpreter running the tests (the
# .venv that scripts/setup.sh installs from the lock file), never whatever else is first on PATH. So
# its bin directory (sys.executable's, not resolved: a venv's python is a symlink out of it) goes first.
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    _rest = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d != _BIN]
    os.environ["PATH"] = os.pathsep.join([_BIN, *_rest])

AUTH_USER = "remora"
AUTH_PASSWORD = "s3cret-pass"


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> LocalRegistry:
    """A plain-HTTP registry on 127.0.0.1 shared by the session (use unique repository names)."""
    reg = LocalRegistry(root=tmp_path_factory.mktemp("registry")).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory) -> LocalRegistry:
    """A registry that requires htpasswd basic auth (user AUTH_USER, password AUTH_PASSWORD)."""
    reg = LocalRegistry(root=tmp_path_factory.mktemp("auth-registry"), users={AUTH_USER: AUTH_PASSWORD}).start()
    yield reg
    reg.stop()


@pytest.fixture
def fresh_registry(tmp_path) -> LocalRegistry:
    """A registry of the test's own (for tests that count blobs or stop the registry)."""
    reg = LocalRegistry(root=tmp_path / "registry").start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """A persistent cache for expensive test inputs (debootstrap rootfs, downloaded .debs).

    Shared across runs on one machine; CI starts empty and fills it once.
    """
    path = Path(os.environ.get("REMORA_TEST_CACHE", "/var/cache/remora-test"))
    path.mkdir(parents=True, exist_ok=True)
    return path


# The fast tier: unit tests that need no root, no daemon and no network, in well under a minute
# (`.venv/bin/python -m pytest -m fast`; CONTRIBUTING.md). Listed by file so that a new file joins only
# when someone has checked that it is fast and needs nothing from the machine.
FAST_TIER = (
    "tests/format/test_bootstrap_validate.py", "tests/format/test_bootstrap_layer_codec.py",
    "tests/placement/test_placement_model.py", "tests/placement/test_generators.py",
    "tests/core/test_oci.py", "tests/core/test_reference.py", "tests/core/test_digest.py",
    "tests/core/test_compression.py", "tests/converter/test_tarstream.py", "tests/converter/test_packer.py",
    "tests/plugins/test_scheduler_bandit.py", "tests/plugins/test_bandwidth.py",
    "tests/plugins/test_piece_picker.py",
    "tests/core/test_registry_authcore.py",
    "tests/core/test_hygiene.py",  # ruff + mypy: ~8 s of CPU with a cold mypy cache, under 1 s warm
)


def pytest_collection_modifyitems(config, items):
    root = Path(str(config.rootpath))
    fast = {root / p for p in FAST_TIER}
    for item in items:
        if Path(str(item.path)) in fast:
            item.add_marker(pytest.mark.fast)
