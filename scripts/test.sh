#!/usr/bin/env bash
# Runs every test: unit tests, CLI tests, schema checks and the harness tests on
# real redis-server, moto, s3s-fs and nginx. Tests that need a Kubernetes
# cluster are ignored here; see README ("Tests against a cluster").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --locked "$@"
