"""Contiguous slot ranges in one KV pool: Orca's per-request reservation, as offsets.

Pure bookkeeping (no tensors), so the placement policy is testable on its own. Every request
owns one contiguous range `[start, start + size)` of the pool, sized by its reservation, so its
keys are a plain slice of the pool and cache writes go in place.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SlotRange:
    """One request's reserved slots."""

    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


class SlotAllocator:
    """First-fit contiguous ranges within `[0, capacity)`; the capacity may grow."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.ranges: dict[Hashable, SlotRange] = {}

    @property
    def reserved(self) -> int:
        """Slots held by all ranges (Orca's `n_rsrv`)."""
        return sum(r.size for r in self.ranges.values())

    @property
    def high_water(self) -> int:
        """End of the last range: the pool prefix that holds live data."""
        return max((r.end for r in self.ranges.values()), default=0)

    def find(self, size: int) -> int | None:
        """Start of the first hole of at least `size` slots, or None if there is none."""
        cursor = 0
        for r in sorted(self.ranges.values(), key=lambda r: r.start):
            if r.start - cursor >= size:
                return cursor
            cursor = r.end
        return cursor if self.capacity - cursor >= size else None

    def place(self, key: Hashable, start: int, size: int) -> SlotRange:
        """Record `key`'s range; the caller found the hole with `find`."""
        if key in self.ranges:
            raise ValueError(f"{key!r} already holds slots")
        if start < 0 or start + size > self.capacity:
            raise ValueError(f"range [{start}, {start + size}) outside capacity {self.capacity}")
        self.ranges[key] = SlotRange(start, size)
        return self.ranges[key]

    def release(self, key: Hashable) -> SlotRange | None:
        """Give `key`'s slots back; None when it held none (release is idempotent)."""
        return self.ranges.pop(key, None)

    def compact(self) -> list[tuple[Hashable, SlotRange, SlotRange]]:
        """Slide every range down to close the holes; return (key, old, new) of each move.

        Moves come in ascending order of start and each only moves down, so copying them in
        order never overwrites a range that has not moved yet (overlaps within one move aside).
        """
        moves = []
        cursor = 0
        for key, r in sorted(self.ranges.items(), key=lambda kv: kv[1].start):
            if r.start != cursor:
                new = SlotRange(cursor, r.size)
                self.ranges[key] = new
                moves.append((key, r, new))
            cursor += r.size
        return moves
