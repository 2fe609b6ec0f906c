"""How the float32 sgemm's threads share a GEMM: claimed items and speed-sized ranges, A/B.

The two cores of a shared host slow down independently, and with even shares every GEMM waits
for the slower one. So the engine's native float32 sgemm (`runtime/kernels/packed_sgemm.cpp`)
- from `sgemm_set_claim_rows` rows up (default 192, prefill sizes) has its threads claim
  (row block, panel group) items from a shared counter (`claim`);
- below that (decode sizes) gives each thread one contiguous range of panels sized by the
  speed its thread showed in the GEMMs before (`sgemm_set_balance`, on by default: `balance`).
This times each against the even split, the settings alternated round by round (ABBA):

    python benchmarks/sgemm_threads.py claim --rows 192 256 1024 4096 --prompts 32
    python benchmarks/sgemm_threads.py balance --rows 1 8 32 64 --steps 8 32 64

Per shape: each weight shape of a SmolLM2-135M-shaped pass (the fused QKV, o, the gate-and-up
projection as the fused SwiGLU op, down), 30 distinct packed copies as in a pass
(`sgemm_spread.py`'s harness). `--prompts N` (claim): also a compiled engine's packed prefill
of N prompts U(16, 256), one output token each. `--steps R...` (balance): also a compiled
engine's decode step at each row count, contexts 16-255 tokens. Each figure is the median over
rounds of the paired ratio (even split's time / the other's): above 1 means the even split is
slower. The outputs are the same bits either way (tests/test_sgemm_threads.py).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import decode_step
import torch
from decode_step import SMOLLM2_135M, build_model, make_engine, start_decoding
from sgemm_spread import LAYERS, SHAPES, packed_weights, shape_pass

from runtime.attention_kernels import load_native_kernel
from runtime.sampling_params import SamplingParams


def setter(mode: str) -> Callable[[bool], object]:
    """Turns `mode` on (True) or off (False, the even split)."""
    ops = torch.ops.baton_kernels
    if mode == "claim":
        return lambda on: ops.sgemm_set_claim_rows(1 if on else 0)
    return lambda on: ops.sgemm_set_balance(on)


def paired(run: Callable[[], None], turn: Callable[[bool], object],
           rounds: int) -> tuple[float, float, list[float]]:
    """(median over rounds of even-split time / the mode's time, the mode's median seconds,
    the rounds' ratios sorted)."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for on in times:  # warm-up
        turn(on)
        run()
    for r in range(rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):  # ABBA: drift hits both
            turn(on)
            start = time.perf_counter()
            run()
            times[on].append(time.perf_counter() - start)
    ratios = [even / mode for even, mode in zip(times[False], times[True], strict=True)]
    return statistics.median(ratios), statistics.median(times[True]), sorted(ratios)


def per_shape(mode: str, rows: list[int], rounds: int) -> None:
    weights = packed_weights()
    print(f"speed {mode} / even split, {LAYERS} distinct weights a shape, median paired ratio "
          f"of {rounds} rounds ({torch.get_num_threads()} threads)")
    print(f"{'rows':>5} " + " ".join(f"{name:>16}" for name in SHAPES))
    for count in rows:
        cells = []
        for name, (n, k) in SHAPES.items():
            ratio, seconds, _ = paired(shape_pass(name, weights[name], torch.randn(count, k)),
                                       setter(mode), rounds)
            cells.append(f"{ratio:5.3f}x {2 * count * n * k * LAYERS / seconds / 1e9:5.0f} GF/s")
        print(f"{count:>5} " + " ".join(f"{c:>16}" for c in cells), flush=True)


def prefill(prompts: int, rounds: int, scheduler: str) -> None:
    model = build_model(SMOLLM2_135M).init_weights(0).to(torch.float32).eval()
    engine = make_engine(model, scheduler, 64, "native", 512)
    rng = random.Random(0)
    batch = [[rng.randrange(49152) for _ in range(rng.randint(16, 256))] for _ in range(prompts)]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ratio, seconds, ratios = paired(lambda: engine.generate(batch, params), setter("claim"),
                                    rounds)
    print(f"compiled {scheduler} prefill of {prompts} prompts ({sum(map(len, batch))} tokens): "
          f"{ratio:5.3f}x claimed / even split (rounds {ratios[0]:.3f}-{ratios[-1]:.3f}), "
          f"{seconds:.3f} s claimed", flush=True)


def steps(rows: list[int], rounds: int, scheduler: str) -> None:
    model = build_model(SMOLLM2_135M).init_weights(0).to(torch.float32).eval()
    print(f"compiled {scheduler} decode step, even split / speed-sized ranges, median paired "
          f"ratio of {rounds} steps each")
    for count in rows:
        engine = start_decoding(make_engine(model, scheduler, count, "native", 1024),
                                [16 + (37 * i) % 240 for i in range(count)], 2 * rounds + 16)
        ratio, seconds, ratios = paired(engine.step, setter("balance"), rounds)
        shares = " ".join(f"{s:.2f}" for s in torch.ops.baton_kernels.sgemm_thread_shares())
        print(f"{count:>5} rows: {ratio:5.3f}x (rounds {ratios[0]:.3f}-{ratios[-1]:.3f}), "
              f"{1000 * seconds:7.1f} ms balanced, threads' shares now {shares}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["claim", "balance"])
    parser.add_argument("--rows", type=int, nargs="*", default=None,
                        help="per-shape row counts (default: 192 256 1024 4096 for claim, "
                             "1 8 32 64 for balance)")
    parser.add_argument("--prompts", type=int, default=0, help="claim: also an engine's prefill")
    parser.add_argument("--steps", type=int, nargs="*", default=[],
                        help="balance: also an engine's decode step at these row counts")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per figure")
    parser.add_argument("--scheduler", default="baton", help="whose engine runs")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    decode_step.COMPILE = True  # its make_engine reads the flag
    load_native_kernel()
    ops = torch.ops.baton_kernels
    # The other setting stays as the engine has it.
    claim_rows, balance = ops.sgemm_set_claim_rows(0), ops.sgemm_set_balance(False)
    ops.sgemm_set_claim_rows(claim_rows)
    ops.sgemm_set_balance(balance)
    rows = args.rows if args.rows is not None else (
        [192, 256, 1024, 4096] if args.mode == "claim" else [1, 8, 32, 64])
    try:
        if rows:
            per_shape(args.mode, rows, args.rounds)
        if args.mode == "claim" and args.prompts:
            prefill(args.prompts, args.rounds, args.scheduler)
        if args.mode == "balance" and args.steps:
            steps(args.steps, args.rounds, args.scheduler)
    finally:
        ops.sgemm_set_claim_rows(claim_rows)
        ops.sgemm_set_balance(balance)


if __name__ == "__main__":
    main()
