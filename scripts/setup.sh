#!/usr/bin/env bash
# Install everything remora and its test-suite need on a fresh Debian 12 machine (run as root).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  containerd runc docker-registry skopeo fuse3 libfuse3-dev pkg-config gcc python3-dev
  debootstrap busybox-static stargz-snapshotter iproute2 zstd pigz apache2-utils
  ca-certificates e2fsprogs attr tar strace util-linux
  golang-go golang-github-containerd-containerd-dev
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

echo "setup: installing remora (pip install -e '.[test]')"
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# Bytecode now, as a regular (non-editable) install does: with PYTHONDONTWRITEBYTECODE set, every
# snapshotter, fs process and CLI would otherwise compile remora's sources again at each start.
python3 -m compileall -q remora converter snapshotter plugins >/dev/null

# Optional components fetched from Debian's newer suites (containerd 2.x, dockerd) for interop tests.
if [ -x scripts/fetch-newer-runtimes.sh ]; then
  bash scripts/fetch-newer-runtimes.sh
fi
echo "setup: done"
