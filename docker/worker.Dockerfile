# syntax=docker/dockerfile:1
# The moe-worker image: the worker built with the `cuda` feature, on NVIDIA's
# CUDA 13.0 runtime image. CUDA is loaded at run time (cudarc dynamic loading):
#   - libcuda.so comes from the node's driver (the NVIDIA container toolkit mounts it);
#   - NVRTC (which compiles kernels/cuda at start-up) and cuBLASLt are in the runtime image;
#   - NVRTC also needs the CUDA headers (cuda_bf16.h, cuda_fp8.h), copied from the devel image.
# The same image runs on CPU-only nodes (spec.worker.device: cpu).
#
#   docker build -f docker/worker.Dockerfile -t ghcr.io/moe-operator/moe-worker:0.1.0 .
#
# Not built in this repository's CI (no container engine there); keep it simple.
# The CUDA version must be 13.0.x (cudarc's `cuda-13000` binding, kernels/src/toolkit.rs).

ARG RUST_VERSION=1.95
ARG CUDA_VERSION=13.0.2
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# No CUDA is needed to build: the libraries are opened at run time.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p moe-worker --features cuda --bin moe-worker \
 && install -D -m 0755 target/release/moe-worker /out/moe-worker

FROM docker.io/nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS cuda-devel

FROM docker.io/nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
# Only the headers NVRTC includes; no compiler.
COPY --from=cuda-devel /usr/local/cuda/targets/x86_64-linux/include/ /usr/local/cuda/targets/x86_64-linux/include/
# cudarc opens NCCL as `libnccl.so` (the development name); the runtime image
# has libnccl.so.2 only. The test fails the build if NCCL is not there.
RUN ln -sfn targets/x86_64-linux/include /usr/local/cuda/include \
 && ln -sf libnccl.so.2 /usr/lib/x86_64-linux-gnu/libnccl.so && test -e /usr/lib/x86_64-linux-gnu/libnccl.so \
 && groupadd --gid 65532 nonroot && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin nonroot
COPY --from=build /out/ /usr/local/bin/
# The operator mounts the config, /tmp, /dev/shm and the state volume; the root
# filesystem stays read-only.
ENV MOE_CUDA_HOME=/usr/local/cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/moe-worker"]
CMD ["train", "--config", "/etc/moe/config.json"]
