"""Prompt (prefill) attention alone: the engine's prompt kernel against torch's SDPA.

Causal attention of one prompt per call (SDPA's flash kernel with `is_causal` and
`enable_gqa`, as the layouts called it before the kernel), and of a packed pass of several
prompts (one SDPA call per prompt against one kernel call for all), over a model shape's heads
(default: smollm2-135m's 9 query and 3 KV heads of 64), in float32 or bfloat16 (`--dtype`).
The contenders run interleaved, round after round, and each figure is a median. GFLOP/s counts
the causal work: 4 x heads x head_dim x n(n+1)/2 per prompt of n tokens.

    python benchmarks/prompt_attention.py --lengths 16 64 128 256 512 1024 2048 --packed 16
    python benchmarks/prompt_attention.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from runtime.attention_kernels import load_native_kernel


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def causal_flops(lengths: list[int], heads: int, dim: int) -> float:
    return sum(4 * heads * dim * n * (n + 1) / 2 for n in lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[16, 64, 128, 256, 512, 1024])
    parser.add_argument("--packed", type=int, default=16,
                        help="prompts of a packed pass, lengths U(16, 256); 0 to skip")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = load_native_kernel()
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    dtype = getattr(torch, args.dtype)
    q0 = torch.empty(1, h, d, dtype=dtype)
    if not kernel.attends_prompts(q0, q0):
        raise SystemExit("the prompt kernel does not run here (it needs AVX2 and FMA, float32 or "
                         "bfloat16, a head size that is a multiple of 16)")
    print(f"{torch.get_num_threads()} threads; heads {h}/{hkv}, head size {d}, {args.dtype}")
    print(f"{'prompt':>14} {'SDPA ms':>9} {'kernel ms':>10} {'SDPA GF/s':>10} "
          f"{'kernel GF/s':>12} {'speedup':>8}")

    def row(label: str, lengths: list[int], sdpa: Callable, native: Callable) -> None:
        flops = causal_flops(lengths, h, d)
        a = b = 0.0
        for _ in range(3):  # interleaved: each contender's rounds alternate with the other's
            a += median_ms(sdpa, max(args.rounds // 3, 3))
            b += median_ms(native, max(args.rounds // 3, 3))
        a, b = a / 3, b / 3
        print(f"{label:>14} {a:9.3f} {b:10.3f} {flops / a / 1e6:10.0f} {flops / b / 1e6:12.0f} "
              f"{a / b:7.2f}x")

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            is_causal=True, enable_gqa=True)

    for n in args.lengths:
        q, k, v = (torch.randn(n, heads, d, dtype=dtype) for heads in (h, hkv, hkv))
        segments = torch.tensor([[0, n, 0, 0]])
        row(f"{n}", [n], lambda q=q, k=k, v=v: sdpa(q, k, v),
            lambda q=q, k=k, v=v, s=segments: kernel.prompts(q, k, v, s, hkv * d, d, hkv))
    if args.packed:
        rng = random.Random(0)
        lengths = [rng.randint(16, 256) for _ in range(args.packed)]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        total = sum(lengths)
        q, k, v = (torch.randn(total, heads, d, dtype=dtype) for heads in (h, hkv, hkv))
        segments = torch.tensor([[s, n, 0, s * hkv * d] for s, n in zip(starts, lengths,
                                                                           strict=True)])

        def per_prompt() -> list[torch.Tensor]:
            return [sdpa(q[s:s + n], k[s:s + n], v[s:s + n])
                    for s, n in zip(starts, lengths, strict=True)]

        row(f"{args.packed} x U(16,256)", lengths, per_prompt,
            lambda: kernel.prompts(q, k, v, segments, hkv * d, d, hkv))


if __name__ == "__main__":
    main()
