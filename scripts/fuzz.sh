#!/usr/bin/env bash
# Fuzzes every parser of untrusted bytes (fuzz/, cargo fuzz with libFuzzer)
# for a bounded time each. Not part of CI: run it by hand, or nightly.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    (default 60 s, all)
#
# Each target starts from fuzz/seeds/<target> and fuzz/corpus/<target> and
# adds what it finds to the corpus, which is then minimized (cargo fuzz cmin)
# and kept in the repository as fuzz/corpus.tar.gz (unpacked here first). A crash leaves its input in
# fuzz/artifacts/<target>/; copy it into fuzz/regressions/<target>/ under a
# name that says what it found, fix the cause, and tests/fuzz_regressions.rs
# keeps it fixed. Exit status: 1 if any target crashed, timed out or ran out
# of memory.
#
# Built without a sanitizer (`-s none`): the code is safe Rust, so what is
# sought is panics (overflow checks on: `-a`), unbounded memory
# (-rss_limit_mb) and hangs (-timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
fuzz=(cargo +nightly fuzz)
flags=(-s none -a)

"${fuzz[@]}" build "${flags[@]}"
if [ -f fuzz/corpus.tar.gz ]; then
  tar -xzf fuzz/corpus.tar.gz -C fuzz
fi
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <("${fuzz[@]}" list)
fi

failed=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log=$(mktemp)
  set +e
  "${fuzz[@]}" run "${flags[@]}" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=1048576 \
    -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  runs=$(awk '/stat::number_of_executed_units/ { print $NF }' "$log" | tail -1)
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    echo "fuzz: $t FAILED (exit $rc); the input is in fuzz/artifacts/$t/:"
    grep -E 'panicked|ERROR|SUMMARY|deadly signal|Test unit written' "$log" | head -8 || true
  fi
  "${fuzz[@]}" cmin "${flags[@]}" "$t" "fuzz/corpus/$t" >/dev/null 2>&1 || true
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  summary+=("$(printf '%-18s %12s runs  %6s corpus  %s' "$t" "${runs:-?}" "$corpus" "$([ "$rc" -eq 0 ] && echo ok || echo FAILED)")")
  rm -f "$log"
done

# Packed reproducibly, so that an unchanged corpus is an unchanged file.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=2026-01-01 \
  -czf fuzz/corpus.tar.gz -C fuzz corpus
echo "fuzz: ${seconds}s per target"
printf 'fuzz: %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: ${#failed[@]} failed: ${failed[*]}"
  exit 1
fi
