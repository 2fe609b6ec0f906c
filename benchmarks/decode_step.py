"""Time one decode step of a SmolLM2-135M-shaped model against its matmuls timed alone.

The ratio step / matmuls says how much of a decode step is overhead beyond the GEMMs the
machine must do anyway; "attn" is the step's attention (30 SDPA calls over the cache) alone and
"other" what is left: norms, RoPE, residuals, cache writes, Python. Random seeded weights,
float32, a preallocated KV cache filled to `--context` tokens (contents random: timing only).

    .venv/bin/python benchmarks/decode_step.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from runtime.architectures import build_model
from runtime.architectures.attention_ref import StaticCacheAttention
from runtime.bench.model_spec import SPECS

# The bench's SmolLM2-135M-shaped spec; a longer context so large --context values fit.
SMOLLM2_135M = SPECS["smollm2-135m-shape"].replace(max_position_embeddings=8192)


def interleaved_median_ms(fns: list[Callable[[], object]], iters: int) -> list[float]:
    """Median ms of each function, run in turn each round so background load hits all alike."""
    for fn in fns:
        fn()
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


@torch.inference_mode()
def measure(model: torch.nn.Module, B: int, context: int, iters: int) -> tuple[float, ...]:
    """Median ms of: one decode step, its matmuls alone, its attention alone."""
    cfg = model.config
    cache = StaticCacheAttention(
        cfg.num_hidden_layers, B, context + 1, cfg.num_key_value_heads, cfg.head_dim
    )
    cache.k.normal_()
    cache.v.normal_()
    ids = torch.randint(0, cfg.vocab_size, (B, 1))
    pos = torch.full((B, 1), context)

    def step() -> torch.Tensor:
        cache.length = context  # every step decodes position `context` again
        hidden = model(ids, pos, cache, None)  # (B, 1, hidden)
        return model.compute_logits(hidden[:, -1])  # (B, vocab)

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(B, w.shape[1]) for w in weights}

    def matmuls() -> None:
        for w in weights:  # qkv, o, gate_up, down per layer, then the (tied) LM head
            F.linear(xs[w.shape[1]], w)

    q = torch.randn(B, cfg.num_attention_heads, 1, cfg.head_dim)  # (B, H, 1, D)

    def attention() -> None:
        for layer in range(cfg.num_hidden_layers):  # each layer's own cache, as in the step
            keys, values = cache.k[layer, :, :, : context + 1], cache.v[layer, :, :, : context + 1]
            F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)

    return tuple(interleaved_median_ms([step, matmuls, attention], iters))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="batches")
    parser.add_argument("--context", type=int, default=128, help="cached tokens per row")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = SMOLLM2_135M
    model = build_model(cfg).init_weights(args.seed).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"SmolLM2-135M shape, {n_params / 1e6:.1f}M params, float32, {args.threads} threads, "
        f"context {args.context}, median of {args.iters}, "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    print(
        f"{'batch':>5} {'step ms':>8} {'matmul ms':>9} {'ratio':>6} {'attn ms':>8} "
        f"{'other ms':>8} {'tok/s':>7}"
    )
    for B in args.batch_sizes:
        step_ms, mm_ms, attn_ms = measure(model, B, args.context, args.iters)
        print(
            f"{B:>5} {step_ms:>8.1f} {mm_ms:>9.1f} {step_ms / mm_ms:>6.2f} {attn_ms:>8.1f} "
            f"{step_ms - mm_ms - attn_ms:>8.1f} {1000 * B / step_ms:>7.0f}"
        )


if __name__ == "__main__":
    main()
