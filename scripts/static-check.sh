#!/usr/bin/env bash
# Builds the binary that goes into the container image exactly as the
# Dockerfile does (release, glibc linked statically, no GPU probe), checks
# that it loads no shared library, then runs it in an empty root directory
# as user 65532 (as in the distroless image): version, CRD drift, manifest
# validation, and a Redis health check that resolves `localhost` through the
# root's /etc/hosts and connects over TCP. Needs root (chroot). Not part of
# CI: the release build takes about 20 minutes here.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/setup.sh

target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked --release --target "$target" --no-default-features --bin modelcache
bin="target/$target/release/modelcache"

echo "== static?"
file "$bin"
if readelf -l "$bin" | grep -q INTERP || readelf -d "$bin" | grep -q NEEDED; then
  echo "static-check: $bin has a program interpreter or needs shared libraries" >&2
  exit 1
fi
echo "  no interpreter, no NEEDED entries; $(du -h "$bin" | cut -f1)"

root=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no >"$root.redis.log" 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null; rm -rf "$root" "$root.redis.log"' EXIT
mkdir -p "$root/etc" "$root/tmp" "$root/dev"
# What every container runtime provides in /dev: in a static binary the
# getrandom crate cannot look the libc function up, and falls back to
# polling /dev/random, then reading /dev/urandom.
mknod -m 666 "$root/dev/null" c 1 3
mknod -m 666 "$root/dev/random" c 1 8
mknod -m 666 "$root/dev/urandom" c 1 9
cp "$bin" "$root/modelcache"
cp -r crds "$root/crds"
cp examples/modelcache.yaml examples/cachepolicy.yaml "$root/"
printf '127.0.0.1 localhost\n' >"$root/etc/hosts"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
chmod -R a+rX "$root"
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done

run() { chroot --userspec=65532:65532 "$root" /modelcache "$@"; }
echo "== in an empty root as 65532:65532"
echo "  files in the root: $(cd "$root" && find . -type f | wc -l) (the binary, the CRDs, two examples, hosts, nsswitch.conf), and /dev/null, /dev/random, /dev/urandom"
run version
run crd --check /crds
run validate /modelcache.yaml /cachepolicy.yaml
run check-redis --redis-url "redis://localhost:$port" --memory 1Gi --apply | grep -E "^condition Ready"
run gpu || true
echo "static-check: passed"
