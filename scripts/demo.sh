#!/usr/bin/env bash
# The main job, end to end on this machine, without a cluster. For now it
# generates the CRDs from the Rust types, checks them against crds/ and against
# Kubernetes 1.30 and 1.37 schemas, validates the examples, and shows a bad
# resource being rejected. Later capabilities extend it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

step() { printf '\n==> %s\n' "$*"; }

step "Building modelcache"
cargo build --locked --quiet
bin=target/debug/modelcache
"$bin" version

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step "Generating the CRDs from the Rust types"
"$bin" crd --out-dir "$work/crds"
"$bin" crd --check crds
diff -r "$work/crds" crds && echo "  crds/ is byte-identical to the generated files"
"$bin" crd | grep -E '^  name: ' | sed 's/^  name: /  generated /'

step "Validating the CRDs with kubernetes-validate --strict"
for version in 1.30.0 1.37.0; do
  python3 -m kubernetes_validate --strict --quiet -k "$version" crds/*.yaml
  echo "  Kubernetes $version: both CRDs pass"
done

step "Validating the examples against the generated schemas (schema and CEL rules)"
"$bin" validate examples/*.yaml

step "Rejecting deliberately bad resources"
for bad in tests/fixtures/invalid/*.yaml; do
  if "$bin" validate "$bad"; then
    echo "expected $bad to be rejected" >&2
    exit 1
  fi
done 2>/dev/null

step "Done: CRDs generated and valid, examples valid, bad resources rejected"
