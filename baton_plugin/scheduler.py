"""The BATON scheduler (Cong et al., 2024): dynamic re-batching as a plugin.

Admission is first come first served: a waiting request joins the running batch at the next
step as soon as a row and the KV budget allow, never waiting for the batch to drain. The
layout (`BatonCache`) prefills it in its own pass, embeds its K/V, and decodes everyone in
one dense `[B, 1]` pass per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from baton_plugin.cache import DEFAULT_MAX_PREFILL_TOKENS, NEWCOMER_PASSES, BatonCache
from baton_plugin.policy import peak_padded_footprint, row_extent
from runtime.api import (
    AdmissionDecision,
    CacheLimits,
    KVCache,
    ModelShape,
    Request,
    SchedulingBudget,
    hookimpl,
    renamed_option,
)


class BatonScheduler:
    """Options (YAML `scheduler_options`; docs/baton.md measures each):

    - `max_batch_size`: rows in the batch (default: the engine's `max_num_seqs`).
    - `kv_cache_tokens`: padded KV footprint the batch may reach, in tokens (default and
      cap: the engine's `kv_cache_tokens`). Admission checks the worst-case peak.
      (`kv_budget_tokens`, its former name, is still accepted, with a warning.)
    - `newcomer_pass`: `fused` (default) runs newcomers' prompts in the same pass as the
      decode rows' tokens; `separate` prefills them in a pass of their own first.
    - `max_buckets`: dense length buckets the batch may split into (1 = one dense batch).
    - `bucket_pad_tolerance`: a newcomer joins the bucket it pads least when the pad it adds
      is at most this share of its own keys; else it opens a bucket (while under the max).
    - `max_prefill_tokens`: prompt tokens prefilled per step (default 8192, twice Orca's pass
      size); later newcomers wait a step. Lower starts a burst's requests decoding sooner
      (first tokens) at a higher TPOT; higher the other way (docs/baton.md).
    """

    def __init__(
        self,
        max_batch_size: int | None = None,
        kv_cache_tokens: int | None = None,
        newcomer_pass: str = "fused",
        max_buckets: int = 4,
        bucket_pad_tolerance: float = 0.15,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        kv_budget_tokens: int | None = None,
    ) -> None:
        kv_cache_tokens = renamed_option("baton", "kv_budget_tokens", kv_budget_tokens,
                                         "kv_cache_tokens", kv_cache_tokens)
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("kv_cache_tokens", kv_cache_tokens),
            ("max_buckets", max_buckets),
            ("max_prefill_tokens", max_prefill_tokens),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if newcomer_pass not in NEWCOMER_PASSES:
            raise ValueError(f"newcomer_pass must be one of {', '.join(NEWCOMER_PASSES)}, "
                             f"got {newcomer_pass!r}")
        if not (isinstance(bucket_pad_tolerance, (int, float)) and bucket_pad_tolerance >= 0):
            raise ValueError(f"bucket_pad_tolerance must be >= 0, got {bucket_pad_tolerance!r}")
        self.max_batch_size = max_batch_size
        self.kv_cache_tokens = kv_cache_tokens
        self.newcomer_pass = newcomer_pass
        self.max_buckets = max_buckets
        self.bucket_pad_tolerance = float(bucket_pad_tolerance)
        self.max_prefill_tokens = max_prefill_tokens
        self.cache: BatonCache | None = None

    @hookimpl
    def admit_requests(
        self,
        waiting: Sequence[Request],
        running: Sequence[Request],
        budget: SchedulingBudget,
        kv_cache: KVCache,
    ) -> AdmissionDecision:
        """FCFS while a row is free and the batch's worst-case padded footprint fits.

        The footprint counts padding (`B x max length`, as the dense cache stores it), not
        just real tokens. The first request that does not fit stops admission (no skipping);
        a request alone is always admitted, or it could never run.
        """
        limit = min(self.max_batch_size or budget.max_num_seqs, budget.max_num_seqs)
        if isinstance(kv_cache, BatonCache):
            limit = min(limit, kv_cache.max_rows)
        capacity = min(self.kv_cache_tokens or budget.kv_cache_tokens, budget.kv_cache_tokens)
        rows = [row_extent(r, budget.max_model_len) for r in running]
        admit: list[Request] = []
        for req in waiting:
            if len(rows) >= limit:
                break
            candidate = [*rows, row_extent(req, budget.max_model_len)]
            if rows and peak_padded_footprint(candidate) > capacity:
                break
            rows = candidate
            admit.append(req)
        return AdmissionDecision(admit=tuple(admit))

    @hookimpl
    def make_kv_cache(
        self, shape: ModelShape, limits: CacheLimits, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        self.cache = BatonCache(
            shape, limits, device, dtype, self.max_batch_size, self.newcomer_pass,
            self.max_buckets, self.bucket_pad_tolerance, self.max_prefill_tokens,
        )
        return self.cache
