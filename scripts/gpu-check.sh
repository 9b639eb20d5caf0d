#!/usr/bin/env bash
# What a GPU machine has, before anything is built for it (issue 19, step 1):
# the driver and the CUDA version it supports, the GPUs and their compute
# capability, an nvcc if there is one, the CUDA libraries the dynamic linker
# finds (cuBLAS, cuRAND, NVRTC, the runtime), the Python packages that carry
# CUDA libraries (PyPI's nvidia-* wheels, torch's bundled ones), free disk
# and cores. It only looks: it installs, builds and changes nothing.
#
#   scripts/gpu-check.sh [REPORT_DIR]
#
# Prints the findings; with REPORT_DIR, also writes them to
# REPORT_DIR/machine.txt. Exits 0 whatever it finds (a missing tool is a
# finding), 2 when REPORT_DIR cannot be written.
set -uo pipefail

report=/dev/null
if [[ $# -ge 1 ]]; then
    if ! mkdir -p "$1" || ! : >"$1/machine.txt"; then
        echo "gpu-check: failed to write $1/machine.txt; give a writable directory" >&2
        exit 2
    fi
    report="$1/machine.txt"
fi

section() { printf '\n## %s\n' "$1"; }
# Runs a finding's command; a command that is absent or fails says so
# instead of ending the check.
look() {
    local out
    if out=$(bash -o pipefail -c "$1" 2>&1); then
        printf '%s\n' "${out:-(nothing)}"
    else
        printf '(%s: %s)\n' "$1" "${out:-failed}"
    fi
}

{
    echo "# gpu-check on $(uname -n) at $(date -u +%FT%TZ)"
    section "driver, CUDA version, GPUs"
    look "nvidia-smi --query-gpu=index,name,compute_cap,driver_version,memory.total,memory.free --format=csv"
    look "nvidia-smi | sed -n 3p"
    section "nvcc"
    look "if command -v nvcc; then nvcc --version | tail -2; else echo 'no nvcc on PATH'; fi"
    look "ls -d /usr/local/cuda*/bin/nvcc 2>/dev/null || echo 'no /usr/local/cuda*/bin/nvcc'"
    section "CUDA libraries the dynamic linker finds"
    look "ldconfig -p | grep -E 'libcuda\\.|cublas|curand|nvrtc|cudart' || echo 'none'"
    section "Python packages that carry CUDA libraries"
    for py in python3 python; do
        command -v "$py" >/dev/null || continue
        look "$py -m pip list 2>/dev/null | grep -i -E 'nvidia|torch|cuda' || echo 'none in $py'"
        look "$py -c 'import torch' 2>/dev/null || { echo 'no torch in $py'; exit 0; }; $py -c 'import torch, os; d = os.path.join(os.path.dirname(torch.__file__), \"lib\"); print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda); print(\"\\n\".join(sorted(f for f in os.listdir(d) if \"cu\" in f or \"nvrtc\" in f)))' 2>&1 | head -40"
        break
    done
    section "disk and cores"
    look "df -h / /tmp | uniq"
    look "echo \"\$(nproc) cores; \$(awk '/MemTotal/ {printf \"%.0f\", \$2 / 1048576}' /proc/meminfo) GiB memory\""
} | tee "$report"
exit 0
