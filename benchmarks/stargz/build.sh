#!/bin/sh
# Build containerd-stargz-grpc (benchmarks/stargz/main.go) from Debian's packaged Go sources only:
#   apt-get install golang-go golang-github-containerd-stargz-snapshotter-dev
# GOPATH mode over /usr/share/gocode (where Debian's -dev packages put their sources), no module
# proxy, no network. Usage: build.sh [OUTPUT]  (default: /usr/local/lib/remora-bench/containerd-stargz-grpc)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-/usr/local/lib/remora-bench/containerd-stargz-grpc}
src=/usr/share/gocode/src/github.com/containerd/stargz-snapshotter/service
[ -d "$src" ] || { echo "missing $src: apt-get install golang-github-containerd-stargz-snapshotter-dev" >&2; exit 2; }
command -v go >/dev/null || { echo "missing go: apt-get install golang-go" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src/remora-bench/containerd-stargz-grpc" "$(dirname "$out")"
cp "$here/main.go" "$work/src/remora-bench/containerd-stargz-grpc/"
cd "$work/src/remora-bench/containerd-stargz-grpc"
GO111MODULE=off GOPATH="$work:/usr/share/gocode" GOPROXY=off GOFLAGS= GOCACHE="${GOCACHE:-/var/cache/remora-test/go-build}" \
  CGO_ENABLED=0 go build -trimpath -o "$out.tmp" .
mv "$out.tmp" "$out"
echo "$out"
