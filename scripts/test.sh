#!/usr/bin/env bash
# Runs every test: unit tests, CLI tests, schema checks and the harness tests on
# real redis-server, moto, s3s-fs, nginx and llama-cpp-python's server. Tests
# that need a Kubernetes cluster are ignored here; see docs/development.md ("Tests against
# a cluster"). Arguments go to `cargo test` (a test binary, a filter).
#
# Every test binary runs even when one fails (--no-fail-fast), and the last
# line sums up all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# The test build runs beside setup's installs (it needs none of them).
scripts/setup.sh --while cargo test --locked --quiet --no-run
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --no-fail-fast "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# "test result: ok. 12 passed; 0 failed; 3 ignored; ..." once per binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1); if ($(i) ~ /^ignored;?$/) g += $(i-1) } n++ }
  END { printf "tests: %d binaries run; ignored tests need a cluster (docs/development.md)\n", n; printf "tests: %d passed, %d failed, %d skipped\n", p, f, g }' "$log"
exit "$rc"
