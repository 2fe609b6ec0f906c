"""How the engine's float32 sgemm asks for its weights at decode sizes, measured at startup.

The sgemm (`kernels/packed_sgemm.cpp`) streams each weight block from memory in its first
tile over the block. Up to a row limit the later tiles also ask for their share of the next
block ("spread"); above it every tile streams. Up to another, the tiles take turns over
slices of 96 K rows of each block, so that the slice and what is asked for next fit in L1
together. Which is faster, and up to how many rows, is a property of the machine, not of the
code:
- on a 2-core Zen 4 (1 MiB of L2 a core) spreading ran a pass's linears 1.07-1.19x as fast
  at 8-16 rows, 1.03x at 32 and 0.87-0.95x at 64-256;
- on a 2-core Zen 3 (512 KiB) a BATON decode step ran 1.03-1.07x as fast at 8-32 rows and
  1.06-1.08x at 40-48 spread up to 64 rows, and, in slices, BATON's and Orca's 1.02-1.07x
  at 4-16 rows, 0.93-1.11x at 24-32 (the host's noise) and 0.93x at 64 (docs/benchmarks.md,
  thirty-seventh, fortieth and forty-first sessions).
So the engine asks the machine, as it times the GEMM kernels themselves
(`runtime.linear_kernels`), and keeps the fastest answer to each question. The outputs are
the same bits whatever the settings: only prefetch hints and the order of the tiles' turns
change, never an FMA chain.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.architectures.layers import FusedLinear, Linear, native_op, sample_by_shape

logger = logging.getLogger(__name__)

DEFAULT_SPREAD_ROWS = 32  # the kernel's own default (`kDefaultSpreadRows`)
WIDER_SPREAD_ROWS = 64
SLICE_ROWS = 16


@dataclass(frozen=True, slots=True)
class PrefetchSettings:
    """Row limits of the sgemm's prefetch habits (0: never); the kernel's defaults."""

    spread_rows: int = DEFAULT_SPREAD_ROWS  # later tiles ask for the next block up to these
    slice_rows: int = 0  # tiles take turns over slices of each block up to these

    def describe(self) -> str:
        def limit(rows: int) -> str:
            return f"up to {rows} rows" if rows else "never"
        return f"spread {limit(self.spread_rows)}, blocks sliced {limit(self.slice_rows)}"


DEFAULT = PrefetchSettings()


@dataclass(frozen=True, slots=True)
class Question:
    """Is the sgemm faster with the settings `changes` makes? Timed only at `rows`, where the
    two run different code (elsewhere timing them adds only noise)."""

    label: str
    changes: tuple[tuple[str, int], ...]
    rows: tuple[int, ...]

    def challenger(self, baseline: PrefetchSettings) -> PrefetchSettings:
        return dataclasses.replace(baseline, **dict(self.changes))


# Asked in turn, each answer the baseline of the next: spread up to 32 rows, or never? If
# spreading, up to 64 rows? Blocks sliced up to 16 rows, or walked whole? (On a Zen 3 the
# slices' gain was steady at 4-16 rows, and at 24-32 rows within the host's noise:
# 0.93-1.11x a step.)
NEVER_SPREAD = Question("never spread", (("spread_rows", 0),), (16, 32))
WIDER_SPREAD = Question(f"spread to {WIDER_SPREAD_ROWS}",
                        (("spread_rows", WIDER_SPREAD_ROWS),), (48, 64))
SLICED = Question(f"sliced to {SLICE_ROWS}", (("slice_rows", SLICE_ROWS),), (8, 16))

# The challenger replaces the baseline only when it measured at least `MARGIN` faster: on a
# busy 2-core Zen 3 two runs of the same setting read up to 9% apart at 48 rows, so a smaller
# lead is a coin toss.
MARGIN = 0.02
PROBE_ROUNDS = 7
PROBE_CALLS = 4  # linears timed per weight shape and round


@dataclass(frozen=True, slots=True)
class PrefetchChoice:
    """The settings the sgemm runs with, and the measurements behind them."""

    settings: PrefetchSettings
    reason: str


def apply(settings: PrefetchSettings) -> PrefetchSettings:
    """Sets the sgemm's prefetch settings for the calls that follow; returns those replaced."""
    old = torch.ops.baton_kernels.sgemm_set_prefetch(settings.spread_rows, settings.slice_rows)
    return PrefetchSettings(*(int(v) for v in old))


def _sample(model: nn.Module) -> list[tuple[list[Linear], int]]:
    """Up to `PROBE_CALLS` natively packed float32 linears per shape, with how many of that
    shape a pass runs (`sample_by_shape`, as the kernel probe samples a pass)."""
    return sample_by_shape((m for m in model.modules() if isinstance(m, Linear)
                            and m.packed_by == "native" and m.packed.dtype == torch.float32),
                           PROBE_CALLS)


def _runs_swiglu(m: Linear) -> bool:
    """A gate-and-up projection: the pass runs it as the fused SwiGLU op."""
    return isinstance(m, FusedLinear) and len(m.output_sizes) == 2 and m.fuses_swiglu(F.silu)


def _call(m: Linear) -> Callable[[torch.Tensor], object]:
    """The op a pass runs for `m`: the fused SwiGLU for a gate-and-up projection."""
    if _runs_swiglu(m):
        op = native_op(m.packed, "swiglu")
        return lambda x: op(x, m.packed, m.out_features // 2)
    return m


@torch.inference_mode()
def measure(model: nn.Module, candidates: tuple[PrefetchSettings, ...], rows: tuple[int, ...],
            rounds: int = PROBE_ROUNDS) -> dict[PrefetchSettings, float]:
    """Each candidate's estimated pass time over the first candidate's: below 1 is faster.

    At each row count of `rows`, interleaved rounds time a sample of the pass's linears under
    each setting; the result is the geometric mean over row counts of the median of each
    round's ratio (paired in the round, so that a slow minute of a busy host hits both
    sides of a ratio alike).
    """
    sample = _sample(model)
    log_ratio = dict.fromkeys(candidates, 0.0)
    previous = apply(candidates[0])
    try:
        for n_rows in rows:
            calls = [([_call(m) for m in group], count, torch.randn(n_rows, group[0].in_features))
                     for group, count in sample]

            def pass_seconds(calls=calls) -> float:
                total = 0.0
                for ops, count, x in calls:
                    start = time.perf_counter()
                    for op in ops:
                        op(x)
                    total += (time.perf_counter() - start) * count / len(ops)
                return total

            seconds: dict[PrefetchSettings, list[float]] = {c: [] for c in candidates}
            for settings in candidates:  # warm-up
                apply(settings)
                pass_seconds()
            for _ in range(rounds):
                for settings in candidates:
                    apply(settings)
                    seconds[settings].append(pass_seconds())
            base = seconds[candidates[0]]
            for settings in candidates:
                log_ratio[settings] += math.log(statistics.median(
                    t / b for t, b in zip(seconds[settings], base, strict=True)))
    finally:
        apply(previous)
    return {c: math.exp(total / len(rows)) for c, total in log_ratio.items()}


_CACHE: dict[tuple, float] = {}


def _challenger_ratio(model: nn.Module, sample: list[tuple[list[Linear], int]],
                      question: Question, baseline: PrefetchSettings) -> float:
    """The challenger's time over the baseline's, measured once per process, thread count,
    model shape, question and baseline."""
    key = (torch.get_num_threads(), tuple(sorted(
        (tuple(group[0].packed.shape), count) for group, count in sample)), question, baseline)
    if key not in _CACHE:
        challenger = question.challenger(baseline)
        _CACHE[key] = measure(model, (baseline, challenger), question.rows)[challenger]
    return _CACHE[key]


def tune(model: nn.Module) -> PrefetchChoice | None:
    """Measure and set the fastest prefetch settings for `model`'s natively packed float32
    linears; None when it has none."""
    sample = _sample(model)
    if not sample:
        return None
    readings = []

    def ask(question: Question, settings: PrefetchSettings) -> PrefetchSettings:
        ratio = _challenger_ratio(model, sample, question, settings)
        readings.append(f"{question.label} {ratio:.2f} at "
                        f"{' and '.join(str(r) for r in question.rows)} rows")
        return question.challenger(settings) if ratio < 1.0 - MARGIN else settings

    settings = ask(NEVER_SPREAD, DEFAULT)
    if settings.spread_rows:
        settings = ask(WIDER_SPREAD, settings)
    settings = ask(SLICED, settings)
    apply(settings)
    reason = "probe, time against the baseline: " + ", ".join(readings)
    logger.info("sgemm weight prefetch: %s (%s)", settings.describe(), reason)
    return PrefetchChoice(settings, reason)
