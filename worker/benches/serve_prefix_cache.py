#!/usr/bin/env python3
"""Time to first token with and without prefix caching: one `moe-worker`
binary serving the benchmark's model twice at once (`--no-prefix-caching`
on one side), requests alternating between them, each a long shared system
prompt and a question no request before asked. Prints the medians, wall and
CPU, the ratio, and the prompt tokens the cache supplied.

    cargo build --release -p moe-worker --bin moe-worker
    /work/venv-torch/bin/python worker/benches/serve_prefix_cache.py \\
        --worker target/release/moe-worker [--system-repeats 6 --runs 10]

The model is `serve_vs_transformers.py`'s (a random Mixtral-style model in
Hugging Face format; needs torch and transformers to write it).
"""

import argparse
import http.client
import json
import tempfile
import time
import types

import serve_vs_transformers as bench

SYSTEM = ("You are the assistant of a cluster that trains and serves mixture-of-experts "
          "models. Answer precisely, name the field a user must change, and keep it short. ")


def ask(server, prompt):
    """One streamed one-token completion: (wall seconds, CPU seconds, usage)."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": 1, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    c0, t0 = server.cpu(), time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    usage = None
    for line in response:
        line = line.strip()
        if line.startswith(b"data:") and line != b"data: [DONE]":
            event = json.loads(line[5:])
            usage = event.get("usage") or usage
    wall = time.perf_counter() - t0
    connection.close()
    return wall, server.cpu() - c0, usage


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", required=True, help="a release moe-worker binary")
    parser.add_argument("--runs", type=int, default=10, help="questions per side")
    parser.add_argument("--system-repeats", type=int, default=6,
                        help="copies of the system paragraph in the shared prefix")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    system = SYSTEM * args.system_repeats
    with tempfile.TemporaryDirectory() as directory:
        bench.write_model(directory, args)
        servers = {}
        try:
            for name, caching in (("cached", True), ("uncached", False)):
                options = types.SimpleNamespace(worker=args.worker, threads=args.threads,
                                                precision=args.precision, prefix_caching=caching)
                servers[name] = bench.Server(options, directory)
                ask(servers[name], system + "Warm-up?")  # the system prompt, computed once
            results = {"cached": [], "uncached": []}
            for r in range(args.runs):
                question = f"Question {r}: which field sets the experts per token?"
                for name in ("cached", "uncached") if r % 2 == 0 else ("uncached", "cached"):
                    results[name].append(ask(servers[name], system + question))
        finally:
            for server in servers.values():
                server.stop()
    usage = results["cached"][-1][2]
    print(f"prompt {usage['prompt_tokens']} tokens, of which the cache supplied "
          f"{usage['prompt_tokens_details']['cached_tokens']} (uncached side: "
          f"{results['uncached'][-1][2]['prompt_tokens_details']['cached_tokens']}); "
          f"{args.precision} weights, {args.threads} thread(s), {args.runs} runs per side")
    for clock, i in (("wall", 0), ("cpu", 1)):
        on = bench.median([r[i] for r in results["cached"]])
        off = bench.median([r[i] for r in results["uncached"]])
        print(f"TTFT {clock:4}: prefix cache {on * 1e3:7.1f} ms, none {off * 1e3:7.1f} ms: "
              f"{off / on:.1f}x faster (medians)")


if __name__ == "__main__":
    main()
