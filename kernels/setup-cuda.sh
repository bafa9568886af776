#!/usr/bin/env bash
# Installs what compiling the kernels needs, without a GPU or a CUDA toolkit:
# NVRTC, the CUDA headers and ptxas, from NVIDIA's PyPI wheels (CUDA 13.0, the
# version cudarc's `cuda-13000` binds to and the GPU machines' driver runs).
# Idempotent; prints the CUDA home (include/, lib/, bin/) it installed, which
# moe-kernels finds by itself (kernels/src/toolkit.rs).
#
#   kernels/setup-cuda.sh            # ~/.cache/moe-operator/cuda-13.0.88
#   MOE_CUDA_CACHE=/some/dir kernels/setup-cuda.sh
set -euo pipefail

# Keep the directory name in step with SETUP_DIR_NAME in kernels/src/toolkit.rs.
NVRTC_VERSION=13.0.88
RUNTIME_VERSION=13.0.96 # cuda_runtime, cuda_bf16.h, cuda_fp8.h
NVCC_VERSION=13.0.88    # ptxas
CRT_VERSION=13.0.88     # crt/ headers the runtime headers include

cache=${MOE_CUDA_CACHE:-$HOME/.cache/moe-operator}
dest=$cache/cuda-$NVRTC_VERSION
home=$dest/nvidia/cu13

if [ ! -f "$dest/.complete" ]; then
  mkdir -p "$cache"
  staging=$(mktemp -d "$cache/.cuda-staging.XXXXXX")
  trap 'rm -rf "$staging"' EXIT
  echo "setup-cuda: installing NVRTC $NVRTC_VERSION, CUDA headers and ptxas into $dest" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
    --target "$staging" \
    "nvidia-cuda-nvrtc==$NVRTC_VERSION" \
    "nvidia-cuda-runtime==$RUNTIME_VERSION" \
    "nvidia-cuda-nvcc==$NVCC_VERSION" \
    "nvidia-cuda-crt==$CRT_VERSION" >&2
  for required in lib/libnvrtc.so.13 include/cuda_bf16.h include/cuda_fp8.h bin/ptxas; do
    [ -e "$staging/nvidia/cu13/$required" ] || { echo "setup-cuda: $required missing after install" >&2; exit 1; }
  done
  touch "$staging/.complete"
  rm -rf "$dest"
  mv "$staging" "$dest"
  trap - EXIT
fi
echo "$home"
