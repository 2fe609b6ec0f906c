"""A decode step on fixed-shape frozen graphs (`static_decode_rows`) against the dynamic graph.

Two compiled engines over the same weights (separate model copies, since the fixed-shape
graphs read a dense copy of the decoder's weights), the same requests at each row count
(`--context` cached tokens per row), steps alternated round after round so background load
hits both alike. The engine with buckets builds every bucket first (about a minute each on 2
cores for this 30-layer model); a row count between two buckets runs padded to the upper one.

    .venv/bin/python benchmarks/static_rows_ab.py --rows 1 4 8 16 32 --buckets 1 4 8 16 32
"""

from __future__ import annotations

import argparse
import time

import decode_step
import torch
from decode_step import SMOLLM2_135M, interleaved_median_ms, make_engine, start_decoding

from runtime import static_graphs
from runtime.architectures import build_model
from runtime.engine import Engine
from runtime.hardware import cpu_info, keep_freed_memory
from runtime.model_runner import EngineLimits
from runtime.plugins import instantiate_scheduler


def engine_with_buckets(model: torch.nn.Module, scheduler: str, rows: int,
                        buckets: tuple[int, ...]) -> Engine:
    limits = EngineLimits(max_num_seqs=rows, max_model_len=1024, kv_cache_tokens=rows * 1024)
    return Engine(model, None, instantiate_scheduler(scheduler, {}), scheduler, limits,
                  compile_model=True, static_decode_rows=buckets)


def decoding(engine: Engine, rows: int, context: int, steps: int) -> Engine:
    """`engine` with `rows` requests prefilled and decoding."""
    return start_decoding(engine, [context] * rows, steps + 16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    p.add_argument("--buckets", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--scheduler", default="baton")
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    decode_step.COMPILE = True
    # Every bucket as built, even one the engine's startup check would drop: this measures them.
    static_graphs.SPEED_CHECK_ROUNDS = 0
    keep_freed_memory()
    dtype = getattr(torch, args.dtype)
    models = [build_model(SMOLLM2_135M).init_weights(0).to(dtype).eval().requires_grad_(False)
              for _ in range(2)]
    buckets = tuple(args.buckets)
    start = time.perf_counter()
    engine_with_buckets(models[1], args.scheduler, 1, buckets).runner.build_static_graphs()
    print(f"{cpu_info().model_name}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{args.scheduler}, context {args.context}; buckets {list(buckets)} built in "
          f"{time.perf_counter() - start:.0f} s")
    print(f"{'rows':>5} {'dynamic ms':>11} {'buckets ms':>11} {'speedup':>8}")
    for rows in args.rows:
        dynamic = decoding(make_engine(models[0], args.scheduler, rows, "auto", 1024), rows,
                           args.context, 2 * args.iters)
        static = decoding(engine_with_buckets(models[1], args.scheduler, rows, buckets), rows,
                          args.context, 2 * args.iters)
        a, b = interleaved_median_ms([dynamic.step, static.step], args.iters)
        print(f"{rows:>5} {a:>11.1f} {b:>11.1f} {a / b:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
