#!/usr/bin/env bash
# LoRA adapters against training the whole model, in the same run: the
# small MoE of kernels/gpu-train-check.sh (hidden 256, 4 blocks, 16 routed
# experts of 128 + a shared one, top-4) on the built-in corpus, 20 steps of
# 16 × 128 tokens on the CPU, release build, three ways, each three times
# interleaved (the machines are shared and noisy): the whole model (the
# baseline), rank-8 adapters on the attention projections (training.lora's
# default targets), and rank-8 adapters on every projection but the routed
# experts'. Prints each run's tokens/s and its ratio to the baseline's
# median, and the gradient and AdamW state each holds.
#
#   bash worker/benches/lora.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p moe-worker --bin moe-worker
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

config() { # name lora-targets-json-or-empty
  python3 - "$work" "$1" "$2" <<'EOF'
import json, sys
work, name, targets = sys.argv[1], sys.argv[2], sys.argv[3]
training = {"steps": 20, "globalBatchSize": 16, "microBatchSize": 8, "seed": 3,
            "logIntervalSteps": 20,
            "optimizer": {"learningRate": 0.003, "minLearningRate": 0.0003, "warmupSteps": 5}}
if targets:
    training["lora"] = {"rank": 8, "alpha": 16, "targets": json.loads(targets)}
print(json.dumps({
    "job": f"local/{name}",
    "model": {"hiddenSize": 256, "layers": 4, "denseLayers": 1, "denseHiddenSize": 512,
              "attentionHeads": 8, "kvHeads": 2, "seqLen": 128,
              "moe": {"experts": 16, "topK": 4, "sharedExperts": 1, "expertHiddenSize": 128,
                      "router": "sigmoid", "groups": 4, "topGroups": 2,
                      "balancing": {"auxLossFree": {"enabled": True, "biasUpdateRate": 0.001}}}},
    "data": {"builtin": {"corpus": "tiny"}},
    "training": training,
    "parallelism": {},
    "checkpoint": {"dir": f"{work}/{name}/checkpoints", "intervalSteps": 1000, "keep": 1,
                   "resume": "Never"},
    "device": "cpu",
    "outputDir": f"{work}/{name}/out"}))
EOF
}

config whole "" > "$work/whole.json"
config attention '["q_proj", "k_proj", "v_proj", "o_proj"]' > "$work/attention.json"
config projections '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]' \
  > "$work/projections.json"

for round in 1 2 3; do
  for name in whole attention projections; do
    rm -rf "${work:?}/$name"
    MOE_STATUS_ADDR=off target/release/moe-worker train --config "$work/$name.json" \
      2> "$work/$name.log" | tail -1 > "$work/$name.$round.json"
    grep -o '_bytes=[0-9]*' "$work/$name.log" | head -2 > "$work/$name.bytes"
  done
done

python3 - "$work" <<'EOF'
import json, statistics, sys
work = sys.argv[1]
names = ["whole", "attention", "projections"]
rates = {n: [json.load(open(f"{work}/{n}.{r}.json"))["tokensPerSecond"] for r in (1, 2, 3)]
         for n in names}
base = statistics.median(rates["whole"])
for n in names:
    held = sum(int(line.split("=")[1]) for line in open(f"{work}/{n}.bytes").read().split())
    final = json.load(open(f"{work}/{n}.3.json"))["finalLoss"]
    print(json.dumps({"run": n, "tokensPerSecond": [round(r) for r in rates[n]],
                      "medianRatioToWhole": round(statistics.median(rates[n]) / base, 2),
                      "heldBytes": int(held), "finalLoss": round(final, 4)}))
EOF
