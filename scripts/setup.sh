#!/usr/bin/env bash
# Install everything remora and its test-suite need on a fresh Debian 12 machine (run as root).
#
# Python packages go into a virtual environment, <repo>/.venv, made with whatever `python3` is first
# on PATH (Debian's own /usr/bin/python3 or any other >= 3.11), and come from requirements-dev.lock:
# exact versions, each file checked against its sha256 (`--require-hashes`), so every machine runs the
# same code. Nothing is pip-installed into a system Python (PEP 668 forbids it on Debian).
# Afterwards: .venv/bin/remora, also linked as /usr/local/bin/remora.
#
# Idempotent and quick the second time: the venv is rebuilt only when the lock file or the Python
# that makes it changes; the project (editable, no deps) is re-installed only when pyproject.toml or
# setup.py changes. REMORA_VENV overrides the venv's path.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOCK=requirements-dev.lock
VENV=${REMORA_VENV:-$ROOT/.venv}

APT_PACKAGES=(
  containerd runc docker-registry skopeo fuse3 libfuse3-dev pkg-config gcc python3-dev
  python3-venv python3-pip
  debootstrap busybox-static stargz-snapshotter iproute2 zstd pigz apache2-utils
  ca-certificates e2fsprogs attr tar strace util-linux
  golang-go golang-github-containerd-containerd-dev golang-github-containerd-stargz-snapshotter-dev  # + the stargz daemon of bench_cold_start
  postgresql chromium chromium-driver            # the manager: PostgreSQL tests and the console in a real browser
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- the virtual environment, from the lock file -------------------------------------------------
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: $(command -v python3) is $(python3 -V 2>&1); remora needs Python >= 3.11" >&2; exit 1; }
# Which interpreter made the venv + which lock it holds: any change rebuilds it from scratch, so the
# venv holds exactly the lock (no leftovers of an older one).
env_id="$(python3 -c 'import sys; print(sys.executable, sys.version)' | sha256sum | cut -d' ' -f1)"
env_id="$env_id $(grep -v '^ *#' "$LOCK" | sha256sum | cut -d' ' -f1)"   # pins and hashes, not comments
proj_id="$(cat pyproject.toml setup.py testing/pyproject.toml | sha256sum | cut -d' ' -f1)"
pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check --no-input)

if [ "$(cat "$VENV/.remora-env" 2>/dev/null)" != "$env_id" ] || [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $(command -v python3) ($(python3 -V 2>&1)) from $LOCK"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "${pip[@]}" install --require-hashes --only-binary :all: -r "$LOCK"
  echo "$env_id" > "$VENV/.remora-env"
  rm -f "$VENV/.remora-project"
fi
if [ "$(cat "$VENV/.remora-project" 2>/dev/null)" != "$proj_id" ]; then
  echo "setup: installing remora into $VENV (editable, dependencies from the lock only)"
  # --no-build-isolation: build with the locked setuptools/wheel already in the venv, download nothing.
  "${pip[@]}" install --no-deps --no-build-isolation -e .
  # The test and lab tooling (remora_testing: `remora demo`, the fixtures' registries and runtimes,
  # the network lab) is a distribution of its own, so that the runtime wheel carries none of it.
  "${pip[@]}" install --no-deps --no-build-isolation -e testing
  echo "$proj_id" > "$VENV/.remora-project"
fi
# `remora` on a root shell's PATH; pointing at the venv's script, whose #! is the venv's python.
ln -sfn "$VENV/bin/remora" /usr/local/bin/remora

# Bytecode now, as a regular (non-editable) install does: with PYTHONDONTWRITEBYTECODE set, every
# snapshotter, fs process and CLI would otherwise compile remora's sources again at each start.
# (The component folders of setup.py's ROOTS that this checkout has.)
components=()
for d in remora converter snapshotter plugins placement testing/remora_testing; do [ -d "$d" ] && components+=("$d"); done
"$VENV/bin/python" -m compileall -q "${components[@]}" >/dev/null

# Optional components fetched from Debian's newer suites (containerd 2.x, dockerd) for interop tests.
if [ -x scripts/fetch-newer-runtimes.sh ]; then
  bash scripts/fetch-newer-runtimes.sh
fi
echo "setup: done (python: $VENV/bin/python; remora: /usr/local/bin/remora -> $VENV/bin/remora)"
