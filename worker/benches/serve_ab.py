#!/usr/bin/env python3
"""Two `moe-worker` binaries side by side (before / after a change): both
serve the benchmark's model at once, and their requests alternate run by
run, so a loaded machine slows both alike. Prints time to first token and
decode speed, wall and CPU, medians, and the B / A ratios.

    /work/venv-torch/bin/python worker/benches/serve_ab.py \\
        --a /tmp/moe-worker-before --b target/release/moe-worker [--runs 12]

The measurements are `serve_vs_transformers.py`'s (one-token generation;
(tokens - 1) / (time of a --tokens generation - TTFT); CPU time of the
server's threads). Needs torch and transformers (to write the model).
"""

import argparse
import tempfile
import types

import serve_vs_transformers as bench


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="the baseline moe-worker binary")
    parser.add_argument("--b", required=True, help="the changed moe-worker binary")
    parser.add_argument("--runs", type=int, default=12, help="alternating runs per binary")
    parser.add_argument("--a-precision", default="fp32", help="--precision of the baseline")
    parser.add_argument("--b-precision", default="fp32", help="--precision of the changed binary")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arch", choices=["mixtral", "deepseek_v3"], default="mixtral")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--ttft-repeats", type=int, default=3)
    parser.add_argument("--prompt-repeats", type=int, default=1,
                        help="the benchmark prompt this many times over (a long prefill)")
    args = parser.parse_args()
    bench.PROMPT = " ".join([bench.PROMPT] * args.prompt_repeats)
    with tempfile.TemporaryDirectory() as directory:
        bench.write_model(directory, args)
        servers = {}
        try:
            for name in ("a", "b"):
                options = types.SimpleNamespace(worker=getattr(args, name), threads=args.threads,
                                                precision=getattr(args, f"{name}_precision"))
                servers[name] = bench.Server(options, directory)
                bench.stream_completion(servers[name].port, 4)  # warm-up
            results = {"a": [], "b": []}
            for r in range(args.runs):
                for name in ("a", "b") if r % 2 == 0 else ("b", "a"):
                    results[name].append(bench.worker_run(servers[name], args))
        finally:
            for server in servers.values():
                server.stop()
    figures = {}
    for name, runs in results.items():
        for clock, i in (("wall", 0), ("cpu", 1)):
            figures[name, clock] = (
                bench.median([ttft[i] for ttft, _, _ in runs]),
                # A run whose long generation took no longer than its TTFT (a
                # contended machine held it up) has no decode time: left out.
                bench.median([(n - 1) / period[i] for _, period, n in runs if period[i] > 0]),
            )
    for name in ("a", "b"):
        for clock in ("wall", "cpu"):
            ttft, decode = figures[name, clock]
            print(f"{name} {clock:4}: TTFT {ttft * 1e3:6.1f} ms, decode {decode:6.1f} tok/s (medians)")
    for clock in ("wall", "cpu"):
        (ttft_a, decode_a), (ttft_b, decode_b) = figures["a", clock], figures["b", clock]
        print(f"b / a, {clock}: TTFT {ttft_a / ttft_b:.2f}x faster, decode {decode_b / decode_a:.2f}x")


if __name__ == "__main__":
    main()
