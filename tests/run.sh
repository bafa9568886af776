#!/usr/bin/env bash
# The project's one test command (README, and .ci/run calls exactly this).
#
#   1. lint:  cargo fmt --check, cargo clippy -D warnings
#   2. unit:  cargo test (crds, operator, worker, kernels)
#      cuda:  every CUDA kernel compiled by NVRTC for sm_90a/sm_80 (no GPU needed)
#   3. harness: build the pinned control-plane binaries (cached), check the Helm
#      chart (charts/check.sh), start the control plane
#   4. e2e:   cargo test -p moe-e2e against the real control plane
#      rbac:  then the chart's RBAC against the audit trail of those tests
#   5. down:  stop the control plane (also when something failed)
#
# Knobs: MOE_SKIP_LINT=1 skips phase 1; MOE_SKIP_E2E=1 stops after phase 2;
# MOE_KEEP_CLUSTER=1 leaves the control plane running afterwards.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# Incremental state is of little use to a run from a clean checkout and costs
# gigabytes (a copy per test target); cargo run by hand keeps its default.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# A cold run needs some 6 GiB (docs/testing.md, "Disk"): say so now rather
# than with "No space left on device" minutes in.
free_gib=$(df -Pk "$root" | awk 'NR == 2 {print int($4 / 1048576)}')
if (( ${free_gib:-0} < 12 )); then
  echo "tests/run.sh: warning: ${free_gib:-?} GiB free on $root's disk; a cold run writes ~4 GiB under target/, and the control-plane build more the first time" >&2
fi

declare -a timings=()
phase() { # name, command...
  local name=$1 t0=$SECONDS; shift
  echo "=== phase: $name" >&2
  "$@"
  timings+=("$(printf '%-8s %5ss' "$name" $((SECONDS - t0)))")
}
# Every cargo test summary line is collected, so the run ends with one total.
results=$(mktemp)
tested() { # command...: runs it, keeping a copy of its output for the totals
  set -o pipefail
  "$@" 2>&1 | tee -a "$results"
}
report() {
  echo "=== phase timings" >&2
  for t in "${timings[@]}"; do echo "    $t" >&2; done
  # The closing line: totals over all test binaries of this run.
  awk '{for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) }}
       END {printf "tests/run.sh: %d passed, %d failed\n", p, f}' <(grep -E '^test result:' "$results")
  rm -f "$results"
}
trap report EXIT

command -v cargo >/dev/null || { echo "tests/run.sh: cargo is required" >&2; exit 1; }

lint() {
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets --locked -- -D warnings
  # The CUDA glue must keep building without CUDA installed (libraries load at run time).
  cargo clippy -p moe-kernels --features cuda --all-targets --locked -- -D warnings
  cargo clippy -p moe-worker --features cuda --all-targets --locked -- -D warnings
}
[[ ${MOE_SKIP_LINT:-} == 1 ]] || phase lint lint
# The OpenAI Python client, for the serving test that uses it (pinned, cached).
worker/tests/openai-client/setup.sh >/dev/null
# A hung test fails its phase (libtest has named it: "has been running for
# over 60 seconds") instead of the whole run's time limit. The phases take
# minutes; the bounds are several times that.
phase unit tested timeout --kill-after=30 2400 cargo test --locked
# Every CUDA kernel compiles for sm_90a and sm_80 with NVRTC and ptxas from
# PyPI wheels (no GPU, no toolkit); the test fails rather than skips under CI=true.
cuda_compile() {
  kernels/setup-cuda.sh >/dev/null
  (export CI=true; tested cargo test --locked -p moe-kernels --features cuda -- --nocapture)
  # The worker's CUDA backend: its host-side logic and its error without a driver.
  tested cargo test --locked -p moe-worker --features cuda --lib -- cuda:: dist::nccl:: dist::backend::
}
phase cuda cuda_compile

[[ ${MOE_SKIP_E2E:-} == 1 ]] && exit 0

cluster_down() {
  [[ ${MOE_KEEP_CLUSTER:-} == 1 ]] || tests/cluster/down.sh || true
  report
}
trap cluster_down EXIT
phase build tests/cluster/build.sh >/dev/null
# The chart: helm lint --strict and template with default and full values, the values
# schema, CRD gating and the Argo CD health checks (charts/check.sh; needs no cluster).
phase chart tested charts/check.sh
phase up tests/cluster/up.sh
# shellcheck source=/dev/null
source tests/cluster/.state/env
# The e2e tests run the real operator binary as a process.
phase e2e-build cargo build --locked -p moe-operator -p moe-worker --bin moe-operator --bin moectl --bin moe-worker
# When an e2e test fails, what the control plane did that a test did not ask
# for (pods evicted from nodes that went NotReady on a starved host) and what
# the operators warned about, before down.sh moves the logs away.
e2e_diagnosis() {
  local logs=tests/cluster/.state/logs
  echo "=== e2e failed: evictions by the controller-manager, then operator warnings" >&2
  grep -hE 'Deleting pod|NotReady|Marking' "$logs/kube-controller-manager.log" 2>/dev/null | tail -n 20 >&2 || true
  grep -HE 'WARN|ERROR' "$logs"/operator-*.log 2>/dev/null | tail -n 40 >&2 || true
  return 1
}
# Not `phase … || e2e_diagnosis`: errexit is off in the left side of `||`, so
# a failed test would not stop the run.
e2e() {
  if ! tested timeout --kill-after=30 2400 cargo test --locked -p moe-e2e -- --test-threads=12; then
    e2e_diagnosis
  fi
}
phase e2e e2e
# Least privilege, from the apiserver's audit trail of the suites above: every
# permission the chart grants the operator was used, and none was refused.
phase rbac tested cargo test --locked -p moe-e2e --test rbac -- --ignored
