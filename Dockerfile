# syntax=docker/dockerfile:1
#
# The modelcache image: one static binary (controller, fetch, warm,
# calibrate) on a distroless base, running as non-root with nothing else in
# it. Build from the repository root:
#
#   docker build -t ghcr.io/modelcache/modelcache:0.1.0 .
#
# Reproducible from this file alone: the toolchain is pinned (and matches
# rust-toolchain.toml), dependencies are locked (--locked), nothing is
# downloaded but the crates in Cargo.lock. Pin the two base images by digest
# in your registry mirror for byte-identical rebuilds.
#
# The binary is glibc linked statically (crt-static): no shared library is
# loaded at run time, which `scripts/static-check.sh` verifies on the same
# build and then runs the binary in an empty root as user 65532. GPU builds
# use Dockerfile.cuda instead (CUDA is loaded dynamically there).

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# Source only: the tests, examples and benchmarks' data are not needed, but
# Cargo.toml names the benchmarks, so their files come along.
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY src src
COPY benches benches
COPY crds crds
ENV RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_TERM_COLOR=never \
    SOURCE_DATE_EPOCH=0
# No GPU probe in the static build (it loads the CUDA driver library at run
# time); the GPU image has it.
RUN cargo build --locked --release --target x86_64-unknown-linux-gnu \
      --no-default-features --bin modelcache \
 && cp target/x86_64-unknown-linux-gnu/release/modelcache /modelcache
# Fail the build unless the binary is static and answers.
RUN if readelf -l /modelcache | grep -q INTERP; then echo "modelcache is not static" >&2; exit 1; fi \
 && /modelcache version \
 && /modelcache crd --check /src/crds

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /modelcache /modelcache
# The same user as the chart's podSecurityContext and the injected containers.
USER 65532:65532
ENTRYPOINT ["/modelcache"]
