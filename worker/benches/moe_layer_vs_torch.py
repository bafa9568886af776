#!/usr/bin/env python3
"""MoE layer forward + backward GFLOP/s: moe-worker against PyTorch on the CPU, side by side.

    python -m venv /tmp/venv && /tmp/venv/bin/pip install torch
    /tmp/venv/bin/python worker/benches/moe_layer_vs_torch.py [--tokens 4096] [--threads 1]

Builds and runs the Rust benchmark (`cargo run --release --example moe_layer_bench`, or the binary given
with --rust-bin), then the same layer in PyTorch float32 with the same thread count, and prints both
figures, the ratio (Rust / PyTorch; target >= 1.0) and, when --peak-gflops is given (from
`cargo run --release --example fma_peak`), each as a fraction of the FMA peak.

The PyTorch layer is the usual CPU MoE (as in Hugging Face's Mixtral/DeepSeek code): router, sigmoid scores,
top-k, normalised gates, then per expert a gather of its tokens, the SwiGLU MLP and an index_add back; the
shared expert on every token; loss = <output, dout>, differentiated by autograd. Same shapes and the same
FLOP count as the Rust side (GEMMs only: 2 x multiply-adds, backward = 2 x forward).
"""

import argparse
import json
import os
import subprocess
import time

import torch
import torch.nn.functional as F


def flops(a):
    router = 2 * a.tokens * a.hidden * a.experts
    experts = a.tokens * (a.top_k + a.shared) * 3 * 2 * a.hidden * a.expert_hidden
    return 3 * (router + experts)


class Moe(torch.nn.Module):
    def __init__(self, a):
        super().__init__()
        h, f, e = a.hidden, a.expert_hidden, a.experts
        std = h**-0.5
        p = lambda *shape: torch.nn.Parameter(torch.randn(*shape) * std)
        self.top_k = a.top_k
        self.router = p(e, h)
        # One parameter per expert matrix, as Hugging Face's MoE layers hold them (slicing one stacked
        # parameter would make each slice's backward materialise a gradient of the whole stack).
        self.w1 = torch.nn.ParameterList(p(f, h) for _ in range(e))
        self.w3 = torch.nn.ParameterList(p(f, h) for _ in range(e))
        self.w2 = torch.nn.ParameterList(p(h, f) for _ in range(e))
        fs = a.shared * f
        self.s1, self.s3, self.s2 = p(fs, h), p(fs, h), p(h, fs)

    def forward(self, x):
        scores = (x @ self.router.T).sigmoid()
        _, experts = scores.detach().topk(self.top_k, dim=-1)
        gates = scores.gather(1, experts)
        gates = gates / gates.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.w1)).tolist()
        tokens = order // self.top_k
        flat_gates = gates.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows, g = tokens[start : start + n], flat_gates[start : start + n]
            start += n
            xe = x[rows]
            y = (F.silu(xe @ self.w1[e].T) * (xe @ self.w3[e].T)) @ self.w2[e].T
            out.index_add_(0, rows, y * g[:, None])
        shared = (F.silu(x @ self.s1.T) * (x @ self.s3.T)) @ self.s2.T
        return out + shared


def torch_seconds(a):
    torch.manual_seed(1)
    layer = Moe(a)
    x = torch.randn(a.tokens, a.hidden, requires_grad=True)
    dout = torch.randn(a.tokens, a.hidden)
    best, best_cpu = float("inf"), float("inf")
    for i in range(a.iterations + 1):
        # As in training (and the Rust side): weight gradients live across steps, zeroed at each start.
        layer.zero_grad(set_to_none=False)
        x.grad = None
        started, cpu_started = time.perf_counter(), time.process_time()
        (layer(x) * dout).sum().backward()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        if i > 0:
            best, best_cpu = min(best, seconds), min(best_cpu, cpu_seconds)
    return best, best_cpu


def rust_result(a, repo):
    shape = ["--tokens", a.tokens, "--hidden", a.hidden, "--experts", a.experts, "--top-k", a.top_k,
             "--shared", a.shared, "--expert-hidden", a.expert_hidden, "--iterations", a.iterations]
    shape = [str(s) for s in shape]
    if a.rust_bin:
        command = [a.rust_bin] + shape
    else:
        command = ["cargo", "run", "--quiet", "--release", "-p", "moe-worker", "--example", "moe_layer_bench",
                   "--"] + shape
    output = subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--shared", type=int, default=1)
    parser.add_argument("--expert-hidden", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads; the Rust layer runs on 1")
    parser.add_argument("--rust-bin", help="a built moe_layer_bench example (default: cargo run --release)")
    parser.add_argument("--peak-gflops", type=float, help="FMA peak of the threads used, from fma_peak")
    a = parser.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    rust = rust_result(a, repo)
    torch.set_num_threads(a.threads)
    seconds, cpu_seconds = torch_seconds(a)
    gflop = flops(a) / 1e9
    assert abs(gflop - rust["gflop"]) < 1e-3 * gflop, "both sides must count the same FLOPs"
    ours, theirs = rust["gflops"], gflop / seconds
    ours_cpu, theirs_cpu = rust["cpuGflops"], gflop / cpu_seconds
    print(f"shapes: tokens {a.tokens}, hidden {a.hidden}, experts {a.experts}, top-{a.top_k}, "
          f"{a.shared} shared, expert hidden {a.expert_hidden}; {gflop:.1f} GFLOP per forward+backward; "
          f"best of {a.iterations}")
    print(f"moe-worker: {rust['seconds']:.3f} s, {ours:.2f} GFLOP/s wall; {ours_cpu:.2f} GFLOP/s of CPU time (1 thread)")
    print(f"PyTorch {torch.__version__}: {seconds:.3f} s, {theirs:.2f} GFLOP/s wall; {theirs_cpu:.2f} GFLOP/s of CPU "
          f"time ({torch.get_num_threads()} thread(s))")
    print(f"ratio moe-worker / PyTorch: {ours / theirs:.2f}x wall, {ours_cpu / theirs_cpu:.2f}x CPU time (target >= 1.0)")
    if a.peak_gflops:
        print(f"of the FMA peak ({a.peak_gflops:.1f} GFLOP/s): moe-worker {100 * ours / a.peak_gflops:.1f}%, "
              f"PyTorch {100 * theirs / a.peak_gflops:.1f}% (wall)")


if __name__ == "__main__":
    main()
