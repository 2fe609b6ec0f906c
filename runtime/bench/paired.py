"""Paired ratios: each contender against the baseline repeat by repeat, with a 95% interval.

Why: the ratio table divides medians, which hides how much a ratio moved between repeats. On a
shared 2-core host single figures move by up to 30% from run to run, so "1.08x" can be a lead
or noise. The bench runs every contender once per repeat, in a rotated order, close together
in time, so the contender's run and the baseline's run of one repeat share the host's mood:
their ratio is a paired sample. Over n >= 3 repeats the geometric mean of those ratios gets a
95% confidence interval from Student's t on the log-ratios, and a verdict: ahead or behind
when the interval excludes 1, otherwise within noise. Two repeats give the range only (a
t interval with one degree of freedom spans more than 12 standard errors).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.bench.report import RATIO_ROWS

# The headline metrics compared repeat by repeat; label and direction as the ratio table's.
PAIRED_KEYS = ("output_throughput", "mean_ttft_ms", "mean_tpot_ms")
PAIRED_ROWS = tuple(row for key in PAIRED_KEYS for row in RATIO_ROWS if row[0] == key)
# Student's t, two-sided 95%, for 1-30 degrees of freedom; beyond 30 the value at 30 is used,
# which makes the interval at most 4% wider than the exact one.
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
MIN_REPEATS_FOR_INTERVAL = 3


@dataclass(frozen=True, slots=True)
class PairedRatio:
    """A contender's metric over the baseline's, repeat by repeat."""

    ratios: tuple[float, ...]  # the repeats where both values were positive and finite
    higher_is_better: bool

    @property
    def geomean(self) -> float:
        return math.exp(sum(map(math.log, self.ratios)) / len(self.ratios))

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% confidence interval of the geometric mean; None under three repeats."""
        n = len(self.ratios)
        if n < MIN_REPEATS_FOR_INTERVAL:
            return None
        logs = [math.log(r) for r in self.ratios]
        mean = sum(logs) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
        half = T_975[min(n - 1, len(T_975)) - 1] * sd / math.sqrt(n)
        return math.exp(mean - half), math.exp(mean + half)

    @property
    def verdict(self) -> str:
        """`ahead` or `behind` when the interval excludes 1, `within noise` when it holds 1,
        `n/a` with no interval."""
        interval = self.interval
        if interval is None:
            return "n/a"
        low, high = interval
        if low > 1.0 or high < 1.0:
            better = low > 1.0 if self.higher_is_better else high < 1.0
            return "ahead" if better else "behind"
        return "within noise"

    def as_json(self) -> dict[str, Any]:
        interval = self.interval
        return {
            "ratios": list(self.ratios),
            "geomean": self.geomean,
            "ci95": list(interval) if interval else None,
            "verdict": self.verdict,
        }


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def paired_ratios(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], baseline: str
) -> dict[str, dict[str, PairedRatio]]:
    """Per contender other than `baseline`, per headline metric: the repeat-by-repeat ratios.

    `runs[label][i]` is repeat i of `label` (the bench runs every contender once per repeat
    and drops a contender that fails, so the lists line up). A repeat where either value is
    missing, zero or not finite (a run whose requests all failed) is left out of that metric.
    Empty when the baseline did not run or ran only once.
    """
    base = runs.get(baseline, ())
    if len(base) < 2:
        return {}
    out: dict[str, dict[str, PairedRatio]] = {}
    for label, reps in runs.items():
        if label == baseline or len(reps) != len(base):
            continue
        rows = {}
        for key, _, higher in PAIRED_ROWS:
            ratios = []
            for mine, theirs in zip(reps, base, strict=True):
                a, b = _positive(mine.get(key)), _positive(theirs.get(key))
                if a is not None and b is not None:
                    ratios.append(a / b)
            if ratios:
                rows[key] = PairedRatio(tuple(ratios), higher)
        if rows:
            out[label] = rows
    return out


def format_paired(paired: Mapping[str, Mapping[str, PairedRatio]], baseline: str) -> str:
    """The paired ratios as text: one line per contender and metric."""
    if not paired:
        return ""
    repeats = max(len(r.ratios) for rows in paired.values() for r in rows.values())
    width = max(10, *(len(label) + 2 for label in paired))
    head = (f"{'contender':<{width}}{'metric':<26}{'better':>8}{'geo-mean':>10}"
            f"{'per repeat':>17}{'95% CI':>17}  verdict")
    title = f" Paired ratios vs {baseline} ({repeats} repeats) "
    lines = [f"{title:=^{len(head)}}", head]
    labels = {key: (label, higher) for key, label, higher in PAIRED_ROWS}
    for contender, rows in paired.items():
        for key, ratio in rows.items():
            label, higher = labels[key]
            spread = f"{min(ratio.ratios):.2f}x-{max(ratio.ratios):.2f}x"
            interval = ratio.interval
            ci = f"{interval[0]:.2f}x-{interval[1]:.2f}x" if interval else "n/a"
            lines.append(
                f"{contender:<{width}}{label:<26}{'higher' if higher else 'lower':>8}"
                f"{ratio.geomean:>9.2f}x{spread:>17}{ci:>17}  {ratio.verdict}"
            )
    lines.append("=" * len(head))
    if repeats < MIN_REPEATS_FOR_INTERVAL:
        lines.append(f"(an interval needs {MIN_REPEATS_FOR_INTERVAL} or more repeats: "
                     "--repeats 3 or more)")
    return "\n".join(lines)


# What must be equal for repeats of several runs to be pooled: the same requests (workload),
# model, dtype and mode, and in `bench serve --servers` the same server commands.
SAME_RUN_KEYS = ("mode", "model", "dtype", "workload", "servers")


def pool_runs(paths: Sequence[Path]) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """The repeats of several earlier runs of one comparison (their `results.json`, or the
    folders holding them), appended in the order given, for the contenders every file has;
    and the first file's header. A file that is missing, is not a bench result, or differs
    from the first in one of `SAME_RUN_KEYS` is an error naming the file and the key."""
    pooled: dict[str, list[dict]] = {}
    first: dict[str, Any] | None = None
    for given in paths:
        path = given / "results.json" if given.is_dir() else given
        try:
            data = json.loads(path.read_text())
            runs = dict(data["runs"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a `runtime bench` results.json ({exc})") from None
        if first is None:
            first = data
            pooled = {label: list(reps) for label, reps in runs.items()}
            continue
        for key in SAME_RUN_KEYS:
            if data.get(key) != first.get(key):
                raise ValueError(f"{path}: its {key} differs from {paths[0]}'s; only repeats "
                                 "of one comparison can be pooled")
        for label in list(pooled):  # a contender missing from one file drops out
            if label in runs:
                pooled[label].extend(runs[label])
            else:
                del pooled[label]
    if first is None:
        raise ValueError("no results to pool")
    return pooled, first
