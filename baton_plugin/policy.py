"""BATON's policies as pure functions: admission footprint, prefill grouping, buffer growth.

Kept apart from the tensors so each rule can be read, documented and tested on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runtime.request import Request


def row_extent(request: Request, max_model_len: int) -> tuple[int, int]:
    """(cached keys once prefilled, further keys it may append) for one request.

    A request of prompt P and max_tokens M caches at most `min(P + M, max_model_len) - 1`
    keys: the last sampled token is never fed back. A running row has `num_computed_tokens`
    keys cached; a request not yet prefilled will cache all its tokens in its prefill.
    """
    cached = request.num_computed_tokens or request.num_tokens
    final = min(request.max_total_tokens, max_model_len) - 1
    return cached, max(final - cached, 0)


def peak_padded_footprint(rows: Sequence[tuple[int, int]]) -> int:
    """Largest `B x S` the batch can reach if every row runs to its limit (worst case).

    Rows are right-aligned and all-padding columns are trimmed, so after t more decode steps
    the window is `max(len + t)` over rows still alive, and a row `(len, remaining)` is alive
    while `t <= remaining`. Between two departures the footprint only grows, so the peak is at
    some row's last step: sort by remaining, descending, and evaluate each prefix.
    """
    peak = longest = 0
    for count, (length, remaining) in enumerate(sorted(rows, key=lambda r: -r[1]), start=1):
        longest = max(longest, length)
        peak = max(peak, count * (longest + remaining))
    return peak


def plan_prefill_groups(lengths: Sequence[int], tolerance: float) -> list[list[int]]:
    """Indices of newly admitted prompts grouped into left-padded prefill passes.

    Sorted by length; a prompt joins the current group while the group's padded slots stay
    within `(1 + tolerance)` times its real tokens. `tolerance=0` groups equal lengths only;
    a large tolerance prefills everything admitted in one step together.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        n = lengths[i]
        if current and (len(current) + 1) * n > (1 + tolerance) * (total + n):
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the batch window goes after a relayout: buffer shape and the window's new end."""

    rows: int
    columns: int
    end: int
    reallocate: bool


MIN_SPARE_COLUMNS = 32


def plan_placement(
    rows: int, width: int, right: int, cap_rows: int, cap_cols: int, max_rows: int
) -> Placement:
    """Buffer size and window position when the window does not fit where it is.

    The window needs `width` columns ending at `end` plus `right` free columns after it. A
    shift copies the window (`B x W` slots) and buys one decode step per spare column on the
    right, so shift in place only while at least a third of the buffer and `MIN_SPARE_COLUMNS`
    are spare: the copies then stay within a few percent of what attention reads. Otherwise
    grow to `1.5 x need + MIN_SPARE_COLUMNS` columns, rows doubling (from 4) up to `max_rows`.
    An eighth of the spare goes to the left (for longer newcomers), the rest to the right
    (every decode step appends one column).
    """
    need = width + right
    spare = cap_cols - need
    grow = rows > cap_rows or 3 * spare < cap_cols or spare < MIN_SPARE_COLUMNS
    if grow:
        cap_rows = max(rows, min(max_rows, max(2 * cap_rows, 4)))
        cap_cols = max(cap_cols, need + need // 2 + MIN_SPARE_COLUMNS)
        spare = cap_cols - need
    return Placement(cap_rows, cap_cols, spare // 8 + width, grow)
