#!/usr/bin/env python3
"""Decode speed and time to first token on the CPU: `moe-worker serve` beside
Hugging Face transformers, the same random-weight Mixtral-style model, the
same prompt, greedy, the same number of threads (1: the worker's CPU path is
single-threaded), measured in one run (the machine is shared: the ratio is
the figure that travels).

    cargo build --release -p moe-worker --bin moe-worker
    /work/venv-torch/bin/python worker/benches/serve_vs_transformers.py \\
        --worker target/release/moe-worker [--hidden 512 --layers 4 --tokens 64]

The model is written to a temporary directory in Hugging Face format
(config.json, safetensors, the tokenizer of the committed Mixtral fixture),
so both sides load the same files. Needs torch and transformers.
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "hf", "mixtral")
PROMPT = "The quick brown fox jumps over the lazy dog. Mixture of experts models route every token"


def write_model(directory, args):
    with open(os.path.join(FIXTURE, "config.json")) as f:
        base = json.load(f)
    config = transformers.MixtralConfig(
        vocab_size=base["vocab_size"],
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        bos_token_id=base.get("bos_token_id"),
        eos_token_id=base.get("eos_token_id"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        source = os.path.join(FIXTURE, name)
        if os.path.exists(source):
            shutil.copy(source, directory)
    # No end-of-sequence token: both sides generate exactly --tokens tokens.
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"do_sample": False}, f)
    return model


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_completion(port, tokens):
    """(seconds to the first token, seconds from the first token to the last, pieces)."""
    body = json.dumps({"model": "bench", "prompt": PROMPT, "max_tokens": tokens,
                       "temperature": 0, "stream": True})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    first = last = None
    pieces = 0
    for line in response:
        line = line.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        event = json.loads(line[5:])
        if event["choices"] and event["choices"][0].get("text"):
            now = time.perf_counter()
            first = first or now
            last = now
            pieces += 1
    connection.close()
    return first - started, last - first, pieces


def serve(args, directory):
    port = free_port()
    env = dict(os.environ, MOE_STATUS_ADDR="off")
    process = subprocess.Popen(
        [args.worker, "serve", "--model", directory, "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "bench"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or process.poll() is not None:
                sys.exit("moe-worker serve did not become ready: " + process.stderr.read().decode())
            time.sleep(0.2)
        runs = [stream_completion(port, args.tokens) for _ in range(args.runs)]
    finally:
        process.terminate()
        process.wait()
    ttft = min(r[0] for r in runs)
    decode = max((r[2] - 1) / r[1] for r in runs if r[1] > 0)
    return ttft, decode


def reference(model, directory, args):
    torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    ttfts, decodes = [], []
    with torch.inference_mode():
        for _ in range(args.runs):
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
            ttfts.append(time.perf_counter() - started)
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                           do_sample=False, pad_token_id=0)
            total = time.perf_counter() - started
            decodes.append((args.tokens - 1) / max(total - ttfts[-1], 1e-9))
    return min(ttfts), max(decodes), ids.shape[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", required=True, help="a release moe-worker binary")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--runs", type=int, default=3, help="best of this many")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        model = write_model(directory, args)
        worker_ttft, worker_decode = serve(args, directory)
        torch_ttft, torch_decode, prompt_tokens = reference(model, directory, args)
    print(f"model: Mixtral-style, hidden {args.hidden}, {args.layers} layers, 8 experts top-2; "
          f"prompt {prompt_tokens} tokens, {args.tokens} generated, best of {args.runs}, "
          f"{args.threads} thread(s)")
    print(f"moe-worker serve: TTFT {worker_ttft * 1e3:.1f} ms, decode {worker_decode:.1f} tok/s")
    print(f"transformers {transformers.__version__} (torch {torch.__version__}): "
          f"TTFT {torch_ttft * 1e3:.1f} ms, decode {torch_decode:.1f} tok/s")
    print(f"ratio moe-worker / transformers: decode {worker_decode / torch_decode:.2f}x, "
          f"TTFT {torch_ttft / worker_ttft:.2f}x faster (target >= 3x)")


if __name__ == "__main__":
    main()
