#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml (run after changing a dependency, then commit them):
#
#   requirements-dev.lock   everything setup.sh and .ci/run install: runtime + the test, place and dev
#                           extras + the build backend (setuptools/wheel, for the --no-build-isolation
#                           editable install)
#   requirements.lock       the runtime dependencies alone (a node that only runs remora), pinned to
#                           the same versions as requirements-dev.lock
#
# Why a lock: pyproject's ranges let pip pick whatever is newest on the day, so two machines set up a
# week apart ran different code (a newer grpcio-tools wrote different stubs and the staleness test
# failed on a fresh clone). Every pin carries the sha256 of every file PyPI has for that version
# (all platforms and Pythons), so `pip install --require-hashes` accepts only those bytes.
#
# The resolver is uv, itself pinned with hashes in scripts/lock-tool.txt and installed into a private
# tool venv (never into the project's .venv or the system). `--universal` resolves for every Python
# >= requires-python and every platform at once (environment markers where they differ), so the same
# lock serves Debian's python3 and any other.
#
# Usage: bash scripts/lock.sh            # rewrite both lock files
#        bash scripts/lock.sh --upgrade  # also move every pin to the newest allowed version
set -euo pipefail
cd "$(dirname "$0")/.."

TOOL_REQS=scripts/lock-tool.txt
TOOL_VENV=${REMORA_LOCK_TOOL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/remora-lock-tool}
EXTRAS=(test place manager learn dev)   # `bench` (pyfuse3) builds from an sdist: install it by hand when needed

stamp=$(sha256sum "$TOOL_REQS" | cut -d' ' -f1)
if [ "$(cat "$TOOL_VENV/.stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$TOOL_VENV"
  python3 -m venv "$TOOL_VENV"
  "$TOOL_VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes -r "$TOOL_REQS"
  echo "$stamp" > "$TOOL_VENV/.stamp"
fi
UV="$TOOL_VENV/bin/uv"

upgrade=()
[ "${1:-}" = "--upgrade" ] && upgrade=(--upgrade)

# The build backend from [build-system].requires, so the editable install needs no unpinned download.
build_in=$(mktemp --suffix=.in)
trap 'rm -f "$build_in"' EXIT
python3 - "$build_in" <<'EOF'
import sys, tomllib
with open("pyproject.toml", "rb") as f:
    reqs = tomllib.load(f)["build-system"]["requires"]
open(sys.argv[1], "w").write("\n".join(reqs) + "\n")
EOF

common=(--universal --fork-strategy fewest --python-version 3.11 --generate-hashes --index-url https://pypi.org/simple
        --quiet --custom-compile-command "bash scripts/lock.sh")
extras=()
for e in "${EXTRAS[@]}"; do extras+=(--extra "$e"); done

# UV_NO_CONFIG/--index-url: only PyPI, whatever uv.toml or local mirrors this machine has.
export UV_NO_CONFIG=1
"$UV" pip compile pyproject.toml "$build_in" "${extras[@]}" "${common[@]}" "${upgrade[@]}" \
  -o requirements-dev.lock
"$UV" pip compile pyproject.toml "${common[@]}" -c requirements-dev.lock -o requirements.lock
# The temporary build-requirements file has a random name: say where those pins come from.
sed -i "s|# via -r $build_in|# via build-system.requires (pyproject.toml)|; s|-r $build_in|build-system.requires (pyproject.toml)|" \
  requirements-dev.lock
echo "lock: wrote requirements-dev.lock ($(grep -c '^[a-z0-9]' requirements-dev.lock) pins) and" \
     "requirements.lock ($(grep -c '^[a-z0-9]' requirements.lock) pins) with $("$UV" --version)"
