"""Length buckets: a few dense sub-batches of the BATON cache, each with its own column window.

One dense window over every row pads each row to the longest one: on Orca's trace (prompts
U(32, 512)) about half the attention pairs of a decode step were padding. Rows of similar
length share a bucket instead; every bucket is still a dense, right-aligned, left-padded batch
(vector shaping within the bucket) and one SDPA call per layer. Rows in a bucket grow in
lockstep, so a bucket's padding is fixed when a row joins it (and falls when a row leaves and
the window is trimmed): the placement rule below is what bounds it.

Buckets occupy consecutive row ranges of one buffer, in bucket order, so a bucket's rows are
one strided view of the cache (no gather) and the decode pass's rows come out in row order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from runtime.api import Request


@dataclass(slots=True)
class Bucket:
    """Rows `[first, first + n)` of the buffer and their column window `[start, end)`.

    Row `first + i` holds `rows[i]`, whose real keys are its last `lengths[i]` columns.
    """

    first: int = 0
    start: int = 0
    end: int = 0
    rows: list[Request] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def stop(self) -> int:
        """One past the bucket's last row."""
        return self.first + len(self.rows)

    def padding(self) -> int:
        """Pad slots of the window: `B x W - sum(lengths)`."""
        return self.num_rows * self.width - sum(self.lengths)


def added_padding(bucket: Bucket, length: int) -> int:
    """Pad slots a row of `length` keys adds by joining `bucket` (vector shaping).

    Shorter than the window: the newcomer is padded itself. Longer: every row is padded by
    the difference (the window widens on the left).
    """
    if length <= bucket.width:
        return bucket.width - length
    return bucket.num_rows * (length - bucket.width)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a newcomer goes: an existing bucket's index, or a new bucket (`index == -1`)."""

    index: int
    added_padding: int


NEW_BUCKET = -1


def choose_bucket(buckets: Sequence[Bucket], length: int, max_buckets: int,
                  pad_tolerance: float) -> Placement:
    """The bucket a newcomer of `length` keys pads least; a new one when that pads too much.

    Join the cheapest bucket when the pad it adds is at most `pad_tolerance` times the real
    keys the bucket holds with the newcomer (so every join keeps the bucket's idle share near
    the tolerance); else open a bucket (one more attention call per layer) if fewer than
    `max_buckets` exist; else join the cheapest anyway. `max_buckets=1` is the paper's single
    dense batch.
    """
    if not buckets:
        return Placement(NEW_BUCKET, 0)
    costs = [added_padding(b, length) for b in buckets]
    best = min(range(len(buckets)), key=lambda i: (costs[i], -buckets[i].num_rows))
    real_after = sum(buckets[best].lengths) + length
    if costs[best] <= pad_tolerance * real_after or len(buckets) >= max_buckets:
        return Placement(best, costs[best])
    return Placement(NEW_BUCKET, 0)
