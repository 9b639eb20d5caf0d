#!/usr/bin/env bash
# Runs the README's two commands as a new user would, on a fresh Debian root:
# debootstrap (bookworm, minbase) into DIR, with only what "a Debian machine
# with Rust" has (the machine's Rust toolchain bind-mounted read-only, its
# linker gcc, git and CA certificates), a clean clone of this repository's
# HEAD, and ../shared read-only beside it. Inside, scripts/demo.sh and then
# scripts/test.sh, each timed; setup's own lines time its phases. Nothing of
# this machine's caches is visible inside: no pip or wheel cache, no cargo
# registry, no installed tools.
#
#   sudo scripts/clean-root.sh /var/tmp/modelcache-root   # about an hour on 2 cores
#
# Needs root (debootstrap, chroot, mounts) and debootstrap (apt-get install
# debootstrap). The whole log is DIR/clean-root.log. Not part of CI.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
root=${1:?usage: scripts/clean-root.sh DIR (a new directory for the Debian root)}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
[ "$(id -u)" -eq 0 ] || { echo "clean-root: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "clean-root: needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }
[ -x "$cargo_bin/rustup" ] || { echo "clean-root: no rustup in $cargo_bin: the root borrows this machine's Rust toolchain" >&2; exit 2; }

mkdir -p "$root"
exec > >(tee -a "$root/clean-root.log") 2>&1
t() { local s; s=$(date +%s); "$@"; echo "clean-root: '$*' took $(( $(date +%s) - s )) s" >&2; }

if [ ! -x "$root/bin/bash" ]; then
  t debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.debootstrap.log"
fi

mounted=()
mount_bind() {
  mkdir -p "$2"
  mount --rbind "$1" "$2"
  mounted=("$2" "${mounted[@]}")
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
}
cleanup() {
  # Whatever still runs inside the root (an interrupted build) ends with it.
  for p in /proc/[0-9]*; do
    if [ "$(readlink "$p/root" 2>/dev/null)" = "$(realpath "$root")" ]; then kill -9 "${p#/proc/}" 2>/dev/null || true; fi
  done
  for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
mount_bind /proc "$root/proc"
mount_bind /sys "$root/sys" ro
mount_bind /dev "$root/dev"
mount_bind "$rustup_home" "$root/root/.rustup" ro
# rustup's proxies only (cargo, rustc, rustfmt…: the rustup binary under
# other names), not what `cargo install` put beside them.
mkdir -p "$root/root/.cargo/bin"
for f in "$cargo_bin"/*; do
  if [ "$f" -ef "$cargo_bin/rustup" ] || cmp -s "$f" "$cargo_bin/rustup"; then
    cp "$f" "$root/root/.cargo/bin/"
  fi
done
cp /etc/resolv.conf "$root/etc/resolv.conf"
# What Debian's installer writes and debootstrap does not: the tests reach
# their loopback servers as `localhost` (the webhook's certificate names it).
if [ ! -s "$root/etc/hosts" ]; then
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n' >"$root/etc/hosts"
fi
# Services installed by apt are not started inside the root (as in an image build).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"

rm -rf "$root/build"
mkdir -p "$root/build"
git clone -q "$repo" "$root/build/main"
if [ -d "$repo/../shared" ]; then mount_bind "$repo/../shared" "$root/build/shared" ro; fi

# The network's own settings come along, as on any machine of this network:
# proxy variables, CA variables and pip's configuration (a TLS-inspecting
# proxy's CA is added to the root's trust store once ca-certificates is in).
net_env=()
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY SSL_CERT_FILE SSL_CERT_DIR \
  PIP_CERT REQUESTS_CA_BUNDLE CURL_CA_BUNDLE GIT_SSL_CAINFO PIP_DEFAULT_TIMEOUT; do
  if [ -n "${!v:-}" ]; then net_env+=("$v=${!v}"); fi
done
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
inside() {
  chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 "${net_env[@]}" \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash -c "$1"
}
trust_host_cas() {
  python3 - /etc/ssl/certs/ca-certificates.crt "$root" <<'PY'
import os, re, sys
pem = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)
host = pem.findall(open(sys.argv[1]).read())
root = sys.argv[2]
ours = set(pem.findall(open(os.path.join(root, "etc/ssl/certs/ca-certificates.crt")).read()))
os.makedirs(os.path.join(root, "usr/local/share/ca-certificates"), exist_ok=True)
extra = [c for c in host if c not in ours]
for i, c in enumerate(extra):
    with open(os.path.join(root, f"usr/local/share/ca-certificates/host-{i}.crt"), "w") as f:
        f.write(c + "\n")
print(f"clean-root: {len(extra)} CA certificates of this machine's trust store added")
PY
  inside 'update-ca-certificates >/dev/null'
}
# What "a fresh Debian machine with Rust" has besides the toolchain: the
# linker rustc calls (gcc), git for the clone, and CA certificates.
t inside 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc libc6-dev git ca-certificates >/dev/null'
trust_host_cas
t inside 'cd /build/main && scripts/demo.sh'
t inside 'cd /build/main && scripts/test.sh'
echo "clean-root: both commands passed in a fresh Debian root"
