"""Which buffer rows each length bucket holds: contiguous ranges, with free rows between them.

A bucket's rows must be one range so its attention reads one strided view of the cache. Rows
inside a bucket are unordered (a row-to-request list), which keeps every change cheap:

- a bucket grows into the free row after it, or before it (the newcomer goes first);
- when both neighbours are taken, the buckets between it and the nearest free row each move
  ONE row from one end of their range to the other, so the free row travels to it;
- a finished row's hole is filled by the bucket's last row (the cache does that copy), and the
  last row becomes free: no other bucket moves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from baton_plugin.buckets import Bucket

MoveRow = Callable[["Bucket", int, int], None]  # (bucket, src row, dst row): copy the data


class RowSpace:
    """Owner of every buffer row (a bucket or free)."""

    def __init__(self, num_rows: int) -> None:
        self.owner: list[Bucket | None] = [None] * num_rows

    @property
    def num_free(self) -> int:
        return sum(1 for o in self.owner if o is None)

    def _free_runs(self) -> list[tuple[int, int]]:
        runs, start = [], None
        for r, o in enumerate([*self.owner, object()]):
            if o is None and start is None:
                start = r
            elif o is not None and start is not None:
                runs.append((start, r))
                start = None
        return runs

    def open(self, bucket: Bucket) -> int:
        """A row for a new bucket: the middle of the longest free run (room to grow both ways)."""
        runs = self._free_runs()
        if not runs:
            raise RuntimeError("baton: no free row for a new bucket (admission exceeded rows)")
        lo, hi = max(runs, key=lambda run: run[1] - run[0])
        row = lo + (hi - lo) // 2
        self.owner[row] = bucket
        return row

    def grow(self, bucket: Bucket, move: MoveRow) -> int:
        """Take one more row for `bucket` and say where; the caller then adds the request.

        Returns the row. If it is `bucket.first` after the call (the bucket grew at its
        front), the caller inserts the request first; otherwise it appends it.
        """
        stop = bucket.first + bucket.num_rows
        if stop < len(self.owner) and self.owner[stop] is None:
            self.owner[stop] = bucket
            return stop
        if bucket.first > 0 and self.owner[bucket.first - 1] is None:
            return self._take_front(bucket)
        above = next((r for r in range(stop, len(self.owner)) if self.owner[r] is None), None)
        below = next((r for r in range(bucket.first - 1, -1, -1) if self.owner[r] is None), None)
        if above is None and below is None:
            raise RuntimeError("baton: no free row (admission exceeded rows)")
        if below is None or (above is not None and above - stop <= bucket.first - below):
            self._pull_free_row_down(above, stop, move)
            self.owner[stop] = bucket
            return stop
        self._pull_free_row_up(below, bucket.first, move)
        return self._take_front(bucket)

    def _take_front(self, bucket: Bucket) -> int:
        bucket.first -= 1
        self.owner[bucket.first] = bucket
        return bucket.first

    def _pull_free_row_down(self, free: int, target: int, move: MoveRow) -> None:
        """Buckets in rows `[target, free)` each move their first row to their end."""
        while free > target:
            other = self.owner[free - 1]
            move(other, other.first, free)
            self.owner[free] = other
            self.owner[other.first] = None
            free = other.first
            other.first += 1
            other.rows.append(other.rows.pop(0))
            other.lengths.append(other.lengths.pop(0))

    def _pull_free_row_up(self, free: int, target: int, move: MoveRow) -> None:
        """Buckets in rows `(free, target)` each move their last row to before their first."""
        while free < target - 1:
            other = self.owner[free + 1]
            last = other.first + other.num_rows - 1
            move(other, last, free)
            self.owner[free] = other
            self.owner[last] = None
            free = last
            other.first -= 1
            other.rows.insert(0, other.rows.pop())
            other.lengths.insert(0, other.lengths.pop())

    def release(self, row: int) -> None:
        """`row` (a bucket's former last row) is free again."""
        self.owner[row] = None
