"""The BATON scheduler (Cong et al., 2024): dynamic re-batching as a plugin.

Admission is first come first served: a waiting request joins the running batch at the next
step as soon as a row and the KV budget allow, never waiting for the batch to drain. The
layout (`BatonCache`) prefills it in its own pass, embeds its K/V, and decodes everyone in
one dense `[B, 1]` pass per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from baton_plugin.attention import BatonMask
from baton_plugin.cache import NEWCOMER_PASSES, BatonCache
from baton_plugin.policy import peak_padded_footprint, row_extent
from runtime import hookimpl
from runtime.kv_cache import CacheLimits, ForwardBatch, KVCache, ModelShape, Phase
from runtime.request import Request
from runtime.scheduling import AdmissionDecision, SchedulingBudget, StepStats


@dataclass(slots=True)
class IdleTotals:
    """Useful versus computed work summed over every pass of an engine (for benchmarks)."""

    num_passes: int = 0
    num_decode_passes: int = 0
    useful_tokens: int = 0
    computed_tokens: int = 0
    useful_attention_pairs: int = 0
    computed_attention_pairs: int = 0
    peak_allocated_elements: int = 0
    peak_used_elements: int = 0

    @property
    def idle_attention_fraction(self) -> float:
        """Share of computed (query, key) pairs that were padding or causal-masked."""
        done = self.computed_attention_pairs
        return 1 - self.useful_attention_pairs / done if done else 0.0


class BatonScheduler:
    """Options (YAML `scheduler_options`; docs/baton.md measures each):

    - `max_batch_size`: rows in the batch (default: the engine's `max_num_seqs`).
    - `kv_budget_tokens`: padded KV footprint the batch may reach, in tokens (default: the
      engine's KV capacity). Admission checks the worst-case peak.
    - `newcomer_pass`: `fused` (default) runs newcomers' prompts in the same pass as the
      decode rows' tokens; `separate` prefills them in a pass of their own first.
    - `max_buckets`: dense length buckets the batch may split into (1 = one dense batch).
    - `bucket_pad_tolerance`: a newcomer joins the bucket it pads least when the pad it adds
      is at most this share of its own keys; else it opens a bucket (while under the max).
    - `max_prefill_tokens`: prompt tokens prefilled per step; later newcomers wait a step.
    """

    def __init__(
        self,
        max_batch_size: int | None = None,
        kv_budget_tokens: int | None = None,
        newcomer_pass: str = "fused",
        max_buckets: int = 4,
        bucket_pad_tolerance: float = 0.15,
        max_prefill_tokens: int = 8192,
    ) -> None:
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("kv_budget_tokens", kv_budget_tokens),
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
        self.kv_budget_tokens = kv_budget_tokens
        self.newcomer_pass = newcomer_pass
        self.max_buckets = max_buckets
        self.bucket_pad_tolerance = float(bucket_pad_tolerance)
        self.max_prefill_tokens = max_prefill_tokens
        self.cache: BatonCache | None = None
        self.totals = IdleTotals()

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
        capacity = min(
            self.kv_budget_tokens or budget.kv_capacity_tokens, budget.kv_capacity_tokens
        )
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

    @hookimpl
    def build_attention_mask(self, batch: ForwardBatch, kv_cache: KVCache) -> BatonMask | None:
        """Per bucket, an additive mask with the dtype minimum on padded keys."""
        if not isinstance(kv_cache, BatonCache):
            return None
        return kv_cache.build_mask(batch)

    @hookimpl
    def on_step_end(self, stats: StepStats) -> None:
        """Accumulate the idle-computation counters of every pass."""
        t = self.totals
        for p in stats.passes:
            t.num_passes += 1
            t.num_decode_passes += p.phase is Phase.DECODE
            t.useful_tokens += p.useful_tokens
            t.computed_tokens += p.computed_tokens
            t.useful_attention_pairs += p.useful_attention_pairs
            t.computed_attention_pairs += p.computed_attention_pairs
        t.peak_allocated_elements = max(t.peak_allocated_elements, stats.memory.allocated_elements)
        t.peak_used_elements = max(t.peak_used_elements, stats.memory.used_elements)
