"""How the fused variant splits the decode rows into padded groups: padding versus calls.

One padded call pads every row to the longest context; with contexts spread over U(32, 314)
almost half the gathered and scored keys are padding. Rows sorted by length and cut into a
few contiguous groups, each padded to its own longest row, remove most of it for one extra
SDPA call per group and layer. The cut minimises `sum(rows x width) + overhead x groups`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GROUP_OVERHEAD_KEYS = 512
"""The cost of one more call per layer, in padded (row, key) pairs (measured, docs/orca.md)."""


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Decode rows `[first, first + rows)` of the pass, their keys padded to `width`."""

    first: int
    rows: int
    width: int

    @property
    def num_keys(self) -> int:
        return self.rows * self.width


def plan_groups(
    lengths: Sequence[int], overhead: int = GROUP_OVERHEAD_KEYS
) -> tuple[DecodeGroup, ...]:
    """Optimal contiguous groups of ascending `lengths` (dynamic programming, O(n^2))."""
    n = len(lengths)
    if any(a > b for a, b in zip(lengths, lengths[1:], strict=False)):
        raise ValueError("lengths must be sorted ascending")
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j rows
    cut = [0] * (n + 1)  # cut[j]: where the last group of the first j rows starts
    for j in range(1, n + 1):
        width = lengths[j - 1]
        for i in range(j):  # last group: rows [i, j), padded to width
            cost = best[i] + (j - i) * width + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[DecodeGroup] = []
    j = n
    while j:
        groups.append(DecodeGroup(cut[j], j - cut[j], lengths[j - 1]))
        j = cut[j]
    return tuple(reversed(groups))
