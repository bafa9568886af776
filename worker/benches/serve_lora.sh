#!/usr/bin/env bash
# Serving LoRA adapters beside the base model (`--lora`) against the base
# model alone, in the same server and the same run: a small MoE (hidden 256,
# 4 blocks, the first dense, 16 routed experts of 128, top-4, q/k norms: a
# Qwen3-MoE) trained 2 steps
# with rank-8 adapters on every projection but the routed experts' and
# exported (the merged model and adapter/), then served with that adapter.
# Requests alternate between the base model's name and the adapter's (the
# machines are shared and noisy): one at a time (64 prompt tokens unless told, 64
# generated, greedy, end-of-sequence ignored), then 8 at once all for the
# base model, all for the adapter, and half each (one batch mixing them).
# Prints each figure's median and its ratio to the base model's.
#
#   bash worker/benches/serve_lora.sh [rounds (default 5)] [prompt tokens (default 64)] [hidden (default 256)]
#
# MOE_WORKER=<binary> measures that build instead of building this tree's
# (an older one, to compare two implementations by their ratios).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-5}
prompt_tokens=${2:-64}
hidden=${3:-256}
worker=${MOE_WORKER:-target/release/moe-worker}
[ -n "${MOE_WORKER:-}" ] || cargo build --release -q -p moe-worker --bin moe-worker
work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

cat > "$work/train.json" <<EOF
{"job": "local/bench",
 "model": {"hiddenSize": $hidden, "layers": 4, "denseLayers": 1, "denseHiddenSize": $((2 * hidden)),
           "attentionHeads": 8, "kvHeads": 2, "qkNorm": "perHead", "seqLen": 256,
           "moe": {"experts": 16, "topK": 4, "sharedExperts": 0, "expertHiddenSize": 128,
                   "router": "softmax", "balancing": {"auxLossFree": {"enabled": false}}}},
 "data": {"builtin": {"corpus": "tiny"}},
 "training": {"steps": 2, "globalBatchSize": 4, "microBatchSize": 4, "seed": 3,
              "lora": {"rank": 8, "alpha": 16,
                       "targets": ["q_proj", "k_proj", "v_proj", "o_proj",
                                   "gate_proj", "up_proj", "down_proj"]}},
 "parallelism": {},
 "checkpoint": {"dir": "$work/run/checkpoints", "intervalSteps": 1000, "keep": 1,
                "resume": "Never"},
 "device": "cpu",
 "outputDir": "$work/run/out"}
EOF
MOE_STATUS_ADDR=off "$worker" train --config "$work/train.json" > /dev/null 2> "$work/train.log"
"$worker" export --model "$work/run" --out "$work/export" --precision f32 > /dev/null
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
MOE_STATUS_ADDR=off "$worker" serve --model "$work/export" \
  --served-model-name base --lora adapter="$work/export/adapter" \
  --host 127.0.0.1 --port "$port" 2> "$work/serve.log" &
server=$!

python3 - "$port" "$rounds" "$prompt_tokens" <<'EOF'
import concurrent.futures, json, statistics, sys, time, urllib.request

port, rounds, prompt_tokens = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
url = f"http://127.0.0.1:{port}"
for _ in range(3000):
    try:  # 200 once the model is loaded (503 while loading)
        urllib.request.urlopen(f"{url}/health", timeout=1).read()
        break
    except OSError:
        time.sleep(0.1)
prompt = [7 + (i * 37) % 200 for i in range(prompt_tokens)]

def complete(model):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 64, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body,
                                     {"content-type": "application/json"})
    started = time.perf_counter()
    reply = json.load(urllib.request.urlopen(request, timeout=600))
    assert reply["model"] == model and reply["usage"]["completion_tokens"] == 64, reply
    return time.perf_counter() - started

def batch(models):
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        started = time.perf_counter()
        list(pool.map(complete, models))
        return 64 * len(models) / (time.perf_counter() - started)

complete("base"), complete("adapter")  # warm-up
one = {"base": [], "adapter": []}
eight = {"base": [], "adapter": [], "mixed": []}
for r in range(rounds):
    order = ("base", "adapter") if r % 2 == 0 else ("adapter", "base")
    for model in order:
        one[model].append(64 / complete(model))
    runs = {"base": ["base"] * 8, "adapter": ["adapter"] * 8, "mixed": ["base", "adapter"] * 4}
    for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
        eight[name].append(batch(runs[name]))
for title, figures in (("one request", one), ("8 requests at once", eight)):
    base = statistics.median(figures["base"])
    for name, rates in figures.items():
        print(json.dumps({"load": title, "model": name,
                          "tokensPerSecond": [round(x, 1) for x in rates],
                          "median": round(statistics.median(rates), 1),
                          "ratioToBase": round(statistics.median(rates) / base, 3)}))
EOF
