"""The float32 sgemm's work claimed by its threads against an even split of the panels.

From `sgemm_set_claim_rows` rows up (default 128) the threads of a native float32 GEMM claim
(row block, panel group) items from a shared counter instead of each taking half the panels,
so that a core slowed by the host's other tenants does not hold up the other at the end of
every GEMM. This times both at any row count, settings alternated round by round:

    python benchmarks/sgemm_claim.py --rows 64 128 256 1024 4096 --prompts 32

Per shape: each weight shape of a SmolLM2-135M-shaped pass (the fused QKV, o, the
gate-and-up projection as the fused SwiGLU op, down), 30 distinct packed copies as in a pass
(`sgemm_spread.py`'s harness). With `--prompts N`, also a compiled engine's packed prefill of
N prompts U(16, 256), one output token each. Each figure is the median over rounds of the
paired ratio (even split's time / claimed time): above 1 means claiming is faster. The
outputs are the same bits either way (tests/test_native_sgemm.py).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import decode_step
import torch
from sgemm_spread import LAYERS, SHAPES, shape_pass

from runtime.attention_kernels import load_native_kernel
from runtime.sampling_params import SamplingParams

SPLIT, CLAIM = 0, 1  # `sgemm_set_claim_rows` values: never claim, claim at every row count


def paired(run: Callable[[], None], rounds: int) -> tuple[float, float, list[float]]:
    """(median of split time / claimed time over rounds, median claimed seconds, the
    rounds' ratios sorted)."""
    ops = torch.ops.baton_kernels
    times: dict[int, list[float]] = {SPLIT: [], CLAIM: []}
    for setting in times:  # warm-up
        ops.sgemm_set_claim_rows(setting)
        run()
    for r in range(rounds):
        order = (SPLIT, CLAIM) if r % 2 == 0 else (CLAIM, SPLIT)  # ABBA: drift hits both
        for setting in order:
            ops.sgemm_set_claim_rows(setting)
            start = time.perf_counter()
            run()
            times[setting].append(time.perf_counter() - start)
    ratios = [s / c for s, c in zip(times[SPLIT], times[CLAIM], strict=True)]
    return statistics.median(ratios), statistics.median(times[CLAIM]), sorted(ratios)


def per_shape(rows: list[int], rounds: int) -> None:
    torch.manual_seed(0)
    weights = {name: [torch.ops.baton_kernels.sgemm_pack(torch.randn(n, k) * 0.02)
                      for _ in range(LAYERS)] for name, (n, k) in SHAPES.items()}
    print(f"speed claimed / even split, {LAYERS} distinct weights a shape, median paired ratio "
          f"of {rounds} rounds ({torch.get_num_threads()} threads)")
    print(f"{'rows':>5} " + " ".join(f"{name:>16}" for name in SHAPES))
    for count in rows:
        cells = []
        for name, (n, k) in SHAPES.items():
            ratio, claimed, _ = paired(shape_pass(name, weights[name], torch.randn(count, k)),
                                    rounds)
            cells.append(f"{ratio:5.3f}x {2 * count * n * k * LAYERS / claimed / 1e9:5.0f} GF/s")
        print(f"{count:>5} " + " ".join(f"{c:>16}" for c in cells), flush=True)


def prefill(prompts: int, rounds: int, scheduler: str) -> None:
    decode_step.COMPILE = True  # its make_engine reads the flag
    model = decode_step.build_model(decode_step.SMOLLM2_135M).init_weights(0)
    engine = decode_step.make_engine(model.to(torch.float32).eval(), scheduler, 64, "native",
                                     512)
    rng = random.Random(0)
    batch = [[rng.randrange(49152) for _ in range(rng.randint(16, 256))] for _ in range(prompts)]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ratio, claimed, ratios = paired(lambda: engine.generate(batch, params), rounds)
    print(f"compiled {scheduler} prefill of {prompts} prompts ({sum(map(len, batch))} tokens): "
          f"{ratio:5.3f}x claimed / even split (rounds {ratios[0]:.3f}-{ratios[-1]:.3f}), "
          f"{claimed:.3f} s claimed", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[64, 128, 256, 1024, 4096])
    parser.add_argument("--prompts", type=int, default=0, help="also an engine's prefill")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per figure")
    parser.add_argument("--scheduler", default="baton", help="whose engine --prompts runs")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_native_kernel()
    previous = torch.ops.baton_kernels.sgemm_set_claim_rows(SPLIT)
    try:
        if args.rows:
            per_shape(args.rows, args.rounds)
        if args.prompts:
            prefill(args.prompts, args.rounds, args.scheduler)
    finally:
        torch.ops.baton_kernels.sgemm_set_claim_rows(previous)


if __name__ == "__main__":
    main()
