# syntax=docker/dockerfile:1
# The moe-operator image: the operator binary (and moectl) on distroless, as
# UID 65532. No CUDA: the operator never links the worker or the kernels.
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/moe-operator/moe-operator:0.1.0 .
#
# Not built in this repository's CI (no container engine there); keep it simple.

ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p moe-operator --bin moe-operator --bin moectl \
 && install -D -m 0755 target/release/moe-operator /out/moe-operator \
 && install -D -m 0755 target/release/moectl /out/moectl

# glibc (the build is Debian 12's), CA certificates, a nonroot user (65532); no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/moe-operator"]
