#!/usr/bin/env python3
"""Decode speed and time to first token on the CPU: `moe-worker serve` beside
Hugging Face transformers, the same random-weight Mixtral-style model (or
DeepSeek-V3-style with multi-head latent attention: `--arch deepseek_v3`), the
same prompt, greedy, the same number of threads, measured in one run; then
the server's throughput against concurrent streaming clients.

    cargo build --release -p moe-worker --bin moe-worker
    /work/venv-torch/bin/python worker/benches/serve_vs_transformers.py \\
        --worker target/release/moe-worker [--hidden 512 --layers 4 --tokens 64] \\
        [--llama-server DIR/llama-server --llama-types f32 bf16 f16]

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

With --llama-server (a llama.cpp `llama-server`, built by
worker/benches/setup_llama_cpp.sh from the PyPI llama-cpp-python sdist),
the same Hugging Face files are converted to GGUF by llama.cpp's own
convert_hf_to_gguf.py (--llama-types: f32, the same weights, and
optionally bf16 / f16) and each GGUF is served beside the worker and
measured the same way, in the same alternation: llama-server with
`-t N -tb N`, one slot, no prompt cache in RAM, `cache_prompt: false` on
every request (each prefill computes the whole prompt, as the other
sides do). Requests go to its native /completion endpoint, greedy
(temperature 0), `ignore_eos`, streamed and read to the last byte like
the worker's; the prompt as text when llama.cpp's tokenizer (the converter
keeps the fixture's vocabulary as a SentencePiece-style "llama" one) gives
the Hugging Face tokenizer's ids for it, checked by its /tokenize, else as
those ids. A greedy check first compares each side's --tokens tokens with
transformers'. The concurrency curve stays the worker's only.

`--precision bf16` serves the worker's weights in bfloat16; `--torch-bf16`
adds transformers with bf16 weights (what it loads a bf16 checkpoint as) as
a further side, so each ratio can be read against transformers' faster dtype.
"""

import argparse
import copy
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
    common = dict(
        vocab_size=base["vocab_size"],
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        bos_token_id=base.get("bos_token_id"),
        eos_token_id=base.get("eos_token_id"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if getattr(args, "arch", "mixtral") == "deepseek_v3":
        # The same hidden size, layers, 8 experts top-2 of width 2·hidden,
        # with DeepSeek-V3's attention scaled down in its proportions
        # (q_lora_rank ≈ hidden / 4, kv_lora_rank = hidden / 8, head dims
        # 32 + 16 rotated, values 32), one shared expert, every layer MoE,
        # plain RoPE, one expert group.
        config = transformers.DeepseekV3Config(
            num_key_value_heads=8,
            intermediate_size=2 * args.hidden,
            moe_intermediate_size=2 * args.hidden,
            n_routed_experts=8,
            n_shared_experts=1,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            q_lora_rank=args.hidden // 4,
            kv_lora_rank=args.hidden // 8,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            rope_scaling=None,
            **common,
        )
        model = transformers.DeepseekV3ForCausalLM(config).eval()
    else:
        config = transformers.MixtralConfig(
            num_key_value_heads=2,
            intermediate_size=2 * args.hidden,
            num_local_experts=8,
            **common,
        )
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

    name = "moe-worker serve"

    def __init__(self, args, directory):
        self.port = free_port()
        env = dict(os.environ, MOE_STATUS_ADDR="off")
        command = [args.worker, "serve", "--model", directory, "--host", "127.0.0.1",
                   "--port", str(self.port), "--served-model-name", "bench",
                   "--threads", str(args.threads),
                   "--precision", getattr(args, "precision", "fp32")]
        # Every measured prefill computes the whole prompt, as transformers'
        # and llama.cpp's (`cache_prompt: false`) do: the same prompt is sent
        # again and again, which prefix caching would answer from its cache.
        if not getattr(args, "prefix_caching", False):
            command.append("--no-prefix-caching")
        self.start(command, env)

    def start(self, command, env=None, log=None):
        """Starts `command` and waits for GET /health to answer 200. Its
        stderr goes to a pipe, or to the file `log` (a chatty server would
        fill a pipe nobody reads, and block)."""
        self.threads = {}  # thread id -> its on-CPU nanoseconds last seen
        self.log = log
        stderr = open(log, "wb") if log else subprocess.PIPE
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=stderr, env=env)
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
                if self.log:
                    with open(self.log, "rb") as f:
                        message = f.read()[-4000:].decode(errors="replace")
                else:
                    message = self.process.stderr.read().decode()
                sys.exit(f"\n{self.name} did not become ready: " + message)
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


class LlamaServer(Server):
    """llama.cpp's `llama-server` serving one GGUF on a free loopback port:
    `-t/-tb` the benchmark's thread count, one slot, no prompt cache in RAM
    (and `cache_prompt: false` on each request), no web UI."""

    def __init__(self, args, gguf, label, log):
        self.port = free_port()
        self.name = f"llama-server ({label})"
        command = [args.llama_server, "--model", gguf, "--host", "127.0.0.1",
                   "--port", str(self.port), "--threads", str(args.threads),
                   "--threads-batch", str(args.threads), "--ctx-size", "1024",
                   "--parallel", "1", "--cache-ram", "0", "--no-webui"]
        self.start(command, log=log)


def llama_prompt(server, ids):
    """The prompt for llama-server: the text, when its tokenizer gives the
    Hugging Face tokenizer's ids for it (so that, like the worker, it
    tokenizes each request); else the ids themselves."""
    body = json.dumps({"content": PROMPT, "add_special": True})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/tokenize", body, {"Content-Type": "application/json"})
    theirs = json.loads(connection.getresponse().read())["tokens"]
    connection.close()
    if theirs == ids:
        return PROMPT, f"{server.name}: the prompt as text (its tokenizer gives the same ids)"
    return ids, (f"{server.name}: the prompt as token ids (its tokenizer gives other ids: "
                 f"{len(theirs)} tokens, the first difference at "
                 f"{leading_agreement(theirs, ids)})")


def llama_completion(port, prompt, tokens, n_prompt, stream=True):
    """One greedy completion on llama-server's native /completion endpoint
    (the prompt as text or token ids), read to its last byte. Returns the
    generated token count (and, not streamed, the token ids)."""
    body = json.dumps({"prompt": prompt, "n_predict": tokens, "temperature": 0,
                       "ignore_eos": True, "cache_prompt": False, "stream": stream,
                       "return_tokens": not stream})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/completion", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    final = None
    if stream:
        for line in response:
            line = line.strip()
            if line.startswith(b"data:") and line != b"data: [DONE]":
                event = json.loads(line[5:])
                if event.get("stop"):
                    final = event
    else:
        final = json.loads(response.read())
    connection.close()
    assert final is not None, "no final event"
    # The whole prompt is computed, every time: no cached prefix.
    assert final["timings"]["prompt_n"] == n_prompt, final["timings"]
    return final["tokens_predicted"], final.get("tokens")


def llama_run(server, prompt, n_prompt, args):
    """As worker_run, for llama-server."""
    wall, cpu = [], []
    for _ in range(args.ttft_repeats):
        c0, t0 = server.cpu(), time.perf_counter()
        llama_completion(server.port, prompt, 1, n_prompt)
        wall.append(time.perf_counter() - t0)
        cpu.append(server.cpu() - c0)
    ttft = (min(wall), min(cpu))
    c0, t0 = server.cpu(), time.perf_counter()
    count, _ = llama_completion(server.port, prompt, args.tokens, n_prompt)
    elapsed = time.perf_counter() - t0
    total = (elapsed, server.cpu() - c0)
    return ttft, (total[0] - ttft[0], total[1] - ttft[1]), count


def convert_gguf(args, directory, outtype):
    """The Hugging Face files to GGUF with llama.cpp's converter, this interpreter."""
    path = os.path.join(directory, f"model-{outtype}.gguf")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, args.llama_convert, directory, "--outtype", outtype,
                           "--outfile", path], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"convert_hf_to_gguf.py --outtype {outtype} failed:\n{done.stderr[-4000:]}")
    print(f"converted to GGUF {outtype} in {time.perf_counter() - t0:.0f} s "
          f"({os.path.getsize(path) / 1e6:.0f} MB)", flush=True)
    return path


def leading_agreement(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy_check(server, llamas, prompts, model, tokenizer, ids, args):
    """Each side's greedy tokens against transformers' (the conversion is the same model
    when they agree)."""
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                             do_sample=False, pad_token_id=0)
    reference = out[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(reference, skip_special_tokens=True)
    body = json.dumps({"model": "bench", "prompt": PROMPT, "max_tokens": args.tokens,
                       "temperature": 0})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    worker = json.loads(connection.getresponse().read())["choices"][0]["text"]
    connection.close()
    same = leading_agreement(worker, text)
    print(f"greedy check, {args.tokens} tokens against transformers: worker text "
          + ("identical" if worker == text else
             f"differs from character {same} of {len(text)}"))
    for label, llama in llamas:
        _, tokens = llama_completion(llama.port, prompts[label], args.tokens, ids.shape[1],
                                     stream=False)
        n = leading_agreement(tokens, reference)
        print(f"greedy check, {args.tokens} tokens against transformers: llama.cpp {label} "
              f"agrees on the first {n} token(s)"
              + ("" if n == len(reference) else
                 f" (then {tokens[n:n + 4]} vs {reference[n:n + 4]}; "
                 f"{sum(a == b for a, b in zip(tokens, reference))} of {len(reference)} "
                 f"positions equal)"))


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


def head_to_head(server, model, directory, args, llamas=(), others=()):
    """Alternating runs, every side; prints best and median, wall and CPU, and the ratios.
    `llamas`: (label, LlamaServer) pairs, each a further side; `others`: (label, model)
    pairs, transformers in another dtype, each a further side."""
    torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    prompts = {}
    for label, llama in llamas:
        prompts[label], note = llama_prompt(llama, ids[0].tolist())
        print(note)
    greedy_check(server, llamas, prompts, model, tokenizer, ids, args)
    # Warm-up: first calls allocate, fault pages in, pick kernels.
    stream_completion(server.port, 4)
    with torch.inference_mode():
        for m in [model] + [m for _, m in others]:
            m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for label, llama in llamas:
        llama_completion(llama.port, prompts[label], 4, ids.shape[1])
    sides = (["worker", "transformers"] + [label for label, _ in others]
             + [f"llama.cpp {label}" for label, _ in llamas])
    measure = {"worker": lambda: worker_run(server, args),
               "transformers": lambda: torch_run(model, ids, args)}
    for label, other in others:
        measure[label] = lambda other=other: torch_run(other, ids, args)
    for label, llama in llamas:
        measure[f"llama.cpp {label}"] = lambda llama=llama, label=label: llama_run(
            llama, prompts[label], ids.shape[1], args)
    runs = {side: [] for side in sides}
    for r in range(args.runs):
        # Two sides: worker first, then transformers first, and so on; more: rotated.
        if len(sides) == 2:
            order = sides if r % 2 == 0 else sides[::-1]
        else:
            order = sides[r % len(sides):] + sides[:r % len(sides)]
        for side in order:
            runs[side].append(measure[side]())
    figures, dropped = {}, []
    for side, results in runs.items():
        for clock, index in (("wall", 0), ("cpu", 1)):
            ttfts = [ttft[index] for ttft, _, _ in results]
            # A run whose long generation took no longer than its (least) TTFT
            # has no decode time to divide by: the machine held it up. Dropped.
            decodes = [(n - 1) / period[index] for _, period, n in results if period[index] > 0]
            if len(decodes) < len(results):
                dropped.append(f"{side} {clock}: {len(results) - len(decodes)} of {len(results)}")
            figures[side, clock] = {"ttft_best": min(ttfts), "ttft_median": median(ttfts),
                                    "decode_best": max(decodes, default=float("nan")),
                                    "decode_median": median(decodes) if decodes
                                    else float("nan")}
    tokens = {n for _, _, n in runs["worker"]}
    for label, _ in llamas:
        tokens |= {n for _, _, n in runs[f"llama.cpp {label}"]}
    width = max(14, max(len(side) for side in sides) + 2)
    style = {"mixtral": "Mixtral-style", "deepseek_v3": "DeepSeek-V3-style (MLA)"}[args.arch]
    print(f"model: {style}, hidden {args.hidden}, {args.layers} layers, 8 experts top-2; "
          f"prompt {ids.shape[1]} tokens, {args.tokens} generated "
          f"({'worker' if not llamas else 'servers'}: {sorted(tokens)}), "
          f"{args.runs} alternating runs, TTFT min of {args.ttft_repeats} per run, "
          f"{args.threads} thread(s); transformers {transformers.__version__}, "
          f"torch {torch.__version__}" + (f"; {llama_version(args)}" if llamas else ""))
    print(f"{'':{width}}{'clock':6}{'TTFT best':>11}{'median':>9}{'decode best':>15}{'median':>13}")
    for side in sides:
        for clock in ("wall", "cpu"):
            f = figures[side, clock]
            print(f"{side:{width}}{clock:6}{f['ttft_best'] * 1e3:8.1f} ms"
                  f"{f['ttft_median'] * 1e3:6.1f} ms"
                  f"{f['decode_best']:9.1f} tok/s{f['decode_median']:7.1f} tok/s")
    if dropped:
        print(f"decode: runs dropped, their {args.tokens}-token generation no longer than their "
              f"TTFT (a contended machine): " + "; ".join(dropped))
    for other in sides[1:]:
        versus = "" if len(sides) == 2 else f" worker / {other}"
        for clock in ("wall", "cpu"):
            w, t = figures["worker", clock], figures[other, clock]
            print(f"ratio{versus} {clock:4}: decode {w['decode_best'] / t['decode_best']:.2f}x best, "
                  f"{w['decode_median'] / t['decode_median']:.2f}x median; "
                  f"TTFT {t['ttft_best'] / w['ttft_best']:.2f}x best, "
                  f"{t['ttft_median'] / w['ttft_median']:.2f}x median faster"
                  + (" (target >= 3x)" if other.startswith("transformers") else ""))


def llama_version(args):
    done = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    version = next((line for line in lines if line.startswith("version")), "version ?")
    return f"llama-server {version.split(':', 1)[-1].strip()}"


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
    parser.add_argument("--arch", choices=["mixtral", "deepseek_v3"], default="mixtral",
                        help="the model's architecture (deepseek_v3: multi-head latent attention)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--prompt-repeats", type=int, default=1,
                        help="the prompt this many times over (a long prefill)")
    parser.add_argument("--runs", type=int, default=5, help="alternating runs per side")
    parser.add_argument("--ttft-repeats", type=int, default=3,
                        help="one-token generations per run (the least counts)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of each side (worker --threads, torch.set_num_threads)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp8"], default="fp32",
                        help="the worker's weights (--precision)")
    parser.add_argument("--torch-bf16", action="store_true",
                        help="also run transformers with bf16 weights (the dtype it loads a bf16 "
                        "checkpoint in), a further side")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 8, 32, 64],
                        help="concurrency levels (none: skip the curve)")
    parser.add_argument("--rounds", type=int, default=2, help="completions per client")
    parser.add_argument("--llama-server", help="a llama.cpp llama-server binary "
                        "(worker/benches/setup_llama_cpp.sh builds one): measure it too")
    parser.add_argument("--llama-convert", help="llama.cpp's convert_hf_to_gguf.py (default: "
                        "llama.cpp/convert_hf_to_gguf.py beside --llama-server, where "
                        "setup_llama_cpp.sh puts it)")
    parser.add_argument("--llama-types", nargs="+", default=["f32"],
                        choices=["f32", "bf16", "f16"],
                        help="GGUF weight types to serve with llama-server, one server each")
    args = parser.parse_args()
    global PROMPT
    PROMPT = " ".join([PROMPT] * args.prompt_repeats)
    if args.llama_server and not args.llama_convert:
        args.llama_convert = os.path.join(os.path.dirname(os.path.abspath(args.llama_server)),
                                          "llama.cpp", "convert_hf_to_gguf.py")
    with tempfile.TemporaryDirectory() as directory:
        model = write_model(directory, args)
        llamas = []
        if args.llama_server:
            ggufs = [(outtype, convert_gguf(args, directory, outtype))
                     for outtype in args.llama_types]
        server = Server(args, directory)
        try:
            if args.llama_server:
                for outtype, gguf in ggufs:
                    log = os.path.join(directory, f"llama-server-{outtype}.log")
                    llamas.append((outtype, LlamaServer(args, gguf, outtype, log)))
            others = ([("transformers bf16", copy.deepcopy(model).to(torch.bfloat16))]
                      if args.torch_bf16 else [])
            head_to_head(server, model, directory, args, llamas, others)
            for _, llama in llamas:
                llama.stop()  # the curve is the worker's alone
            if args.clients:
                concurrency(server, args)
        finally:
            for _, llama in llamas:
                llama.stop()
            server.stop()


if __name__ == "__main__":
    main()
