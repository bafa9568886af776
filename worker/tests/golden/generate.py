#!/usr/bin/env python3
"""Writes the PyTorch golden fixtures that `worker/tests/golden/main.rs` checks the Rust model against.

    python -m venv /tmp/venv && /tmp/venv/bin/pip install torch safetensors
    /tmp/venv/bin/python worker/tests/golden/generate.py

The fixtures are committed, so CI needs no torch. Everything is float64 and written by PyTorch's autograd
from a from-scratch restatement of the model (nothing is imported from the Rust side): weights are drawn
here from a seeded generator, saved with the inputs, the outputs and every gradient, and the shape and
routing hyperparameters go into the safetensors metadata (key "config", JSON) so the Rust test builds
exactly this model.

Routing is a discontinuous choice, so the generator only accepts a draw whose top-k choice is robust: every
gap between the ranked (biased) scores that decides the selection, and between the group scores that decide
the groups, must exceed MARGIN, far above what float32 rounding can move. It also requires the selection
bias to change at least one token's experts, so the fixture proves the bias steers selection but not gates.
"""

import json
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.set_default_dtype(torch.float64)
HERE = pathlib.Path(__file__).resolve().parent

NORM_EPS = 1e-5  # worker/src/model/config.rs NORM_EPS
NORMALIZE_EPS = 1e-20  # worker/src/moe/routing.rs: added to the sum of the selected scores
MARGIN = 2e-3

# One MoE feed-forward layer alone: sigmoid scores, group-limited, normalised and scaled gates, two shared
# experts, the sequence-wise balance loss. Two sequences of 5 tokens.
MOE_BLOCK = {
    "hidden": 8,
    "n_routed_experts": 8,
    "expert_hidden": 4,
    "n_shared_experts": 2,
    "shared_expert_hidden": 3,
    "top_k": 3,
    "score_function": "sigmoid",
    "group_limit": {"n_groups": 4, "top_groups": 2},
    "normalize_gates": True,
    "routed_scaling_factor": 2.5,
    "aux_loss_alpha": 0.01,
    "seq_len": 5,
    "sequences": 2,
}

# The whole model: a dense block then an MoE block with softmax scores (not renormalised), no group limit,
# grouped-query attention. Two sequences of 6 tokens.
MODEL = {
    "vocab": 24,
    "hidden": 16,
    "layers": 2,
    "dense_layers": 1,
    "dense_hidden": 20,
    "heads": 4,
    "kv_heads": 2,
    "seq_len": 6,
    "rope_theta": 100.0,
    "sequences": 2,
    "moe": {
        "hidden": 16,
        "n_routed_experts": 8,
        "expert_hidden": 4,
        "n_shared_experts": 1,
        "shared_expert_hidden": 4,
        "top_k": 2,
        "score_function": "softmax",
        "group_limit": None,
        "normalize_gates": False,
        "routed_scaling_factor": 1.5,
        "aux_loss_alpha": 0.01,
    },
}


class RoutingNotRobust(Exception):
    """The draw puts two candidates within MARGIN of each other: try the next seed."""


def normal(gen, shape, std):
    return torch.randn(*shape, generator=gen) * std


def rmsnorm(x, gain):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + NORM_EPS) * gain


def swiglu_mlp(x, w1, w3, w2):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def require_gaps(ranked, count, what, check):
    """The first `count` + 1 values of each row of `ranked` (descending) are pairwise > MARGIN apart."""
    n = min(count + 1, ranked.shape[-1])
    gaps = ranked[..., : n - 1] - ranked[..., 1:n]
    if n > 1 and gaps.min().item() <= MARGIN and check:
        raise RoutingNotRobust(f"{what}: gap {gaps.min().item():.2e}")


def select_experts(cfg, biased, check=True):
    """Top-k experts per token from the biased scores, best first; group-limited when configured.
    With `check`, rejects a draw whose choice is not robust (see MARGIN)."""
    k = cfg["top_k"]
    limit = cfg["group_limit"]
    if limit is None:
        ranked, experts = biased.sort(dim=-1, descending=True)
        require_gaps(ranked, k, "expert scores", check)
        return experts[:, :k]
    tokens, n = biased.shape
    groups = biased.view(tokens, limit["n_groups"], n // limit["n_groups"])
    group_scores = groups.topk(2, dim=-1).values.sum(-1)
    ranked_groups, chosen = group_scores.sort(dim=-1, descending=True)
    require_gaps(ranked_groups, limit["top_groups"], "group scores", check)
    eligible = torch.zeros_like(group_scores, dtype=torch.bool)
    eligible.scatter_(1, chosen[:, : limit["top_groups"]], True)
    mask = eligible.repeat_interleave(n // limit["n_groups"], dim=1)
    masked = biased.masked_fill(~mask, float("-inf"))
    ranked, experts = masked.sort(dim=-1, descending=True)
    require_gaps(ranked, k, "eligible expert scores", check)
    return experts[:, :k]


def moe_layer(cfg, x, p, bias, seq_len):
    """DeepSeek-V3 MoE: returns (output, aux_loss, experts [tokens, k])."""
    tokens = x.shape[0]
    logits = x @ p["router"].T
    if cfg["score_function"] == "softmax":
        scores = logits.softmax(-1)
    else:
        scores = logits.sigmoid()
    # The selection bias decides which experts, never the gate values.
    experts = select_experts(cfg, scores.detach() + bias)
    unbiased = select_experts(cfg, scores.detach(), check=False) if bias.abs().max() > 0 else experts
    selected = scores.gather(1, experts)
    if cfg["normalize_gates"] or cfg["score_function"] == "sigmoid":
        gates = selected / (selected.sum(-1, keepdim=True) + NORMALIZE_EPS)
    else:
        gates = selected
    gates = gates * cfg["routed_scaling_factor"]

    # Every expert on every token (tiny shapes), then each token picks its k outputs.
    w1, w3, w2 = p["experts_w1"], p["experts_w3"], p["experts_w2"]
    all_outputs = torch.stack([swiglu_mlp(x, w1[e], w3[e], w2[e]) for e in range(w1.shape[0])])
    picked = all_outputs[experts, torch.arange(tokens)[:, None]]  # [tokens, k, hidden]
    out = (gates[..., None] * picked).sum(1)
    # Shared experts one by one (the Rust layer fuses them into one wider MLP: a fusion this checks).
    for w1s, w3s, w2s in zip(p["shared_w1_each"], p["shared_w3_each"], p["shared_w2_each"]):
        out = out + swiglu_mlp(x, w1s, w3s, w2s)

    aux = torch.zeros(())
    alpha = cfg["aux_loss_alpha"]
    if alpha > 0:
        n, k = scores.shape[1], cfg["top_k"]
        normalised = scores / scores.sum(-1, keepdim=True)
        seqs = tokens // seq_len
        for s in range(seqs):
            rows = slice(s * seq_len, (s + 1) * seq_len)
            counts = torch.bincount(experts[rows].reshape(-1), minlength=n).to(scores.dtype)
            f = counts * n / (k * seq_len)  # a constant: counts of a discrete choice
            aux = aux + alpha * (f * normalised[rows].mean(0)).sum()
        aux = aux / seqs
    return out, aux, experts, not torch.equal(unbiased, experts)


def moe_params(gen, cfg, std):
    n, e, h, s = cfg["n_routed_experts"], cfg["expert_hidden"], cfg["hidden"], cfg["shared_expert_hidden"]
    p = {
        "router": normal(gen, (n, h), std),
        "experts_w1": normal(gen, (n, e, h), std),
        "experts_w3": normal(gen, (n, e, h), std),
        "experts_w2": normal(gen, (n, h, e), std / 2),
        "shared_w1_each": [normal(gen, (s, h), std) for _ in range(cfg["n_shared_experts"])],
        "shared_w3_each": [normal(gen, (s, h), std) for _ in range(cfg["n_shared_experts"])],
        "shared_w2_each": [normal(gen, (h, s), std / 2) for _ in range(cfg["n_shared_experts"])],
    }
    for tensor in leaves(p):
        tensor.requires_grad_(True)
    return p


def leaves(p):
    for value in p.values():
        yield from (value if isinstance(value, list) else [value])


def fused_moe_tensors(p, prefix, grads):
    """The Rust layout: shared experts fused (w1, w3 stacked by rows, w2 by columns)."""
    get = (lambda t: t.grad) if grads else (lambda t: t.detach())
    out = {f"{prefix}{name}": get(p[name]) for name in ("router", "experts_w1", "experts_w3", "experts_w2")}
    if p["shared_w1_each"]:
        out[f"{prefix}shared_w1"] = torch.cat([get(t) for t in p["shared_w1_each"]], 0)
        out[f"{prefix}shared_w3"] = torch.cat([get(t) for t in p["shared_w3_each"]], 0)
        out[f"{prefix}shared_w2"] = torch.cat([get(t) for t in p["shared_w2_each"]], 1)
    return out


def moe_block_fixture(seed):
    cfg = MOE_BLOCK
    gen = torch.Generator().manual_seed(seed)
    tokens = cfg["seq_len"] * cfg["sequences"]
    p = moe_params(gen, cfg, 0.5)
    bias = normal(gen, (cfg["n_routed_experts"],), 0.05)
    x = normal(gen, (tokens, cfg["hidden"]), 1.0).requires_grad_(True)
    dout = normal(gen, (tokens, cfg["hidden"]), 1.0)
    out, aux, experts, bias_moved = moe_layer(cfg, x, p, bias, cfg["seq_len"])
    if not bias_moved:
        raise RoutingNotRobust("the selection bias changes no token's experts")
    # The scalar whose gradients are saved: <output, dout> plus the balance loss.
    ((out * dout).sum() + aux).backward()
    tensors = {"x": x.detach(), "dout": dout, "selection_bias": bias, "output": out.detach(),
               "aux_loss": aux.detach().reshape(1), "experts": experts.to(torch.int64), "grad.x": x.grad}
    tensors.update(fused_moe_tensors(p, "", grads=False))
    tensors.update(fused_moe_tensors(p, "grad.", grads=True))
    return tensors, cfg


def rope(x, theta):
    """x: [batch, seq, heads, head_dim]; pairs (2i, 2i+1) turned by pos * theta^(-2i / head_dim)."""
    seq, hd = x.shape[1], x.shape[3]
    i = torch.arange(hd // 2, dtype=torch.float64)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * theta ** (-2.0 * i / hd)
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def attention(cfg, x, w):
    batch, seq = cfg["sequences"], cfg["seq_len"]
    heads, kv_heads = cfg["heads"], cfg["kv_heads"]
    hd = cfg["hidden"] // heads
    q = (x @ w["wq"].T).view(batch, seq, heads, hd)
    k = (x @ w["wk"].T).view(batch, seq, kv_heads, hd)
    v = (x @ w["wv"].T).view(batch, seq, kv_heads, hd)
    q, k = rope(q, cfg["rope_theta"]), rope(k, cfg["rope_theta"])
    # Query head h reads key/value head h // (heads / kv_heads).
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, hd]
    scores = q @ k.transpose(-1, -2) / hd**0.5
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(batch * seq, heads * hd)
    return out @ w["wo"].T


def model_params(gen, cfg):
    h, v, kv = cfg["hidden"], cfg["vocab"], cfg["kv_heads"] * cfg["hidden"] // cfg["heads"]
    gain = lambda: (1.0 + normal(gen, (h,), 0.1))
    p = {"embedding": normal(gen, (v, h), 1.0)}
    blocks = []
    for i in range(cfg["layers"]):
        b = {"attention_norm": gain(), "wq": normal(gen, (h, h), h**-0.5), "wk": normal(gen, (kv, h), h**-0.5),
             "wv": normal(gen, (kv, h), h**-0.5), "wo": normal(gen, (h, h), 0.5 * h**-0.5), "ffn_norm": gain()}
        if i < cfg["dense_layers"]:
            d = cfg["dense_hidden"]
            b["dense"] = {"w1": normal(gen, (d, h), h**-0.5), "w3": normal(gen, (d, h), h**-0.5),
                          "w2": normal(gen, (h, d), 0.5 * d**-0.5)}
            for t in b["dense"].values():
                t.requires_grad_(True)
        else:
            b["moe"] = moe_params(gen, cfg["moe"], h**-0.5)
            b["selection_bias"] = normal(gen, (cfg["moe"]["n_routed_experts"],), 0.02)
        for name in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm"):
            b[name].requires_grad_(True)
        blocks.append(b)
    p["blocks"] = blocks
    p["final_norm"] = gain().requires_grad_(True)
    p["lm_head"] = normal(gen, (v, h), h**-0.5).requires_grad_(True)
    p["embedding"].requires_grad_(True)
    return p


def model_forward(cfg, p, tokens, targets):
    x = p["embedding"][tokens]
    aux_total = torch.zeros(())
    bias_moved = False
    experts_per_layer = {}
    for i, b in enumerate(p["blocks"]):
        mid = x + attention(cfg, rmsnorm(x, b["attention_norm"]), b)
        normed = rmsnorm(mid, b["ffn_norm"])
        if "dense" in b:
            d = b["dense"]
            ffn = swiglu_mlp(normed, d["w1"], d["w3"], d["w2"])
        else:
            ffn, aux, experts, moved = moe_layer(cfg["moe"], normed, b["moe"], b["selection_bias"], cfg["seq_len"])
            aux_total = aux_total + aux
            bias_moved |= moved
            experts_per_layer[i] = experts
        x = mid + ffn
    logits = rmsnorm(x, p["final_norm"]) @ p["lm_head"].T
    cross_entropy = F.cross_entropy(logits, targets)
    return cross_entropy, aux_total, experts_per_layer, bias_moved


def model_tensors(p, grads):
    """Named as `Weights::tensors` names them in Rust."""
    get = (lambda t: t.grad) if grads else (lambda t: t.detach())
    prefix = "grad." if grads else ""
    out = {f"{prefix}embedding": get(p["embedding"])}
    for i, b in enumerate(p["blocks"]):
        for name in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm"):
            out[f"{prefix}blocks.{i}.{name}"] = get(b[name])
        if "dense" in b:
            for name, t in b["dense"].items():
                out[f"{prefix}blocks.{i}.dense.{name}"] = get(t)
        else:
            out.update(fused_moe_tensors(b["moe"], f"{prefix}blocks.{i}.moe.", grads))
            if not grads:
                out[f"blocks.{i}.moe.selection_bias"] = b["selection_bias"]
    out[f"{prefix}final_norm"] = get(p["final_norm"])
    out[f"{prefix}lm_head"] = get(p["lm_head"])
    return out


def model_step_fixture(seed):
    cfg = MODEL
    gen = torch.Generator().manual_seed(seed)
    p = model_params(gen, cfg)
    n = cfg["seq_len"] * cfg["sequences"]
    tokens = torch.randint(cfg["vocab"], (n,), generator=gen)
    targets = torch.randint(cfg["vocab"], (n,), generator=gen)
    cross_entropy, aux, experts, bias_moved = model_forward(cfg, p, tokens, targets)
    if not bias_moved:
        raise RoutingNotRobust("the selection bias changes no token's experts")
    (cross_entropy + aux).backward()
    tensors = {"tokens": tokens.to(torch.int64), "targets": targets.to(torch.int64),
               "cross_entropy": cross_entropy.detach().reshape(1), "aux_loss": aux.detach().reshape(1)}
    for i, e in experts.items():
        tensors[f"blocks.{i}.moe.experts"] = e.to(torch.int64)
    tensors.update(model_tensors(p, grads=False))
    tensors.update(model_tensors(p, grads=True))
    return tensors, cfg


def write(name, build):
    """Tries seeds 0, 1, ... until the draw's routing is robust; writes `name` with the seed and config."""
    for seed in range(1000):
        try:
            tensors, cfg = build(seed)
        except RoutingNotRobust as why:
            print(f"{name}: seed {seed} rejected ({why})")
            continue
        metadata = {"config": json.dumps(cfg), "seed": str(seed), "torch": torch.__version__,
                    "generator": "worker/tests/golden/generate.py"}
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, HERE / name, metadata=metadata)
        size = (HERE / name).stat().st_size
        print(f"{name}: seed {seed}, {len(tensors)} tensors, {size} bytes")
        return
    raise SystemExit(f"{name}: no robust seed found")


if __name__ == "__main__":
    write("moe_block.safetensors", moe_block_fixture)
    write("model_step.safetensors", model_step_fixture)
