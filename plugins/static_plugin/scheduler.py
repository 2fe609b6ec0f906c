"""Static batching: admit a batch only when the previous one has fully drained."""

from __future__ import annotations

from collections.abc import Sequence

from runtime.api import (
    AdmissionDecision,
    CacheLimits,
    KVCache,
    ModelShape,
    Request,
    SchedulingBudget,
    hookimpl,
)
from static_plugin.cache import StaticBatchCache


class StaticScheduler:
    """Take up to `max_batch_size` waiting requests; decode until all of them finish.

    Finished rows keep occupying their slot (and are still computed) until the whole batch
    is done: the idle work that iteration-level schedulers remove.
    """

    def __init__(self, max_batch_size: int | None = None) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size

    @hookimpl
    def admit_requests(self, waiting: Sequence[Request], running: Sequence[Request],
                       budget: SchedulingBudget, kv_cache: KVCache) -> AdmissionDecision:
        if running or kv_cache.memory_stats().num_rows:
            return AdmissionDecision()
        limit = min(self.max_batch_size or budget.max_num_seqs, budget.max_num_seqs)
        batch: list[Request] = []
        for req in waiting:
            if len(batch) == limit:
                break
            longest_prompt = max([r.prompt_len for r in batch] + [req.prompt_len])
            longest_out = max([r.params.max_tokens for r in batch] + [req.params.max_tokens])
            if (len(batch) + 1) * (longest_prompt + longest_out) > budget.kv_free_tokens \
                    and batch:
                break
            batch.append(req)
        return AdmissionDecision(admit=tuple(batch))

    @hookimpl
    def make_kv_cache(self, shape: ModelShape, limits: CacheLimits, device, dtype) -> KVCache:
        return StaticBatchCache(shape, limits, device, dtype)
