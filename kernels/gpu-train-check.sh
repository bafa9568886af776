#!/usr/bin/env bash
# `moe-worker train` end to end on the GPU, against the same run on the CPU.
# Run by kernels/gpu-check.sh when .gpu/moe-worker was carried along:
#
#   cargo build --release -p moe-worker --features cuda --bin moe-worker
#   cp target/release/moe-worker .gpu/
#
# 1. device: cuda, 40 steps, checkpoints every 20;  2. the same config on
# device: cpu;  3. the CUDA run continued to 60 steps (resumes from step 40);
# 4. data parallelism on the device: the same 40 steps as two ranks (the
# worker's own launcher, processesPerNode 2) sharing the one GPU, so over
# TCP (MOE_COLLECTIVE_BACKEND=tcp: NCCL refuses two ranks on one GPU), each
# rank one of the two micro-batches of every step, gradients averaged;
# 5. the 40 steps of run 1 with training.precision.compute bf16 (the linear
# layers' and LM head's GEMMs on bf16 tensor cores); 6. expert parallelism on
# the device: the 40 steps as two ranks each holding half the routed experts
# (expertParallel 2, rows exchanged through host memory over TCP, the GPU shared);
# 7. sequence parallelism on the device: the 40 steps as two ranks each holding
# half of every sequence (sequenceParallel 2, Ulysses attention over TCP);
# 8. the 40 steps of run 1 in FP8 (training.precision.fp8, blockwise, with
# compute bf16: the linear layers' GEMMs on cuBLASLt's block-scaled FP8
# tensor cores, the LM head in bf16), and the same config on the CPU's FP8
# emulation; 11. and 12. the same two with the tensorwise recipe (one delayed
# scale per tensor, amax histories kept on the device).
# 9. and 10. runs 1 and 7 with the flash attention kernels
# (MOE_CUDA_ATTENTION=flash; opt-in until this passes on a GPU).
# 13. run 5 with the routed experts' GEMMs grouped where cuBLASLt runs
# grouped GEMMs (MOE_CUDA_GROUPED_GEMM=1: 13.4+) and spread over four
# streams otherwise (MOE_CUDA_EXPERT_STREAMS=4), both opt-in until this
# passes on a GPU (the "training on the GPU" line says which ran).
# 14. and 15. LoRA adapters (training.lora: rank 8 on every projection, the
# routed experts' too; CHECK_LORA=1) trained for 40 steps on the device and
# on the CPU (compile-checked until this passes on a GPU).
# Passes when both runs learn (final loss well under the first), their final
# losses agree within 3% (TF32 GEMMs drift apart step by step), the resumed
# run starts at step 40, and the two-rank run starts from the one-rank run's
# first loss (within 1e-5: the same micro-batches, averaged in another
# order) and ends within 1% of it, and the bf16 run learns and ends within 3%
# of the TF32 run, and the expert- and sequence-parallel runs start and end as
# the two-rank data-parallel one is bound to (the sequence-parallel first loss
# within 1e-4: its GEMMs see half the rows), the FP8 run learns, ends within
# 3% of the CPU's FP8 run and within 5% of the TF32 run (the CPU emulation
# measured +0.25% over FP32 on tiny.yaml), the tensorwise FP8 run likewise
# against the CPU's tensorwise run, and the flash runs start within
# 1e-4 of run 1 (another TF32 rounding of attention) and end within 1% of it,
# and run 13 starts within 1e-5 of run 5 (the same bf16 operands, f32 sums
# in another order) and ends within 1% of it, and the LoRA runs learn, start
# within 1e-4 of each other (the same model, TF32 against exact f32) and end
# within 3%.
# Writes train-check.md to the given directory.
#
# MOE_CHECK_DEVICE=cpu runs the "cuda" runs on the CPU instead: a rehearsal of
# this script (its launches, resume and comparisons) on a machine without a
# GPU, with a CPU-only worker, before spending GPU time on it.
set -uo pipefail
out=${1:?usage: gpu-train-check.sh OUT_DIR}
bin=${MOE_WORKER_BIN:-.gpu/moe-worker}
gpu=${MOE_CHECK_DEVICE:-cuda}
work=$(mktemp -d)
mkdir -p "$out"
report=$out/train-check.md
export MOE_STATUS_ADDR=off

config() { # device steps dir [ranks] [compute: fp32, bf16, fp8 or fp8tw] [expertParallel] [sequenceParallel]
  python3 - "$@" <<'EOF'
import json, os, sys
device, steps, d = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ranks = int(sys.argv[4]) if len(sys.argv) > 4 else 1
compute = sys.argv[5] if len(sys.argv) > 5 else "fp32"
ep = int(sys.argv[6]) if len(sys.argv) > 6 else 1
sp = int(sys.argv[7]) if len(sys.argv) > 7 else 1
print(json.dumps({
    "job": "local/gpu-train-check",
    "model": {"hiddenSize": 256, "layers": 4, "denseLayers": 1, "denseHiddenSize": 512,
              "attentionHeads": 8, "kvHeads": 2, "seqLen": 128,
              "moe": {"experts": 16, "topK": 4, "sharedExperts": 1, "expertHiddenSize": 128,
                      "router": "sigmoid", "groups": 4, "topGroups": 2,
                      "balancing": {"auxLossFree": {"enabled": True, "biasUpdateRate": 0.001}}}},
    "data": {"builtin": {"corpus": "tiny"}},
    "training": {"steps": steps, "globalBatchSize": 16, "microBatchSize": 8, "seed": 3,
                 "logIntervalSteps": 10,
                 "precision": ({"compute": "bf16", "fp8": {"enabled": True,
                                "recipe": "tensorwise" if compute == "fp8tw" else "blockwise"}}
                               if compute.startswith("fp8") else {"compute": compute}),
                 "optimizer": {"learningRate": 0.003, "minLearningRate": 0.0003, "warmupSteps": 5},
                 **({"lora": {"rank": 8, "alpha": 16, "routedExperts": True,
                              "targets": ["q_proj", "k_proj", "v_proj", "o_proj",
                                          "gate_proj", "up_proj", "down_proj"]}}
                    if os.environ.get("CHECK_LORA") == "1" else {})},
    "parallelism": {"processesPerNode": ranks, "expertParallel": ep, "sequenceParallel": sp},
    "checkpoint": {"dir": d + "/checkpoints", "intervalSteps": 20, "keep": 2, "resume": "Auto"},
    "device": device,
    "outputDir": d + "/out"}))
EOF
}

# The CPU references run beside the device runs, each on a quarter of the
# host's cores: a CPU worker's results are the same to the bit on any
# number of threads, and on one thread the three of them took longer than
# all the device runs together.
cpu_threads=$(( $(nproc) / 4 ))
[ "$cpu_threads" -ge 1 ] || cpu_threads=1

run() { # name device steps dir [ranks] [compute] [expertParallel] [sequenceParallel]
  local ranks=${5:-1} threads=()
  config "$2" "$3" "$4" "$ranks" "${6:-fp32}" "${7:-1}" "${8:-1}" >"$work/$1.json"
  [ "$2" = cpu ] && threads=(--threads "$cpu_threads")
  local started=$SECONDS
  if [ "$ranks" -gt 1 ]; then
    MOE_WORLD_SIZE=$ranks MOE_PROCS_PER_NODE=$ranks MOE_NODE_RANK=0 \
      MOE_COORDINATOR=127.0.0.1:$((20000 + RANDOM % 20000)) MOE_COLLECTIVE_BACKEND=tcp \
      "$bin" train --config "$work/$1.json" "${threads[@]}" >"$work/$1.summary" 2>"$work/$1.log"
  else
    "$bin" train --config "$work/$1.json" "${threads[@]}" >"$work/$1.summary" 2>"$work/$1.log"
  fi
  local status=$?
  echo "$1: exit $status after $((SECONDS - started)) s: $(cat "$work/$1.summary")"
  [ "$status" -eq 0 ] || tail -20 "$work/$1.log"
  return $status
}

{
  echo "# moe-worker train on the GPU vs the CPU"
  echo
  echo '```'
  # The CPU references, in the background (each prints its line when it ends).
  run cpu cpu 40 "$work/cpu" &
  run fp8cpu cpu 40 "$work/fp8cpu" 1 fp8 &
  run fp8twcpu cpu 40 "$work/fp8twcpu" 1 fp8tw &
  CHECK_LORA=1 run loracpu cpu 40 "$work/loracpu" &
  run cuda "$gpu" 40 "$work/cuda"
  run resumed "$gpu" 60 "$work/cuda"
  run dp2 "$gpu" 40 "$work/dp2" 2
  run bf16 "$gpu" 40 "$work/bf16" 1 bf16
  run ep2 "$gpu" 40 "$work/ep2" 2 fp32 2
  run sp2 "$gpu" 40 "$work/sp2" 2 fp32 1 2
  run fp8 "$gpu" 40 "$work/fp8" 1 fp8
  run fp8tw "$gpu" 40 "$work/fp8tw" 1 fp8tw
  MOE_CUDA_ATTENTION=flash run flash "$gpu" 40 "$work/flash"
  MOE_CUDA_ATTENTION=flash run sp2flash "$gpu" 40 "$work/sp2flash" 2 fp32 1 2
  MOE_CUDA_GROUPED_GEMM=1 MOE_CUDA_EXPERT_STREAMS=4 run bf16fast "$gpu" 40 "$work/bf16fast" 1 bf16
  CHECK_LORA=1 run lora "$gpu" 40 "$work/lora"
  wait
  grep -h "training on the GPU\|resuming" "$work/cuda.log" "$work/resumed.log" "$work/bf16fast.log"
  echo '```'
} | tee "$report"

python3 - "$work" <<'EOF' | tee -a "$report"
import json, sys
work = sys.argv[1]
def summary(name):
    try:
        return json.load(open(f"{work}/{name}.summary"))
    except Exception as error:
        return {"error": str(error)}
cuda, cpu, resumed = summary("cuda"), summary("cpu"), summary("resumed")
dp2, bf16, ep2, sp2 = summary("dp2"), summary("bf16"), summary("ep2"), summary("sp2")
flash, sp2flash = summary("flash"), summary("sp2flash")
failures = []
for name, s in (("cuda", cuda), ("cpu", cpu)):
    if "finalLoss" not in s:
        failures.append(f"{name}: no summary ({s})")
    elif not s["finalLoss"] < 0.8 * s["initialLoss"]:
        failures.append(f"{name}: did not learn ({s['initialLoss']:.3f} -> {s['finalLoss']:.3f})")
if not failures:
    gap = abs(cuda["finalLoss"] - cpu["finalLoss"]) / cpu["finalLoss"]
    print(f"\nfinal loss after 40 steps: cuda {cuda['finalLoss']:.4f}, cpu {cpu['finalLoss']:.4f} "
          f"(relative gap {gap:.2%}, bound 3%); tokens/s cuda {cuda['tokensPerSecond']:.0f}, "
          f"cpu {cpu['tokensPerSecond']:.0f} ({cuda['tokensPerSecond'] / cpu['tokensPerSecond']:.1f}x)")
    if gap > 0.03:
        failures.append(f"final losses differ by {gap:.2%}")
if resumed.get("steps") != 60 or resumed.get("initialLoss") != cuda.get("initialLoss"):
    failures.append(f"resume: expected 60 steps continuing the first run, got {resumed}")
def same_run(name, label, other, first_bound):
    """`other` trained the one-rank run's 40 steps another way: its first
    loss within `first_bound` of the one-rank run's, its last within 1%."""
    if "finalLoss" not in other or "finalLoss" not in cuda:
        failures.append(f"{name}: no summary ({other})")
        return
    first = abs(other["initialLoss"] - cuda["initialLoss"]) / cuda["initialLoss"]
    last = abs(other["finalLoss"] - cuda["finalLoss"]) / cuda["finalLoss"]
    print(f"\n{label}: first loss {other['initialLoss']:.6f} vs {cuda['initialLoss']:.6f} "
          f"({first:.1e}, bound {first_bound:.0e}), final {other['finalLoss']:.4f} vs "
          f"{cuda['finalLoss']:.4f} ({last:.2%}, bound 1%); tokens/s {other['tokensPerSecond']:.0f}")
    if first > first_bound or last > 0.01:
        failures.append(f"{name}: first loss {first:.1e} apart, final {last:.2%}")

same_run("data parallel", "data parallel, 2 ranks on one GPU over TCP", dp2, 1e-5)
same_run("expert parallel", "expert parallel 2 (half the experts per rank) on one GPU over TCP",
         ep2, 1e-5)
same_run("sequence parallel",
         "sequence parallel 2 (half of every sequence per rank) on one GPU over TCP", sp2, 1e-4)
same_run("flash attention", "flash attention kernels (MOE_CUDA_ATTENTION=flash)", flash, 1e-4)
same_run("flash attention, sequence parallel",
         "flash attention kernels, sequence parallel 2 on one GPU over TCP", sp2flash, 1e-4)
bf16fast = summary("bf16fast")
if "finalLoss" not in bf16fast or "finalLoss" not in bf16:
    failures.append(f"bf16, grouped or streamed expert GEMMs: no summary ({bf16fast})")
else:
    first = abs(bf16fast["initialLoss"] - bf16["initialLoss"]) / bf16["initialLoss"]
    last = abs(bf16fast["finalLoss"] - bf16["finalLoss"]) / bf16["finalLoss"]
    print(f"\nbf16, routed experts grouped (cuBLASLt 13.4+) or over 4 streams vs one GEMM per "
          f"expert on one stream: first loss {first:.1e} apart (bound 1e-5), final {last:.2%} "
          f"(bound 1%); tokens/s {bf16fast['tokensPerSecond']:.0f} vs {bf16['tokensPerSecond']:.0f}")
    if first > 1e-5 or last > 0.01:
        failures.append(f"bf16 grouped/streamed vs loop: first loss {first:.1e} apart, final {last:.2%}")
if "finalLoss" not in bf16 or "finalLoss" not in cuda:
    failures.append(f"bf16 compute: no summary ({bf16})")
else:
    gap = abs(bf16["finalLoss"] - cuda["finalLoss"]) / cuda["finalLoss"]
    print(f"\nbf16 GEMMs: loss {bf16['initialLoss']:.4f} -> {bf16['finalLoss']:.4f}, final vs TF32 "
          f"{gap:.2%} (bound 3%); tokens/s {bf16['tokensPerSecond']:.0f} "
          f"({bf16['tokensPerSecond'] / cuda['tokensPerSecond']:.2f}x TF32)")
    if not bf16["finalLoss"] < 0.8 * bf16["initialLoss"] or gap > 0.03:
        failures.append(f"bf16 compute: {bf16['initialLoss']:.3f} -> {bf16['finalLoss']:.3f}, {gap:.2%} from TF32")
for name, what in (("fp8", "FP8 linear layers (blockwise)"), ("fp8tw", "FP8 linear layers (tensorwise)")):
    fp8, fp8cpu = summary(name), summary(name + "cpu")
    if "finalLoss" not in fp8 or "finalLoss" not in fp8cpu or "finalLoss" not in cuda:
        failures.append(f"{name}: no summary (device {fp8}, cpu {fp8cpu})")
        continue
    emulated = abs(fp8["finalLoss"] - fp8cpu["finalLoss"]) / fp8cpu["finalLoss"]
    tf32 = abs(fp8["finalLoss"] - cuda["finalLoss"]) / cuda["finalLoss"]
    print(f"\n{what}: loss {fp8['initialLoss']:.4f} -> {fp8['finalLoss']:.4f}, final vs the "
          f"CPU's FP8 emulation {fp8cpu['finalLoss']:.4f} ({emulated:.2%}, bound 3%), vs TF32 {tf32:.2%} "
          f"(bound 5%); tokens/s {fp8['tokensPerSecond']:.0f} "
          f"({fp8['tokensPerSecond'] / cuda['tokensPerSecond']:.2f}x TF32)")
    if not fp8["finalLoss"] < 0.8 * fp8["initialLoss"] or emulated > 0.03 or tf32 > 0.05:
        failures.append(f"{name}: {fp8['initialLoss']:.3f} -> {fp8['finalLoss']:.3f}, "
                        f"{emulated:.2%} from the CPU's FP8, {tf32:.2%} from TF32")
lora, loracpu = summary("lora"), summary("loracpu")
if "finalLoss" not in lora or "finalLoss" not in loracpu:
    failures.append(f"lora: no summary (device {lora}, cpu {loracpu})")
else:
    first = abs(lora["initialLoss"] - loracpu["initialLoss"]) / loracpu["initialLoss"]
    last = abs(lora["finalLoss"] - loracpu["finalLoss"]) / loracpu["finalLoss"]
    print(f"\nLoRA adapters: loss {lora['initialLoss']:.4f} -> {lora['finalLoss']:.4f}, vs the CPU's "
          f"{loracpu['initialLoss']:.4f} -> {loracpu['finalLoss']:.4f}: first {first:.1e} apart "
          f"(bound 1e-4), final {last:.2%} (bound 3%); tokens/s {lora['tokensPerSecond']:.0f} "
          f"({lora['tokensPerSecond'] / cuda['tokensPerSecond']:.2f}x the whole model's)")
    if not lora["finalLoss"] < 0.95 * lora["initialLoss"] or first > 1e-4 or last > 0.03:
        failures.append(f"lora: {lora['initialLoss']:.3f} -> {lora['finalLoss']:.3f}, "
                        f"first {first:.1e}, final {last:.2%} from the CPU's")
print("\nPASS" if not failures else "\nFAIL: " + "; ".join(failures))
sys.exit(1 if failures else 0)
EOF
