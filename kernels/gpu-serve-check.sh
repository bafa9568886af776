#!/usr/bin/env bash
# `moe-worker serve --device cuda` end to end on the GPU. Run by
# kernels/gpu-check.sh when .gpu/moe-worker was carried along (built with
# `--features cuda`), from the repository root (it reads the Hugging Face
# test fixtures under worker/tests/fixtures/hf).
#
# For each grouped-query-attention fixture (Mixtral, Qwen2-MoE, Qwen3-MoE,
# OLMoE): the server must log "serving on the GPU" and answer every prompt
# of golden.json, greedily, with transformers' completion text (the GPU
# engine's TF32 GEMMs could in principle flip a near-tie; golden.json's
# greedy steps have margins >= 1e-3). The DeepSeek-V3 fixture (multi-head
# latent attention) must be served on the CPU with the warning naming why.
# Writes serve-check.md to the given directory; exits non-zero on a failure.
set -uo pipefail
out=${1:?usage: gpu-serve-check.sh OUT_DIR}
bin=${MOE_WORKER_BIN:-.gpu/moe-worker}
fixtures=${MOE_SERVE_FIXTURES:-worker/tests/fixtures/hf}
work=$(mktemp -d)
mkdir -p "$out"
report=$out/serve-check.md
export MOE_STATUS_ADDR=off
port=18750
failures=0

serve_fixture() { # name expected-log-line
  local name=$1 expect=$2 log=$work/$1.log
  port=$((port + 1))
  "$bin" serve --model "$fixtures/$name" --device cuda --host 127.0.0.1 --port "$port" \
    --kv-cache-mib 64 >"$log" 2>&1 &
  local pid=$!
  local ready=no
  for _ in $(seq 1 120); do
    if curl -sf "127.0.0.1:$port/readyz" >/dev/null 2>&1; then ready=yes; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if [ "$ready" != yes ]; then
    echo "$name: FAIL: the server never became ready"; tail -20 "$log"
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    return 1
  fi
  local status=0
  if ! grep -q "$expect" "$log"; then
    echo "$name: FAIL: the log does not say \"$expect\""; status=1
  fi
  python3 - "$fixtures/$name/golden.json" "$port" <<'PY' || status=1
import json, sys, urllib.request
golden, port = json.load(open(sys.argv[1])), sys.argv[2]
name = sys.argv[1].split("/")[-2]
bad = 0
for p in golden["prompts"]:
    body = json.dumps({"prompt": p["text"], "max_tokens": len(p["greedy"]), "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
    text = json.load(urllib.request.urlopen(request, timeout=60))["choices"][0]["text"]
    expected = p["completion"]
    if text == expected:
        print(f"{name}: {p['text']!r}: same as transformers")
    else:
        bad += 1
        print(f"{name}: {p['text']!r}: DIFFERS: {text!r}, transformers {expected!r}")
sys.exit(1 if bad else 0)
PY
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  return $status
}

{
  echo "# moe-worker serve --device cuda"
  echo
  echo '```'
  for name in mixtral qwen2_moe qwen3_moe olmoe; do
    serve_fixture "$name" "serving on the GPU" || failures=$((failures + 1))
  done
  serve_fixture deepseek_v3 "served on the CPU: multi-head latent attention" || failures=$((failures + 1))
  echo '```'
  [ "$failures" -eq 0 ] && echo "PASS" || echo "FAIL: $failures fixture(s)"
} 2>&1 | tee "$report"
# The loop ran in the pipeline's subshell: its verdict is the report's.
grep -q '^PASS' "$report"
