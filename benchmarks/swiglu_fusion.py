"""SwiGLU fused into the engine's sgemm against the gate-and-up linear then SiLU's product.

Two engines in one process over two copies of a model shape (default smollm2-135m's), both
compiled on `linear_backend: native`; one routes the MLP's gate-and-up projection through the
fused op (`baton_kernels::linear_swiglu`, what the engine runs), the other through the plain
linear op followed by inductor's fused `silu(gate) * up` (the engine before the fusion).
Their passes alternate, round after round, so machine noise hits them alike; each figure is a
median. Timed: a packed prefill of `--prompts` prompts U(16, 256) (one output token each), and
for each `--rows`, that many 128-token prompts decoding `--tokens` tokens (prefill included).

    python benchmarks/swiglu_fusion.py --prompts 16 --rows 1 8 32 64
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import decode_step  # noqa: E402 - the step benchmark's model shape and engine settings

import runtime.compiled_forward as compiled_forward  # noqa: E402
from runtime.sampling_params import SamplingParams  # noqa: E402


def build_engines(scheduler: str) -> dict:
    """{"fused": engine, "unfused": engine}, each over its own model and compiled decoder."""
    fused_route = compiled_forward._opaque_gated_forward
    engines = {}
    for label in ("fused", "unfused"):
        if label == "unfused":  # the slot's linear op, then the product (no C++ fused op)
            compiled_forward._opaque_gated_forward = (
                lambda slot, linear, native: fused_route(slot, linear, False))
        try:
            model = decode_step.build_model(decode_step.SMOLLM2_135M).init_weights(0)
            model = model.to("cpu", torch.float32).eval()
            engine = decode_step.make_engine(model, scheduler, 64, "native", 512)
            engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0,
                                                        ignore_eos=True))  # compiles
        finally:
            compiled_forward._opaque_gated_forward = fused_route
        engines[label] = engine
    return engines


def alternate(engines: dict, prompts: list[list[int]], params: SamplingParams,
              rounds: int) -> dict[str, float]:
    for engine in engines.values():
        engine.generate(prompts, params)
    times: dict[str, list[float]] = {label: [] for label in engines}
    for _ in range(rounds):
        for label, engine in engines.items():
            start = time.perf_counter()
            engine.generate(prompts, params)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 8, 32, 64])
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scheduler", default="baton")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    decode_step.COMPILE = True
    engines = build_engines(args.scheduler)
    rng = random.Random(0)
    print(f"{torch.get_num_threads()} threads, {args.scheduler}, seconds (median of "
          f"{args.rounds}); fused / unfused")
    if args.prompts:
        prompts = [[rng.randrange(49152) for _ in range(rng.randint(16, 256))]
                   for _ in range(args.prompts)]
        t = alternate(engines, prompts, SamplingParams(max_tokens=1, temperature=0.0,
                                                       ignore_eos=True), args.rounds)
        print(f"prefill {args.prompts} prompts ({sum(map(len, prompts))} tokens): fused "
              f"{t['fused']:.3f}, unfused {t['unfused']:.3f}, {t['fused'] / t['unfused']:.3f}")
    for rows in args.rows:
        prompts = [[rng.randrange(49152) for _ in range(128)] for _ in range(rows)]
        t = alternate(engines, prompts, SamplingParams(max_tokens=args.tokens, temperature=0.0,
                                                       ignore_eos=True), args.rounds)
        print(f"{rows} rows x {args.tokens} tokens: fused {t['fused']:.3f}, unfused "
              f"{t['unfused']:.3f}, {t['fused'] / t['unfused']:.3f}")


if __name__ == "__main__":
    main()
