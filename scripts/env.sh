# Sourced by the project's scripts (setup, test, demo, bench): where
# scripts/setup.sh puts what it installs, and that place first on PATH, so
# that `python3`, moto, kubernetes-validate, llama-cpp-python's server, helm,
# kubectl and s3s-fs are the ones setup checked. The test harness finds the
# same Python without it (tests/support::python), so a plain `cargo test`
# works too.
MODELCACHE_CACHE="${MODELCACHE_CACHE:-$HOME/.cache/modelcache}"
# A virtual environment of the project's own: Debian's python3 refuses
# `pip install` outside one (PEP 668), and the tests then see exactly the
# packages installed here, not whatever the machine's Python has.
export MODELCACHE_VENV="${MODELCACHE_VENV:-$MODELCACHE_CACHE/venv}"
export MODELCACHE_TOOLS="${MODELCACHE_TOOLS:-$MODELCACHE_CACHE/tools}"
export MODELCACHE_WHEELS="${MODELCACHE_WHEELS:-$MODELCACHE_CACHE/wheels}"
# The benchmarks' peers (scripts/setup.sh --bench): LiteLLM's proxy.
export MODELCACHE_BENCH_VENV="${MODELCACHE_BENCH_VENV:-$MODELCACHE_CACHE/venv-litellm}"
export PATH="$MODELCACHE_VENV/bin:$MODELCACHE_TOOLS/bin:${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
