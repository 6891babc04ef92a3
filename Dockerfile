# One image for every swimlane process; the command picks the worker:
#   swimlane-ingest | swimlane-trainer | swimlane-validator | swimlane-publisher
#   swimlane admin init | swimlane admin create-topics | swimlane admin token create ...
# Built with FoundationDB (`fdb`) and Kafka (`kafka`) support. How to run it:
# docs/operations.md. Checked by `hadolint Dockerfile` (deploy/check.sh).

ARG RUST_VERSION=1.95
# The FoundationDB client library must speak the server's protocol: take it from the
# official FoundationDB image of the version the stack runs (deploy/compose.yaml).
ARG FDB_VERSION=7.3.63

FROM foundationdb/foundationdb:${FDB_VERSION} AS fdb

FROM rust:${RUST_VERSION}-bookworm AS build
# libclang-dev: bindgen, run by the foundationdb crate's build script. No protoc: the
# binaries do not depend on candle-onnx (a test-only dependency of swimlane-model).
# librdkafka is built from source by rdkafka's build script with the image's C toolchain.
# Not version-pinned (DL3008): Debian stable only ships security fixes within a
# release, and an exact pin breaks the build as soon as the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev \
 && rm -rf /var/lib/apt/lists/*
COPY --from=fdb /usr/lib/libfdb_c.so /usr/lib/libfdb_c.so
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p swimlane -p swimlane-ingest -p swimlane-trainer -p swimlane-validator -p swimlane-publisher \
      --features swimlane-runtime/fdb,swimlane-runtime/kafka \
 && mkdir -p /out \
 && cp target/release/swimlane target/release/swimlane-ingest target/release/swimlane-trainer \
       target/release/swimlane-validator target/release/swimlane-publisher /out/

FROM debian:bookworm-slim
# curl: the /healthz probe of compose's healthchecks. Not version-pinned: see above.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 swimlane \
 && useradd --system --uid 10001 --gid swimlane --no-create-home --shell /usr/sbin/nologin swimlane
COPY --from=fdb /usr/lib/libfdb_c.so /usr/lib/libfdb_c.so
COPY --from=build /out/ /usr/local/bin/
# Nothing is written inside the image: the store is FoundationDB (or a mounted
# directory), the bus Kafka; the root filesystem can be read-only.
USER 10001:10001
# API (ingest 8080, publisher 8081) and /metrics, /healthz, /readyz (9101-9104).
EXPOSE 8080 8081 9101 9102 9103 9104
CMD ["swimlane", "--help"]
