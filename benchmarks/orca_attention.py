"""Orca's two split-attention variants on a SmolLM2-135M-shaped random model, step by step.

Runs the same requests through engines that differ only in `attention` (`fused`: the decode
rows in one padded SDPA call per layer; `loop`: one call per request, the literal split;
`auto`: whichever measures faster) and, for reference, the runtime's default per-request
layout (per-request slabs, one SDPA call per request). Steps are interleaved across the
engines so background load hits all alike; medians are reported. Random seeded weights,
float32; prompts U(prompt_min, prompt_max) so contexts spread like a serving batch.

    .venv/bin/python benchmarks/orca_attention.py --batch 8 32 --steps 8 --threads 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from orca_plugin import OrcaScheduler
from runtime.architectures import build_model
from runtime.bench.model_spec import SPECS
from runtime.engine import Engine, EngineLimits
from runtime.sampling_params import SamplingParams

VARIANTS = ("fused", "loop", "auto", "default")


def make_engine(model: torch.nn.Module, variant: str, batch: int) -> Engine:
    """An engine whose only difference is the attention variant (`default`: runtime layout)."""
    scheduler = None if variant == "default" else OrcaScheduler(attention=variant)
    return Engine(model, None, scheduler, variant, EngineLimits(max_num_seqs=batch))


def attention_ms(engine: Engine) -> float:
    """Attention time of the engine's last pass (Orca caches time it on CPU; else NaN)."""
    times = getattr(engine.kv_cache, "last_times", None)
    if times is None or not times.enabled:
        return float("nan")
    return 1000 * (times.decode_s + times.initiation_s)


def run(
    model: torch.nn.Module, batch: int, steps: int, prompt_range: tuple[int, int], seed: int
) -> dict[str, dict[str, float]]:
    """Prefill `batch` prompts in one iteration, then time `steps` decode iterations each."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    prompts = [
        [rng.randrange(vocab) for _ in range(rng.randint(*prompt_range))] for _ in range(batch)
    ]
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    engines = {v: make_engine(model, v, batch) for v in VARIANTS}
    step_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    attn_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    prefill_ms: dict[str, float] = {}
    for name, engine in engines.items():
        for p in prompts:
            engine.add_request(p, params)
        start = time.perf_counter()
        engine.step()  # one iteration: every prompt's initiation
        prefill_ms[name] = 1000 * (time.perf_counter() - start)
        engine.step()  # warm-up decode iteration
    for _ in range(steps):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.step()
            step_ms[name].append(1000 * (time.perf_counter() - start))
            attn_ms[name].append(attention_ms(engine))
    contexts = [r.num_computed_tokens for r in engines["fused"].running]
    chooser = engines["auto"].kv_cache.chooser
    costs = {v: chooser.cost(v) for v in chooser.VARIANTS}
    print(
        "auto's measured decode attention, ms per row: "
        + ", ".join(f"{v} {1000 * c:.2f}" for v, c in costs.items() if c is not None)
    )
    print(
        f"batch {batch}: mean context {statistics.mean(contexts):.0f}, max {max(contexts)} tokens"
    )
    return {
        name: {
            "step_ms": statistics.median(step_ms[name]),
            "attention_ms": statistics.median(attn_ms[name]),
            "prefill_ms": prefill_ms[name],
        }
        for name in VARIANTS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[8, 32], help="decode batch sizes to measure"
    )
    parser.add_argument("--steps", type=int, default=8, help="timed decode iterations")
    parser.add_argument("--prompt-min", type=int, default=32, help="shortest prompt")
    parser.add_argument(
        "--prompt-max",
        type=int,
        default=314,
        help="longest prompt (default mean context about 173, as DESIGN 6)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with torch.device("cpu"):
        model = build_model(SPECS["smollm2-135m-shape"]).init_weights(args.seed).eval()
    print(f"{'batch':>5} {'variant':>8} {'step ms':>9} {'attention ms':>13} {'prefill ms':>11}")
    for batch in args.batch:
        result = run(model, batch, args.steps, (args.prompt_min, args.prompt_max), args.seed)
        for name, r in result.items():
            print(
                f"{batch:>5} {name:>8} {r['step_ms']:>9.1f} {r['attention_ms']:>13.1f} "
                f"{r['prefill_ms']:>11.0f}"
            )


if __name__ == "__main__":
    main()
