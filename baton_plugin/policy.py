"""BATON's admission policy as pure functions: each row's extent and the padded footprint.

Kept apart from the tensors so each rule can be read, documented and tested on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.api import Request, kv_reservation


def row_extent(request: Request, max_model_len: int) -> tuple[int, int]:
    """(cached keys once prefilled, further keys it may append) for one request.

    A request of prompt P and max_tokens M caches at most `min(P + M, max_model_len) - 1`
    keys: the last sampled token is never fed back. A running row has `num_computed_tokens`
    keys cached; a request not yet prefilled will cache all its tokens in its prefill.
    """
    cached = request.num_computed_tokens or request.num_tokens
    final = kv_reservation(request, max_model_len) - 1
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
