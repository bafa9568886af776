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
# Then Mixtral as an expert-parallel replica of two ranks sharing this GPU
# (serve_replica below), every golden prompt answered as transformers does.
# Writes serve-check.md to the given directory; exits non-zero on a failure.
set -uo pipefail
out=${1:?usage: gpu-serve-check.sh OUT_DIR}
bin=${MOE_WORKER_BIN:-.gpu/moe-worker}
fixtures=${MOE_SERVE_FIXTURES:-worker/tests/fixtures/hf}
# MOE_CHECK_DEVICE=cpu: a rehearsal without a GPU (a CPU-only worker serves
# on the CPU, so the log lines that name the GPU are not looked for; the
# launches, the replica and every golden comparison are).
gpu=${MOE_CHECK_DEVICE:-cuda}
expect_log() { # file line
  [ "$gpu" != cuda ] || grep -q "$2" "$1"
}
work=$(mktemp -d)
mkdir -p "$out"
report=$out/serve-check.md
export MOE_STATUS_ADDR=off
port=18750
failures=0

# Waits until $1/readyz answers (port), while pid $2 lives; 60 s at most.
wait_ready() {
  for _ in $(seq 1 120); do
    if curl -sf "127.0.0.1:$1/readyz" >/dev/null 2>&1; then return 0; fi
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}

# Every golden prompt of fixture $1, greedily, against the server on port $2.
compare_golden() {
  python3 - "$fixtures/$1/golden.json" "$2" <<'PY'
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
}

serve_fixture() { # name expected-log-line
  local name=$1 expect=$2 log=$work/$1.log
  port=$((port + 1))
  "$bin" serve --model "$fixtures/$name" --device "$gpu" --host 127.0.0.1 --port "$port" \
    --kv-cache-mib 64 >"$log" 2>&1 &
  local pid=$!
  if ! wait_ready "$port" "$pid"; then
    echo "$name: FAIL: the server never became ready"; tail -20 "$log"
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    return 1
  fi
  local status=0
  if ! expect_log "$log" "$expect"; then
    echo "$name: FAIL: the log does not say \"$expect\""; status=1
  fi
  compare_golden "$name" "$port" || status=1
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  return $status
}

# An expert-parallel replica of two ranks on this one GPU, as the operator
# starts two pods (MOE_NODE_RANK 0 and 1, one process each, so both are
# local rank 0 and open GPU 0): each rank holds half of every MoE layer's
# experts on the GPU and exchanges its rows with the other over TCP through
# host memory (MOE_COLLECTIVE_BACKEND=tcp: NCCL refuses two ranks on one GPU). Both ranks must log
# that their share is on the GPU, and the leader must answer every golden
# prompt with transformers' completion.
serve_replica() { # name
  local name=$1 status=0
  port=$((port + 3))
  local coordinator=127.0.0.1:$port pids=() rank
  for rank in 0 1; do
    MOE_WORLD_SIZE=2 MOE_NODES=2 MOE_NODE_RANK=$rank MOE_PROCS_PER_NODE=1 \
      MOE_COORDINATOR=$coordinator MOE_RENDEZVOUS_TIMEOUT_SECONDS=120 MOE_COLLECTIVE_BACKEND=tcp \
      "$bin" serve --model "$fixtures/$name" --device "$gpu" --expert-parallel 2 \
      --host 127.0.0.1 --port $((port + 1 + rank)) --kv-cache-mib 64 \
      >"$work/$name-ep$rank.log" 2>&1 &
    pids+=($!)
  done
  if ! wait_ready $((port + 1)) "${pids[0]}"; then
    echo "$name, 2 ranks: FAIL: the replica never became ready"
    tail -20 "$work/$name-ep0.log" "$work/$name-ep1.log"
    status=1
  else
    for rank in 0 1; do
      if ! expect_log "$work/$name-ep$rank.log" "this rank's share is on the GPU"; then
        echo "$name, 2 ranks: FAIL: rank $rank does not say its share is on the GPU"; status=1
      fi
    done
    compare_golden "$name" $((port + 1)) | sed "s/^$name:/$name, 2 ranks:/" || status=1
  fi
  # SIGTERM to the leader stops its follower too; then make sure.
  kill "${pids[0]}" 2>/dev/null; wait "${pids[0]}" 2>/dev/null
  sleep 1; kill "${pids[1]}" 2>/dev/null; wait "${pids[1]}" 2>/dev/null
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
  serve_replica mixtral || failures=$((failures + 1))
  echo '```'
  [ "$failures" -eq 0 ] && echo "PASS" || echo "FAIL: $failures fixture(s)"
} 2>&1 | tee "$report"
# The loop ran in the pipeline's subshell: its verdict is the report's.
grep -q '^PASS' "$report"
