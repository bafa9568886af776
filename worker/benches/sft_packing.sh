#!/usr/bin/env bash
# Supervised fine-tuning three ways, in the same run:
# examples/training/tiny-sft.yaml at a context of 256 tokens (every one of
# its 60 conversations whole), 20 steps each, release build: one
# conversation per sequence padded to the context (MOE_KEEP_PADDING=1, the
# baseline), the same with each micro-batch cut to its longest conversation
# (the default), and `data.packing`; then with micro-batches of 2, padded
# and grouped by length and cut (the default). Prints the assistant tokens trained per
# second (the loss's tokens: `trainedTokens` in metrics.jsonl over the run's
# wall time), each run's ratio to the baseline, and each run's share of real
# tokens.
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
  local name=$1 packing=$2 keep_padding=$3 micro=${4:-8}
  # The example, renamed, at seqLen 256, 20 steps logged each, no export.
  sed -e "s/^  name: tiny-sft$/  name: $name/" \
      -e 's/^    seqLen: 128 .*/    seqLen: 256/' \
      -e "s/^    format: chat$/    format: chat\n    packing: $packing/" \
      -e 's/^    steps: 30$/    steps: 20/' \
      -e "s/^    microBatchSize: 8$/    microBatchSize: $micro/" \
      -e 's/^    logIntervalSteps: 10$/    logIntervalSteps: 1/' \
      -e '/^  output:$/,/^      path: exports$/d' \
      -e '/^    evaluation:$/,/^      keepBest: true$/d' \
      examples/training/tiny-sft.yaml > "$work/$name.yaml"
  grep -q "packing: $packing" "$work/$name.yaml"
  MOE_KEEP_PADDING=$keep_padding target/release/moectl run --local --workdir "$work" --worker-bin target/release/moe-worker \
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

padded=$(run sft-padded false 1)
trimmed=$(run sft-trimmed false 0)
packed=$(run sft-packed true 0)
# Micro-batches of 2 (4 per step): the step's conversations grouped by
# length, then each micro-batch cut, against the same padded.
padded2=$(run sft-padded-mb2 false 1 2)
grouped2=$(run sft-grouped-mb2 false 0 2)
for r in "$padded" "$trimmed" "$packed" "$padded2" "$grouped2"; do echo "$r"; done
python3 - "$padded" "$trimmed" "$packed" "$padded2" "$grouped2" <<'EOF'
import json, sys
padded, trimmed, packed, padded2, grouped2 = (json.loads(a) for a in sys.argv[1:])
rate = lambda r: r["trainedTokensPerSecond"]
for name, run, base in [("cut to the longest conversation", trimmed, padded), ("packing", packed, padded),
                        ("micro-batches of 2, grouped by length and cut", grouped2, padded2)]:
    print(f"{name}: {rate(run)} assistant tokens/s vs {rate(base)} padded to seqLen: "
          f"{rate(run) / rate(base):.2f}x")
EOF
