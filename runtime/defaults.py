"""Built-in fallbacks for the decision hooks, registered `trylast` in every engine.

There is no default `build_attention_mask`: a pass's mask is the one its layout built
(`ForwardBatch.mask`) unless a scheduler's hook overrides it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from runtime.default_cache import PerRequestKVCache
from runtime.hookspecs import hookimpl
from runtime.kv_cache import CacheLimits, KVCache, ModelShape
from runtime.request import Request
from runtime.scheduling import AdmissionDecision, SchedulingBudget


def fcfs_admission(waiting: Sequence[Request], running: Sequence[Request],
                   budget: SchedulingBudget, kv_cache: KVCache) -> AdmissionDecision:
    """First come first served: admit in order while rows and the KV tokens the layout reserves
    (`kv_cache.reservation`) fit, then stop."""
    room = budget.max_num_seqs - len(running)
    free = budget.kv_free_tokens
    admit: list[Request] = []
    for req in waiting:
        need = kv_cache.reservation(req)
        if room <= 0 or need > free:
            break
        admit.append(req)
        room -= 1
        free -= need
    return AdmissionDecision(admit=tuple(admit))


class Defaults:
    """FCFS admission and per-request KV slabs."""

    @hookimpl(trylast=True)
    def admit_requests(self, waiting, running, budget, kv_cache) -> AdmissionDecision:
        return fcfs_admission(waiting, running, budget, kv_cache)

    @hookimpl(trylast=True)
    def make_kv_cache(self, shape: ModelShape, limits: CacheLimits, device: torch.device,
                      dtype: torch.dtype) -> KVCache:
        return PerRequestKVCache(shape, limits, device, dtype)
