"""The float32 sgemm's weight prefetch spread against streaming, per weight shape and per step.

`runtime.sgemm_prefetch` picks the spread at startup with a short probe. This times the same
choice at any row count and for longer, so that a new machine's figures can be checked:

    python benchmarks/sgemm_spread.py --rows 8 16 24 32 --spread 32
    python benchmarks/sgemm_spread.py --rows 40 48 64 --spread 64 --step

Per shape: each weight shape of a SmolLM2-135M-shaped pass (the fused QKV, o, the gate-and-up
projection as the fused SwiGLU op, down), 30 distinct packed copies so that the weights come
from memory as in a pass, timed with every tile streaming (spread 0) and with the spread on,
interleaved round by round. With `--step`, also one compiled engine's decode step at each
row count (contexts 16-255 tokens; `--scheduler orca` for Orca's), its steps alternated
between the two settings. Figures above 1 mean spreading is faster. The outputs are the same
bits either way.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import decode_step
import torch
from decode_step import SMOLLM2_135M, interleaved_median_ms, make_engine, start_decoding

from runtime import sgemm_prefetch
from runtime.architectures import build_model
from runtime.attention_kernels import load_native_kernel

LAYERS = 30
SHAPES = {  # name -> (out features, in features) of SmolLM2-135M's decoder linears
    "qkv": (960, 576),
    "o": (576, 576),
    "swiglu": (3072, 576),
    "down": (576, 1536),
}


def shape_pass(name: str, weights: list[torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    """The 30 layers' GEMMs of one weight shape on `x`, as the engine's op runs them."""
    ops = torch.ops.baton_kernels
    out_features = SHAPES[name][0]
    if name == "swiglu":
        return lambda: [ops.sgemm_swiglu(x, w, out_features // 2) for w in weights]
    return lambda: [ops.sgemm_linear(x, w, out_features, None) for w in weights]


def packed_weights() -> dict[str, list[torch.Tensor]]:
    """`LAYERS` distinct packed weights of each shape (seed 0), so each comes from memory."""
    torch.manual_seed(0)
    return {name: [torch.ops.baton_kernels.sgemm_pack(torch.randn(n, k) * 0.02)
                   for _ in range(LAYERS)] for name, (n, k) in SHAPES.items()}


def per_shape(rows: list[int], spread: int, rounds: int) -> None:
    weights = packed_weights()
    print(f"speed spread up to {spread} rows / every tile streaming, {LAYERS} distinct weights "
          f"a shape, median of {rounds} interleaved rounds ({torch.get_num_threads()} threads)")
    print(f"{'rows':>5} " + " ".join(f"{name:>16}" for name in SHAPES))
    for count in rows:
        cells = []
        for name, (n, k) in SHAPES.items():
            run = shape_pass(name, weights[name], torch.randn(count, k))
            seconds: dict[int, list[float]] = {0: [], spread: []}
            for setting in seconds:  # warm-up
                sgemm_prefetch.set_spread_rows(setting)
                run()
            for _ in range(rounds):
                for setting, times in seconds.items():
                    sgemm_prefetch.set_spread_rows(setting)
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
            stream, spreading = (statistics.median(seconds[s]) for s in (0, spread))
            gflops = 2 * count * n * k * LAYERS / spreading / 1e9
            cells.append(f"{stream / spreading:5.2f}x {gflops:5.0f} GF/s")
        print(f"{count:>5} " + " ".join(f"{c:>16}" for c in cells), flush=True)


def stepped(engine, setting: int) -> Callable[[], None]:
    """One `engine.step()` with the sgemm's spread set to `setting` first."""
    def step() -> None:
        sgemm_prefetch.set_spread_rows(setting)
        engine.step()
    return step


def per_step(rows: list[int], spread: int, rounds: int, scheduler: str) -> None:
    decode_step.COMPILE = True  # its make_engine reads the flag
    model = build_model(SMOLLM2_135M).init_weights(0).to(torch.float32).eval()
    print(f"compiled {scheduler} decode step, streaming / spread up to {spread} rows, median of "
          f"{rounds} alternated steps")
    for count in rows:
        engine = start_decoding(make_engine(model, scheduler, count, "native", 1024),
                                [16 + (37 * i) % 240 for i in range(count)], 2 * rounds + 16)
        stream, spreading = interleaved_median_ms(
            [stepped(engine, 0), stepped(engine, spread)], rounds)
        print(f"{count:>5} rows: {stream:7.1f} ms streaming, {spreading:7.1f} ms spread, "
              f"{stream / spreading:5.3f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 24, 32])
    parser.add_argument("--spread", type=int, default=sgemm_prefetch.DEFAULT_SPREAD_ROWS,
                        help="spread up to this many rows against streaming")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per figure")
    parser.add_argument("--step", action="store_true", help="also time the decode step")
    parser.add_argument("--scheduler", default="baton", help="whose step --step times")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_native_kernel()
    previous = sgemm_prefetch.set_spread_rows(args.spread)
    try:
        per_shape(args.rows, args.spread, args.rounds)
        if args.step:
            per_step(args.rows, args.spread, 4 * args.rounds, args.scheduler)
    finally:
        sgemm_prefetch.set_spread_rows(previous)


if __name__ == "__main__":
    main()
