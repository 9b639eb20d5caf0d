#!/usr/bin/env bash
# The `cuda` build (candle's CUDA backend) with an nvcc from PyPI, on a
# machine without the CUDA toolkit (issue 19, step 2).
#
#   scripts/build-cuda.sh [--check]
#
# Without an nvcc on PATH, it fetches NVIDIA's PyPI wheels of CUDA
# $MODELCACHE_CUDA_VERSION (default 13.0: nvcc and the wheels it needs, NVVM,
# the C runtime and runtime headers, CCCL)
# into $MODELCACHE_CACHE/cuda-$MODELCACHE_CUDA_VERSION, once. The CUDA
# version must not be newer than the GPU machine's driver supports
# (`nvidia-smi` says; 580 drivers: 13.0), because candle's kernels are PTX
# that the driver compiles for its GPU when they load; CUDA_COMPUTE_CAP
# (default 90, an H200) is the GPU they are compiled for.
#
# --check compiles everything, candle's kernels through nvcc included, but
# links nothing: for a machine without libcuda and cuBLAS. Without it the
# release binary is built in target/cuda/release/modelcache, which needs
# libcuda, cuBLAS, cuBLASLt, cuRAND and NVRTC of that CUDA version where it
# links and where it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

check=false
case "${1:-}" in
    "") ;;
    --check) check=true ;;
    *) echo "build-cuda: unknown argument $1; expected nothing or --check" >&2; exit 2 ;;
esac

version="${MODELCACHE_CUDA_VERSION:-13.0}"
if ! [[ "$version" =~ ^[0-9]+\.[0-9]+$ ]]; then
    echo "build-cuda: MODELCACHE_CUDA_VERSION=$version; expected MAJOR.MINOR, e.g. 13.0" >&2
    exit 2
fi
if ! command -v nvcc >/dev/null; then
    root="$MODELCACHE_CACHE/cuda-$version"
    if [[ ! -x "$root/nvidia/cu${version%%.*}/bin/nvcc" ]]; then
        echo "build-cuda: fetching nvcc $version from PyPI into $root (once)"
        wheels=$(mktemp -d)
        trap 'rm -rf "$wheels"' EXIT
        python3 -m pip download --quiet --no-deps -d "$wheels" \
            "nvidia-cuda-nvcc==$version.*" "nvidia-nvvm==$version.*" \
            "nvidia-cuda-crt==$version.*" "nvidia-cuda-runtime==$version.*" \
            "nvidia-cuda-cccl==$version.*"
        # Unpacked into a fresh directory that replaces the old one only
        # when complete: an interrupted fetch leaves nothing half-made.
        rm -rf "$root.partial" && mkdir -p "$root.partial"
        for w in "$wheels"/*.whl; do
            python3 -m zipfile -e "$w" "$root.partial"
        done
        chmod +x "$root.partial"/nvidia/cu*/bin/* "$root.partial"/nvidia/cu*/nvvm/bin/* 2>/dev/null || true
        rm -rf "$root" && mv "$root.partial" "$root"
    fi
    cuda="$root/nvidia/cu${version%%.*}"
    export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
fi
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
echo "build-cuda: $(nvcc --version | tail -1), compute capability $CUDA_COMPUTE_CAP"

# Its own target directory: the default build's stays as it is.
args=(--locked --no-default-features --features cuda --target-dir target/cuda)
if $check; then
    cargo check "${args[@]}" --all-targets
    echo "build-cuda: the cuda build compiles (not linked: --check)"
else
    cargo build "${args[@]}" --release --bin modelcache
    echo "build-cuda: target/cuda/release/modelcache"
fi
