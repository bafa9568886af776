#!/usr/bin/env python3
"""Decode speed and time to first token on the CPU: `moe-worker serve` beside
Hugging Face transformers, the same random-weight Mixtral-style model, the
same prompt, greedy, the same number of threads, measured in one run; then
the server's throughput against concurrent streaming clients.

    cargo build --release -p moe-worker --bin moe-worker
    /work/venv-torch/bin/python worker/benches/serve_vs_transformers.py \\
        --worker target/release/moe-worker [--hidden 512 --layers 4 --tokens 64]

The model is written to a temporary directory in Hugging Face format
(config.json, safetensors, the tokenizer of the committed Mixtral fixture),
so both sides load the same files. Needs torch and transformers.

Both sides are measured the same way, alternating run by run (the machine
is shared: the same-run ratio is the figure that travels): time to first
token is a one-token generation (the worker: a streamed one-token request,
to its last byte), decode speed is (tokens - 1) / (time of a `--tokens`
generation - time to first token), the worker's token count taken from the
response's `usage`. Each figure is given in wall time and in CPU time (the
worker: its threads' on-CPU nanoseconds from /proc/<pid>/task/*/schedstat;
transformers: this process's CPU time), since on a loaded machine wall
time also counts the time other processes held the core.

The concurrency curve: N clients (default 1, 8, 32, 64) each stream
`--rounds` completions back to back; aggregate output tokens/s (from
`usage`), and per request, as vLLM's serving benchmark defines them, the
time to the first chunk with text (TTFT) and the gaps between text chunks
(inter-token latency; a chunk may carry several tokens when one character
spans several byte tokens).
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
    """One streamed completion: seconds to the first text chunk, to the end,
    the arrival times of the text chunks, and the completion tokens."""
    body = json.dumps({"model": "bench", "prompt": PROMPT, "max_tokens": tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    chunks, completion = [], None
    for line in response:
        line = line.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        event = json.loads(line[5:])
        if event.get("usage"):
            completion = event["usage"]["completion_tokens"]
        if event["choices"] and event["choices"][0].get("text"):
            chunks.append(time.perf_counter() - started)
    ended = time.perf_counter() - started
    connection.close()
    assert completion is not None, "no usage chunk"
    return {"ttft": chunks[0] if chunks else ended, "end": ended, "chunks": chunks,
            "tokens": completion}


class Server:
    """`moe-worker serve` on a free loopback port."""

    def __init__(self, args, directory):
        self.port = free_port()
        self.threads = {}  # thread id -> its on-CPU nanoseconds last seen
        env = dict(os.environ, MOE_STATUS_ADDR="off")
        command = [args.worker, "serve", "--model", directory, "--host", "127.0.0.1",
                   "--port", str(self.port), "--served-model-name", "bench",
                   "--threads", str(args.threads),
                   "--precision", getattr(args, "precision", "fp32")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, env=env)
        deadline = time.time() + 120
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            if time.time() > deadline or self.process.poll() is not None:
                self.stop()
                sys.exit("\nmoe-worker serve did not become ready: "
                         + self.process.stderr.read().decode())
            time.sleep(0.2)

    def cpu(self):
        """Seconds on a CPU so far, all the server's threads together.

        A running thread's count lags by up to a scheduler tick (it is
        brought up to date when the thread blocks), so this first waits a
        moment for the server to go idle after the request just answered.
        A thread that ends leaves /proc (an idle runtime thread does after a
        while): its last count is kept, or the total would go backwards.
        """
        time.sleep(0.01)
        task_dir = f"/proc/{self.process.pid}/task"
        for task in os.listdir(task_dir):
            try:
                with open(f"{task_dir}/{task}/schedstat") as f:
                    self.threads[task] = int(f.read().split()[0])
            except OSError:
                pass  # a thread that just ended
        return sum(self.threads.values()) / 1e9

    def stop(self):
        self.process.terminate()
        self.process.wait()


def worker_run(server, args):
    """(TTFT, decode period) in (wall, CPU) seconds, and the decode's token count."""
    wall, cpu = [], []
    for _ in range(args.ttft_repeats):
        c0, t0 = server.cpu(), time.perf_counter()
        stream_completion(server.port, 1)
        wall.append(time.perf_counter() - t0)  # before cpu(): it waits
        cpu.append(server.cpu() - c0)
    ttft = (min(wall), min(cpu))
    c0, t0 = server.cpu(), time.perf_counter()
    result = stream_completion(server.port, args.tokens)
    elapsed = time.perf_counter() - t0
    total = (elapsed, server.cpu() - c0)
    return ttft, (total[0] - ttft[0], total[1] - ttft[1]), result["tokens"]


def torch_run(model, ids, args):
    wall, cpu = [], []
    with torch.inference_mode():
        for _ in range(args.ttft_repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        ttft = (min(wall), min(cpu))
        c0, t0 = time.process_time(), time.perf_counter()
        model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                       do_sample=False, pad_token_id=0)
        total = (time.perf_counter() - t0, time.process_time() - c0)
    return ttft, (total[0] - ttft[0], total[1] - ttft[1]), args.tokens


def median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def head_to_head(server, model, directory, args):
    """Alternating runs, both sides; prints best and median, wall and CPU, and the ratios."""
    torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    # Warm-up: first calls allocate, fault pages in, pick kernels.
    stream_completion(server.port, 4)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    runs = {"worker": [], "transformers": []}
    for r in range(args.runs):
        order = ["worker", "transformers"] if r % 2 == 0 else ["transformers", "worker"]
        for side in order:
            if side == "worker":
                runs[side].append(worker_run(server, args))
            else:
                runs[side].append(torch_run(model, ids, args))
    figures = {}
    for side, results in runs.items():
        for clock, index in (("wall", 0), ("cpu", 1)):
            ttfts = [ttft[index] for ttft, _, _ in results]
            decodes = [(n - 1) / max(period[index], 1e-9) for _, period, n in results]
            figures[side, clock] = {"ttft_best": min(ttfts), "ttft_median": median(ttfts),
                                    "decode_best": max(decodes),
                                    "decode_median": median(decodes)}
    tokens = {n for _, _, n in runs["worker"]}
    print(f"model: Mixtral-style, hidden {args.hidden}, {args.layers} layers, 8 experts top-2; "
          f"prompt {ids.shape[1]} tokens, {args.tokens} generated (worker: {sorted(tokens)}), "
          f"{args.runs} alternating runs, TTFT min of {args.ttft_repeats} per run, "
          f"{args.threads} thread(s); transformers {transformers.__version__}, "
          f"torch {torch.__version__}")
    print(f"{'':14}{'clock':6}{'TTFT best':>11}{'median':>9}{'decode best':>15}{'median':>13}")
    for side in ("worker", "transformers"):
        for clock in ("wall", "cpu"):
            f = figures[side, clock]
            print(f"{side:14}{clock:6}{f['ttft_best'] * 1e3:8.1f} ms{f['ttft_median'] * 1e3:6.1f} ms"
                  f"{f['decode_best']:9.1f} tok/s{f['decode_median']:7.1f} tok/s")
    for clock in ("wall", "cpu"):
        w, t = figures["worker", clock], figures["transformers", clock]
        print(f"ratio {clock:4}: decode {w['decode_best'] / t['decode_best']:.2f}x best, "
              f"{w['decode_median'] / t['decode_median']:.2f}x median; "
              f"TTFT {t['ttft_best'] / w['ttft_best']:.2f}x best, "
              f"{t['ttft_median'] / w['ttft_median']:.2f}x median faster (target >= 3x)")


def concurrency(server, args):
    """Throughput and latencies with N streaming clients at once, for each N."""
    import threading
    print(f"concurrency: each client streams {args.rounds} completion(s) of {args.tokens} "
          f"tokens back to back")
    print(f"{'clients':>8}{'tok/s':>9}{'tok/CPU-s':>11}{'TTFT p50':>10}{'p99':>9}"
          f"{'ITL p50':>9}{'p99':>9}{'TPOT p50':>10}")
    for clients in args.clients:
        results, lock = [], threading.Lock()

        def client():
            for _ in range(args.rounds):
                result = stream_completion(server.port, args.tokens)
                with lock:
                    results.append(result)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        c0, t0 = server.cpu(), time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - t0
        cpu = server.cpu() - c0
        tokens = sum(r["tokens"] for r in results)
        ttfts = [r["ttft"] for r in results]
        gaps = [b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:])]
        tpots = [(r["end"] - r["ttft"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
        ms = 1e3
        print(f"{clients:8}{tokens / elapsed:9.1f}{tokens / cpu:11.1f}"
              f"{percentile(ttfts, 50) * ms:8.1f}ms{percentile(ttfts, 99) * ms:7.1f}ms"
              f"{percentile(gaps, 50) * ms:7.1f}ms{percentile(gaps, 99) * ms:7.1f}ms"
              f"{percentile(tpots, 50) * ms:8.1f}ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", required=True, help="a release moe-worker binary")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--runs", type=int, default=5, help="alternating runs per side")
    parser.add_argument("--ttft-repeats", type=int, default=3,
                        help="one-token generations per run (the least counts)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of each side (worker --threads, torch.set_num_threads)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="the worker's weights (--precision); transformers runs fp32")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 8, 32, 64],
                        help="concurrency levels (none: skip the curve)")
    parser.add_argument("--rounds", type=int, default=2, help="completions per client")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        model = write_model(directory, args)
        server = Server(args, directory)
        try:
            head_to_head(server, model, directory, args)
            if args.clients:
                concurrency(server, args)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
