"""How the engine's float32 sgemm asks for its weights at decode sizes, measured at startup.

The sgemm (`kernels/packed_sgemm.cpp`) streams each weight block from memory in its first
tile over the block. Up to `spread_rows` rows of x, the later tiles also ask for their share
of the next block into L2 ("spread"); above it every tile streams. Which is faster is a
property of the machine, not of the code: on a 2-core Zen 4 (1 MiB of L2 a core) spreading
ran a pass's linears 1.07-1.19x as fast at 8-16 rows and 1.03x at 32; on a 2-core Zen 3
(512 KiB) it ran them at 0.92x at 16 rows and 0.82-0.88x at 24-32 (docs/benchmarks.md,
thirty-seventh session). So the engine times both at startup, as it times the GEMM kernels
themselves (`runtime.linear_kernels`), and keeps the faster. The outputs are the same bits
either way: only prefetch hints change, never the arithmetic or its order.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.architectures.layers import FusedLinear, Linear, native_op, sample_by_shape

logger = logging.getLogger(__name__)

DEFAULT_SPREAD_ROWS = 32  # the kernel's own default (`kDefaultSpreadRows`)
CANDIDATES = (DEFAULT_SPREAD_ROWS, 0)  # spread up to 32 rows, or never
PROBE_ROWS = (16, 32)  # where the two differ; above 32 rows both stream
PROBE_ROUNDS = 5
PROBE_CALLS = 4  # linears timed per weight shape and round


@dataclass(frozen=True, slots=True)
class SpreadChoice:
    """The spread the sgemm runs with, and the measurement behind it."""

    spread_rows: int
    reason: str


def set_spread_rows(rows: int) -> int:
    """Sets the sgemm's spread for the calls that follow; returns the value it replaces."""
    return int(torch.ops.baton_kernels.sgemm_set_spread_rows(rows))


def _sample(model: nn.Module) -> list[tuple[list[Linear], int]]:
    """Up to `PROBE_CALLS` natively packed float32 linears per shape, with how many of that
    shape a pass runs (`sample_by_shape`, as the kernel probe samples a pass)."""
    return sample_by_shape((m for m in model.modules() if isinstance(m, Linear)
                            and m.packed_by == "native" and m.packed.dtype == torch.float32),
                           PROBE_CALLS)


def _runs_swiglu(m: Linear) -> bool:
    """A gate-and-up projection: the pass runs it as the fused SwiGLU op."""
    return isinstance(m, FusedLinear) and len(m.output_sizes) == 2 and m.fuses_swiglu(F.silu)


@torch.inference_mode()
def measure(model: nn.Module, rounds: int = PROBE_ROUNDS) -> dict[int, float]:
    """Each candidate's estimated pass time over the default's: below 1 is faster.

    At each of `PROBE_ROWS`, interleaved rounds time a sample of the pass's linears under each
    setting (a burst of background load hits both alike); the result is the geometric mean
    over row counts of the median times' ratio.
    """
    sample = _sample(model)
    log_ratio = dict.fromkeys(CANDIDATES, 0.0)
    previous = set_spread_rows(DEFAULT_SPREAD_ROWS)
    try:
        for rows in PROBE_ROWS:
            xs = [torch.randn(rows, group[0].in_features) for group, _ in sample]

            def pass_seconds(xs=xs) -> float:
                total = 0.0
                for x, (group, count) in zip(xs, sample, strict=True):
                    start = time.perf_counter()
                    for m in group:
                        if _runs_swiglu(m):
                            native_op(m.packed, "swiglu")(x, m.packed, m.out_features // 2)
                        else:
                            m(x)
                    total += (time.perf_counter() - start) * count / len(group)
                return total

            seconds: dict[int, list[float]] = {c: [] for c in CANDIDATES}
            for spread in CANDIDATES:  # warm-up
                set_spread_rows(spread)
                pass_seconds()
            for _ in range(rounds):
                for spread in CANDIDATES:
                    set_spread_rows(spread)
                    seconds[spread].append(pass_seconds())
            base = statistics.median(seconds[DEFAULT_SPREAD_ROWS])
            for spread in CANDIDATES:
                log_ratio[spread] += math.log(statistics.median(seconds[spread]) / base)
    finally:
        set_spread_rows(previous)
    return {c: math.exp(total / len(PROBE_ROWS)) for c, total in log_ratio.items()}


_CACHE: dict[tuple, dict[int, float]] = {}


def tune(model: nn.Module) -> SpreadChoice | None:
    """Measure (once per process, thread count and model shape) and set the faster spread
    for `model`'s natively packed float32 linears; None when it has none."""
    sample = _sample(model)
    if not sample:
        return None
    key = (torch.get_num_threads(), tuple(sorted(
        (tuple(group[0].packed.shape), count) for group, count in sample)))
    if key not in _CACHE:
        _CACHE[key] = measure(model)
    ratios = _CACHE[key]
    best = min(CANDIDATES, key=lambda c: (ratios[c], c != DEFAULT_SPREAD_ROWS))
    set_spread_rows(best)
    described = ", ".join(f"{'never' if c == 0 else f'up to {c} rows'} {ratios[c]:.2f}"
                          for c in CANDIDATES)
    choice = SpreadChoice(best, f"probe, pass time against spreading up to "
                                f"{DEFAULT_SPREAD_ROWS} rows: {described}")
    logger.info("sgemm weight prefetch: %s (%s)",
                "spread" if best else "every tile streams", choice.reason)
    return choice
