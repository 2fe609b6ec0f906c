"""How the engine's float32 sgemm asks for its weights at decode sizes, measured at startup.

The sgemm (`kernels/packed_sgemm.cpp`) streams each weight block from memory in its first
tile over the block. Up to `spread_rows` rows of x, the later tiles also ask for their share
of the next block into L2 ("spread"); above it every tile streams. Which is faster, and up
to how many rows, is a property of the machine, not of the code: on a 2-core Zen 4 (1 MiB of
L2 a core) spreading ran a pass's linears 1.07-1.19x as fast at 8-16 rows, 1.03x at 32 and
0.87-0.95x at 64-256; on a 2-core Zen 3 (512 KiB) a BATON decode step ran 1.03-1.07x as fast
at 8-32 rows and 1.06-1.08x at 40-48 spread up to 64 rows (docs/benchmarks.md, thirty-seventh
and fortieth sessions). So the engine times spreading up to 32 rows, up to 64 and never at
startup, as it times the GEMM kernels themselves (`runtime.linear_kernels`), and keeps the
fastest. The outputs are the same bits either way: only prefetch hints change, never the
arithmetic or its order.
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
WIDER_SPREAD_ROWS = 64
# Two questions, each timed only at row counts where its answers differ (elsewhere the two
# settings run the same code, and timing them adds only noise): spread up to 32 rows or never;
# then, if spreading, up to 64 rows or only up to 32. Candidates, then the rows they are timed
# at; the first candidate is the baseline, and the other replaces it only when it measured
# at least `MARGIN` faster: on a busy 2-core Zen 3 two runs of the same setting read up to 9%
# apart at 48 rows, so a smaller lead is a coin toss.
SPREAD_PROBE = ((DEFAULT_SPREAD_ROWS, 0), (16, 32))
WIDER_PROBE = ((DEFAULT_SPREAD_ROWS, WIDER_SPREAD_ROWS), (48, 64))
MARGIN = 0.02
PROBE_ROUNDS = 7
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
def measure(model: nn.Module, candidates: tuple[int, ...], rows: tuple[int, ...],
            rounds: int = PROBE_ROUNDS) -> dict[int, float]:
    """Each candidate's estimated pass time over the first candidate's: below 1 is faster.

    At each row count of `rows`, interleaved rounds time a sample of the pass's linears under
    each setting (a burst of background load hits all alike); the result is the geometric
    mean over row counts of the median times' ratio.
    """
    sample = _sample(model)
    log_ratio = dict.fromkeys(candidates, 0.0)
    previous = set_spread_rows(candidates[0])
    try:
        for n_rows in rows:
            xs = [torch.randn(n_rows, group[0].in_features) for group, _ in sample]

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

            seconds: dict[int, list[float]] = {c: [] for c in candidates}
            for spread in candidates:  # warm-up
                set_spread_rows(spread)
                pass_seconds()
            for _ in range(rounds):
                for spread in candidates:
                    set_spread_rows(spread)
                    seconds[spread].append(pass_seconds())
            base = statistics.median(seconds[candidates[0]])
            for spread in candidates:
                log_ratio[spread] += math.log(statistics.median(seconds[spread]) / base)
    finally:
        set_spread_rows(previous)
    return {c: math.exp(total / len(rows)) for c, total in log_ratio.items()}


_CACHE: dict[tuple, dict[int, float]] = {}


def _measured(model: nn.Module, sample: list[tuple[list[Linear], int]],
              probe: tuple[tuple[int, ...], tuple[int, ...]]) -> dict[int, float]:
    """`measure` of `probe`, once per process, thread count, model shape and probe."""
    key = (torch.get_num_threads(), tuple(sorted(
        (tuple(group[0].packed.shape), count) for group, count in sample)), probe)
    if key not in _CACHE:
        _CACHE[key] = measure(model, *probe)
    return _CACHE[key]


def tune(model: nn.Module) -> SpreadChoice | None:
    """Measure and set the fastest spread for `model`'s natively packed float32 linears;
    None when it has none."""
    sample = _sample(model)
    if not sample:
        return None
    ratios = _measured(model, sample, SPREAD_PROBE)
    best = 0 if ratios[0] < 1.0 - MARGIN else DEFAULT_SPREAD_ROWS
    reason = (f"probe, pass time against spreading up to {DEFAULT_SPREAD_ROWS} rows: never "
              f"{ratios[0]:.2f} at {_rows(SPREAD_PROBE)} rows")
    if best:
        wider = _measured(model, sample, WIDER_PROBE)
        if wider[WIDER_SPREAD_ROWS] < 1.0 - MARGIN:
            best = WIDER_SPREAD_ROWS
        reason += (f", up to {WIDER_SPREAD_ROWS} rows {wider[WIDER_SPREAD_ROWS]:.2f} at "
                   f"{_rows(WIDER_PROBE)} rows")
    set_spread_rows(best)
    logger.info("sgemm weight prefetch: %s (%s)",
                f"spread up to {best} rows" if best else "every tile streams", reason)
    return SpreadChoice(best, reason)


def _rows(probe: tuple[tuple[int, ...], tuple[int, ...]]) -> str:
    return " and ".join(str(r) for r in probe[1])
