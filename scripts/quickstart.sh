#!/usr/bin/env bash
# Quick start, step 1: set the machine up (Debian packages, .venv from the lock file), then run the
# main job on the embedded default: a local registry, a real Debian + python3 image built and pushed
# to it, converted by remora.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/remora demo "$@"
