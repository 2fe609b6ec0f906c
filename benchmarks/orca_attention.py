"""Orca's two split-attention variants on a SmolLM2-135M-shaped random model, step by step.

Runs the same requests through engines that differ only in `attention` (`fused`: the decode
rows gathered into a few padded SDPA calls per layer; `loop`: one call per request, the literal split;
`auto`: whichever measures faster) and, for reference, the runtime's default per-request
layout (per-request slabs, one SDPA call per request). Steps are interleaved across the
engines so background load hits all alike; medians are reported. Random seeded weights,
float32; prompts U(prompt_min, prompt_max) so contexts spread like a serving batch.

    .venv/bin/python benchmarks/orca_attention.py --batch 8 32 --steps 8 --threads 2

`--attention-only` times just the two attention handles over all 30 layers of one decode
iteration (a random pool, no model; seconds instead of minutes):

    .venv/bin/python benchmarks/orca_attention.py --attention-only --batch 8 32 --threads 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from orca_plugin import OrcaScheduler
from orca_plugin.cache import OrcaKVCache
from runtime.architectures import build_model
from runtime.bench.model_spec import SPECS
from runtime.engine import Engine, EngineLimits
from runtime.kv_cache import CacheLimits, ModelShape
from runtime.request import Request
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


def decode_attention(mode: str, batch: int, prompt_range: tuple[int, int], seed: int):
    """A function running one decode iteration's attention (all layers) through `mode`."""
    cfg = SPECS["smollm2-135m-shape"]
    L, H, H_kv, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, 64
    shape = ModelShape(L, H, H_kv, D, cfg.vocab_size, cfg.max_position_embeddings)
    limits = CacheLimits(batch, shape.max_model_len, batch * shape.max_model_len)
    cache = OrcaKVCache(
        shape, limits, torch.device("cpu"), torch.float32, limits.kv_cache_tokens, mode
    )
    rng = random.Random(seed)
    requests = []
    for i in range(batch):
        req = Request(str(i), [1] * rng.randint(*prompt_range), SamplingParams(max_tokens=64))
        cache.add(req)
        req.output_token_ids, req.num_computed_tokens = [1], req.prompt_len  # decoding
        requests.append(req)
    cache.pool.normal_()
    pass_ = next(cache.forward_batches(requests))
    mask = pass_.mask
    q, k, v = torch.randn(batch, H, D), torch.randn(batch, H_kv, D), torch.randn(batch, H_kv, D)

    def run_once() -> None:
        handle = cache.attention(pass_)
        for layer in range(L):
            handle.attend(layer, q, k, v, mask)

    return run_once


def attention_only(
    batches: list[int], iters: int, prompt_range: tuple[int, int], seed: int
) -> None:
    """Median ms of the fused and loop handles, interleaved, per batch size."""
    print(f"{'batch':>5} {'fused ms':>9} {'loop ms':>8}")
    for batch in batches:
        fns = {m: decode_attention(m, batch, prompt_range, seed) for m in ("fused", "loop")}
        times: dict[str, list[float]] = {m: [] for m in fns}
        for fn in fns.values():
            fn()
        for _ in range(iters):
            for mode, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[mode].append(1000 * (time.perf_counter() - start))
        med = {m: statistics.median(t) for m, t in times.items()}
        print(f"{batch:>5} {med['fused']:>9.1f} {med['loop']:>8.1f}")


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
    parser.add_argument(
        "--attention-only", action="store_true", help="time only the attention handles"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt_range = (args.prompt_min, args.prompt_max)
    if args.attention_only:
        attention_only(args.batch, max(args.steps, 9), prompt_range, args.seed)
        return
    with torch.device("cpu"):
        model = build_model(SPECS["smollm2-135m-shape"]).init_weights(args.seed).eval()
    print(f"{'batch':>5} {'variant':>8} {'step ms':>9} {'attention ms':>13} {'prefill ms':>11}")
    for batch in args.batch:
        result = run(model, batch, args.steps, prompt_range, args.seed)
        for name, r in result.items():
            print(
                f"{batch:>5} {name:>8} {r['step_ms']:>9.1f} {r['attention_ms']:>13.1f} "
                f"{r['prefill_ms']:>11.0f}"
            )


if __name__ == "__main__":
    main()
