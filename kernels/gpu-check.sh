#!/usr/bin/env bash
# The GPU check, run on a GPU machine from the repository root. Builds
# nothing: it runs the `moe-gpu-check` binary built beforehand on a build host
#
#   cargo build --release -p moe-worker --features cuda --bin moe-gpu-check
#   mkdir -p .gpu && cp target/release/moe-gpu-check .gpu/
#   cargo build --release -p moe-worker --features cuda --bin moe-worker   # optional:
#   cp target/release/moe-worker .gpu/               # also runs gpu-train-check.sh
#                                                    # and gpu-serve-check.sh
#
# and carried along (.gpu/ is git-ignored). It finds NVRTC, cuBLASLt and the
# CUDA headers on the machine (a CUDA toolkit, or NVIDIA's Python wheels),
# checks every CUDA op against its CPU reference (the check group "serve"
# reads the Hugging Face fixtures under worker/tests/fixtures/hf, so run it
# from the repository root), runs the benchmarks, and
# writes gpu-report.md / gpu-report.json (and the full log) to $OUT, or to
# the directory given as the first argument. Exits non-zero when a check fails.
set -uo pipefail
out=${1:-${OUT:-gpu-report}}
bin=${MOE_GPU_CHECK_BIN:-.gpu/moe-gpu-check}
mkdir -p "$out"
log=$out/gpu-check.log
exec > >(tee "$log") 2>&1

[ -x "$bin" ] || { echo "gpu-check: $bin missing: build it first (see the header of $0)"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true

# CUDA libraries: the machine's toolkit first, then the pip wheels beside python3.
libdirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libdirs+=("$d")
done
wheels=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || true)
[ -n "$wheels" ] && [ -d "$wheels/lib" ] && libdirs+=("$wheels/lib")
# NCCL (the "nccl" check group): cudarc opens `libnccl.so`, the development
# name, and machines often have only the runtime's libnccl.so.2, so it is
# linked under that name in a scratch directory.
nccl=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 / {print $NF; exit}')
nvidia_root=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
if [ -z "$nccl" ] && [ -n "$nvidia_root" ]; then
  nccl=$(find "$nvidia_root" -name 'libnccl.so.2' 2>/dev/null | head -n 1)
fi
if [ -n "$nccl" ]; then
  nccl_dir=$(mktemp -d)
  ln -sf "$nccl" "$nccl_dir/libnccl.so"
  libdirs+=("$nccl_dir" "$(dirname "$nccl")")
  echo "gpu-check: NCCL from $nccl"
else
  echo "gpu-check: libnccl.so.2 not found: the nccl checks will fail, naming it"
fi
export LD_LIBRARY_PATH=$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [ -z "${MOE_CUDA_HOME:-}" ]; then
  for home in /usr/local/cuda "$wheels"; do
    if [ -n "$home" ] && [ -f "$home/include/cuda_bf16.h" ]; then export MOE_CUDA_HOME=$home; break; fi
  done
fi
echo "gpu-check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH MOE_CUDA_HOME=${MOE_CUDA_HOME:-unset}"

# The whole script keeps to MOE_GPU_CHECK_BUDGET seconds (default 570: a
# device call's limit is 600, and what the call is cut at is lost with it).
# Each stage gets its own limit or what is left, whichever is less; a stage
# with under 20 s left is skipped and named, with the command that runs it
# alone in a second call.
budget=${MOE_GPU_CHECK_BUDGET:-570}
deadline=$((SECONDS + budget))
skipped=()
stage() { # name limit command...: runs the command within the limit and what is left
  local name=$1 limit=$2 left=$((deadline - SECONDS)) start=$SECONDS rc
  shift 2
  if [ "$left" -lt 20 ]; then
    echo "gpu-check: skipped $name: ${left} s left of the ${budget} s budget"
    skipped+=("$name")
    return 125
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  timeout "$limit" "$@"
  rc=$?
  echo "gpu-check: $name exited $rc after $((SECONDS - start)) s (limit $limit s)"
  return $rc
}

# MOE_GPU_CHECK_ARGS: more arguments, e.g. '--groups fp8,flash --checks-only'.
# 400 s: the checks, then five timed and profiled steps of a 1.5B-parameter
# model (each built on the host first); the step figures are also printed as
# they are measured, so a cut-short run keeps them in the log.
# shellcheck disable=SC2086
stage moe-gpu-check 400 "$bin" --out "$out" ${MOE_GPU_CHECK_ARGS:-}
status=$?

# `moe-worker train` end to end (device: cuda vs cpu, then a resume), and
# `moe-worker serve --device cuda` on the Hugging Face fixtures, when the
# worker binary came along.
if [ -x "${MOE_WORKER_BIN:-.gpu/moe-worker}" ]; then
  for check in train serve; do
    stage "gpu-$check-check" 300 bash "$(dirname "$0")/gpu-$check-check.sh" "$out"
    rc=$?
    [ "$status" -eq 0 ] && status=$rc
  done
fi
for name in "${skipped[@]}"; do
  case $name in
    moe-gpu-check) echo "gpu-check: run it alone: bash kernels/gpu-check.sh with MOE_WORKER_BIN=/nonexistent" ;;
    *) echo "gpu-check: run it alone: bash kernels/$name.sh \$OUT" ;;
  esac
done
exit $status
