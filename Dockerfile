# syntax=docker/dockerfile:1
# The chatrelease-operator image: build with the Rust toolchain, run the one binary on distroless.
#   docker build -t chatrelease-operator:0.1.0 .
# Only Cargo.toml, Cargo.lock and src/ reach the build (.dockerignore).

# Bookworm, as the runtime below: the binary links the same glibc it runs on. The version is the
# toolchain the project is tested with (rust-version in Cargo.toml is the minimum).
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cache mounts keep the crate downloads and compiled dependencies between builds; the binary is
# copied out because the target directory is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin chatrelease-operator \
 && install -D -m 0755 target/release/chatrelease-operator /out/chatrelease-operator

# glibc and libgcc, CA certificates, no shell, no package manager; runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/chatrelease-operator /usr/local/bin/chatrelease-operator
USER 65532:65532
# /metrics, /healthz, /readyz (the chart passes --metrics-addr=0.0.0.0:8080).
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/chatrelease-operator"]
CMD ["run"]
