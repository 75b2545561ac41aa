#!/usr/bin/env bash
# Fetch containerd 2.1 and dockerd/docker 28 from Debian sid (plus tini) and unpack them
# privately under /opt/remora-runtimes, for remora's interop tests. Run as root; setup.sh calls it.
#
# Why private: Debian 12 ships containerd 1.6 only. Newer containerd and Docker exist as .debs in
# Debian's newer suites; their Go binaries need nothing but libc, so `apt-get download` + `dpkg -x`
# gives us runnable copies WITHOUT touching the system: this script uses an apt configuration of its
# own (own sources list, own package lists and cache under /var/cache/remora-runtimes/apt), never
# edits /etc/apt, never installs or upgrades a package. runc stays bookworm's (sid's needs newer glibc).
#
# Result (fixed paths the tests look for):
#   /opt/remora-runtimes/containerd-<version>/usr/bin/{containerd,ctr,containerd-shim-runc-v2}
#   /opt/remora-runtimes/docker-<version>/usr/{sbin/dockerd,sbin/docker-proxy,bin/docker,bin/docker-init}
#       (docker.io + docker-cli + tini: docker.io's docker-init is a link to tini-static, for --init)
#   /opt/remora-runtimes/tini-<version>/usr/bin/{tini,tini-static}
# tini comes from trixie: the same upstream 0.19.0 as bookworm's, and one package list fewer to fetch.
#   /opt/remora-runtimes/{containerd2,docker,tini} -> the versioned directories above
#
# Idempotent: when the three links resolve to complete installs it prints one line and exits without
# touching the network. REMORA_RUNTIMES_DIR overrides /opt/remora-runtimes (for trying it out).
set -euo pipefail

DEST=${REMORA_RUNTIMES_DIR:-/opt/remora-runtimes}
APTDIR=${REMORA_RUNTIMES_APT:-/var/cache/remora-runtimes/apt}
MIRROR=${REMORA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# link | directory prefix | packages (name/suite) | required binary (in the extracted tree) | version prefix
RUNTIMES=(
  "containerd2|containerd|containerd/sid|usr/bin/containerd|2.1."
  "docker|docker|docker.io/sid docker-cli/sid tini/trixie|usr/sbin/dockerd|28."
  "tini|tini|tini/trixie|usr/bin/tini-static|"
)

complete() {  # complete LINK BINARY: the link exists and its tree has the binary
  [ -L "$DEST/$1" ] && [ -x "$DEST/$1/$2" ]
}

missing=()
for entry in "${RUNTIMES[@]}"; do
  IFS='|' read -r link _dir _pkgs bin _prefix <<<"$entry"
  complete "$link" "$bin" || missing+=("$entry")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "fetch-newer-runtimes: present in $DEST (containerd2, docker, tini)"
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "fetch-newer-runtimes: must run as root" >&2; exit 1; }
[ -r "$KEYRING" ] || { echo "fetch-newer-runtimes: $KEYRING missing (apt-get install debian-archive-keyring)" >&2; exit 1; }

mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/etc" "$DEST"
cat >"$APTDIR/etc/sources.list" <<EOF
# remora's private apt sources: used only by scripts/fetch-newer-runtimes.sh for apt-get download
deb [signed-by=$KEYRING] $MIRROR sid main
deb [signed-by=$KEYRING] $MIRROR trixie main
EOF
# An empty preferences dir too: the host's pinning must not steer our downloads.
mkdir -p "$APTDIR/etc/preferences.d"
APT_OPTS=(
  -o "Dir::Etc::SourceList=$APTDIR/etc/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::Etc::Preferences=/dev/null"
  -o "Dir::Etc::PreferencesParts=$APTDIR/etc/preferences.d"
  -o "Dir::State::Lists=$APTDIR/lists"
  -o "Dir::Cache=$APTDIR/cache"
  -o "Dir::State::status=/dev/null"
  -o "APT::Get::List-Cleanup=0"
  -o "Acquire::Languages=none"
  -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
  -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
  -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
  -o "Acquire::IndexTargets::deb::CNF::DefaultEnabled=false"
  -o "Acquire::Retries=3"
)

echo "fetch-newer-runtimes: updating private package lists in $APTDIR"
apt-get "${APT_OPTS[@]}" -qq update

work=$(mktemp -d /tmp/remora-runtimes.XXXXXX)
trap 'rm -rf "$work"' EXIT
# apt downloads as the unprivileged _apt user: let it write into our download directory.
chmod 755 "$work"
if id _apt >/dev/null 2>&1; then chown _apt "$work"; fi

# One download for everything missing (apt pipelines the requests), then one tree per runtime.
declare -A wanted=()
for entry in "${missing[@]}"; do
  IFS='|' read -r _link _dir pkgs _bin _prefix <<<"$entry"
  for spec in $pkgs; do wanted[$spec]=1; done
done
(cd "$work" && apt-get "${APT_OPTS[@]}" -qq download "${!wanted[@]}")

for entry in "${missing[@]}"; do
  IFS='|' read -r link dir pkgs bin prefix <<<"$entry"
  read -r -a specs <<<"$pkgs"
  debs=()
  for spec in "${specs[@]}"; do
    debs+=("$work/${spec%%/*}"_*.deb)
  done
  version=$(dpkg-deb -f "${debs[0]}" Version)
  upstream=${version#*:}
  upstream=${upstream%%[~+-]*}
  if [ -n "$prefix" ] && [[ "$upstream" != "$prefix"* ]]; then
    # sid moves on; a newer release is still worth unpacking (the tests say what they need).
    echo "fetch-newer-runtimes: WARNING: ${specs[0]} in ${specs[0]#*/} is now $version, tested with $prefix*;" \
      "update RUNTIMES in $0 once the interop tests pass with it" >&2
  fi
  target="$DEST/$dir-$upstream"
  tmp="$target.partial"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  for deb in "${debs[@]}"; do
    dpkg -x "$deb" "$tmp"
  done
  [ -x "$tmp/$bin" ] || { echo "fetch-newer-runtimes: $tmp/$bin missing after extraction" >&2; exit 1; }
  "$tmp/$bin" --version >/dev/null 2>&1 || "$tmp/$bin" --help >/dev/null 2>&1 || {
    echo "fetch-newer-runtimes: $tmp/$bin does not run on this system" >&2; exit 1; }
  rm -rf "$target"
  mv "$tmp" "$target"
  ln -sfn "$(basename "$target")" "$DEST/$link"
  echo "fetch-newer-runtimes: $link -> $target ($version)"
done
