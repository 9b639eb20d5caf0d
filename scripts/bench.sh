#!/usr/bin/env bash
# Runs the benchmarks (release build), each reporting ratios against a
# baseline measured in the same run. `scripts/bench.sh` runs all; name one to
# run only it (`scripts/bench.sh sweep`). Not part of CI: they take minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/setup.sh --bench
# The gateway benchmark's ceiling server.
cargo build --locked --release --quiet --example ceiling
if [ $# -eq 0 ]; then
  cargo bench --locked
else
  for b in "$@"; do cargo bench --locked --bench "$b"; done
fi
