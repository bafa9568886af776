#!/usr/bin/env bash
# Supervised fine-tuning with and without `data.packing`, in the same run:
# examples/training/tiny-sft.yaml at a context of 256 tokens (every one of
# its 60 conversations whole), 20 steps each way, release build. Prints the
# assistant tokens trained per second (the loss's tokens: `trainedTokens` in
# metrics.jsonl over the run's wall time) and packing's ratio to one
# conversation per sequence, plus each run's share of real tokens.
#
#   bash worker/benches/sft_packing.sh
#
# Run from the repository root (the example's claims are the current directory).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p moe-worker -p moe-operator --bin moe-worker --bin moectl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() {
  local name=$1 packing=$2
  # The example, renamed, at seqLen 256, 20 steps logged each, no export.
  sed -e "s/^  name: tiny-sft$/  name: $name/" \
      -e 's/^    seqLen: 128 .*/    seqLen: 256/' \
      -e "s/^    format: chat$/    format: chat\n    packing: $packing/" \
      -e 's/^    steps: 30$/    steps: 20/' \
      -e 's/^    logIntervalSteps: 10$/    logIntervalSteps: 1/' \
      -e '/^  output:$/,/^      path: exports$/d' \
      -e '/^    evaluation:$/,/^      heldOutPercent: 5$/d' \
      examples/training/tiny-sft.yaml > "$work/$name.yaml"
  grep -q "packing: $packing" "$work/$name.yaml"
  target/release/moectl run --local --workdir "$work" --worker-bin target/release/moe-worker \
    "$work/$name.yaml" 2> "$work/$name.log" | tail -1 > "$work/$name.json"
  python3 - "$work/$name" "$name" <<'EOF'
import json, sys, pathlib, re
base, name = pathlib.Path(sys.argv[1]), sys.argv[2]
summary = json.loads((base.parent / (name + ".json")).read_text())
lines = [json.loads(l) for l in next(base.parent.glob(f"{name}/**/metrics.jsonl")).read_text().splitlines()]
trained = sum(l["trainedTokens"] for l in lines)
log = (base.parent / (name + ".log")).read_text()
real = re.search(r'real_tokens_percent="([0-9.]+)"', log)
print(json.dumps({"run": name, "steps": summary["steps"], "wallSeconds": round(summary["wallSeconds"], 2),
                  "trainedTokens": trained, "trainedTokensPerSecond": round(trained / summary["wallSeconds"], 1),
                  "finalLoss": round(summary["finalLoss"], 4),
                  "realTokensPercent": float(real.group(1)) if real else None}))
EOF
}

one=$(run sft-one-per-sequence false)
packed=$(run sft-packed true)
echo "$one"
echo "$packed"
python3 - "$one" "$packed" <<'EOF'
import json, sys
one, packed = (json.loads(a) for a in sys.argv[1:])
print(f"packing: {packed['trainedTokensPerSecond']} assistant tokens/s vs {one['trainedTokensPerSecond']} "
      f"one conversation per sequence: {packed['trainedTokensPerSecond'] / one['trainedTokensPerSecond']:.2f}x")
EOF
