#!/usr/bin/env bash
# Prints the path of a consul binary: one already on PATH, else one built
# from the Go module proxy and cached under .cache/ (git-ignored). Recipe in
# ../shared/notes/consul.md: the module's go.mod points its sub-modules at
# local dirs missing from the module zip, so that replace block is dropped.
set -euo pipefail
if command -v consul >/dev/null 2>&1; then command -v consul; exit 0; fi
ver=${CONSUL_VERSION:-v1.21.0}
top=$(cd "$(dirname "$0")/.." && pwd)
out="$top/.cache/consul-$ver/consul"
if [ -x "$out" ]; then echo "$out"; exit 0; fi
mkdir -p "$(dirname "$out")"
echo "building consul $ver from the Go module proxy (a few minutes, once)" >&2
go mod download "github.com/hashicorp/consul@$ver" >&2
src=$(go env GOMODCACHE)/github.com/hashicorp/consul@$ver
tmp=$(mktemp -d)
trap 'chmod -R u+w "$tmp"; rm -rf "$tmp"' EXIT
cp -r "$src"/. "$tmp"
chmod -R u+w "$tmp"
sed -i '/^replace (/,/^)/d' "$tmp/go.mod"
(cd "$tmp" && GOFLAGS=-mod=mod go build -o "$out.tmp" . >&2)
mv "$out.tmp" "$out"
echo "$out"
