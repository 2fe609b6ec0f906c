"""Which replica takes a request: the least loaded one, not the next in turn.

Load is what makes a newcomer wait: requests queued for admission, a full batch, a full KV
cache. The front knows exactly how many requests each replica holds (it sent them and sees
them finish); the replica reports how many run and how full its KV cache is at every poll.

    score = (in_flight + waiting) / max_num_seqs + kv_usage

`in_flight / max_num_seqs` is how full the batch is (past 1, requests queue); waiting ones
count twice because a newcomer queues behind them; `kv_usage` (0..1) catches a replica
whose batch has room but whose cache does not (long contexts). Lowest score wins; ties go
to fewer requests in flight, then to the lower index, so an idle pool is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runtime.distributed.protocol import Load


@dataclass(frozen=True, slots=True)
class Candidate:
    """A replica that is up, as the router sees it."""

    index: int
    in_flight: int
    load: Load
    max_num_seqs: int

    @property
    def waiting(self) -> int:
        """Requests it holds that its last report did not count as running."""
        return max(self.in_flight - self.load.running, 0)

    @property
    def score(self) -> float:
        return (self.in_flight + self.waiting) / max(self.max_num_seqs, 1) + self.load.kv_usage


def choose(candidates: Sequence[Candidate]) -> int | None:
    """The index of the least loaded candidate, or None when there is none."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.score, c.in_flight, c.index)).index
