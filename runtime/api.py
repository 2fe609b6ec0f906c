"""The public API for scheduler plugins: everything a scheduler or a KV layout needs.

    from runtime.api import AdmissionDecision, KVCache, hookimpl, packed_batch, ...

A plugin imports only from here (or `runtime`, which re-exports these names); tests also use
the conformance kit, `runtime.testing` and `runtime.conformance`. Anything else in `runtime`
may change without notice. See docs/plugin-hooks.md and docs/writing-a-scheduler.md.
"""

from runtime.attention_kernels import DecodeKernel, DecodePlan
from runtime.default_cache import PerRequestKVCache
from runtime.defaults import fcfs_admission
from runtime.hookspecs import hookimpl
from runtime.huge_pages import empty as kv_empty
from runtime.kv_cache import (
    AttentionHandle,
    CacheLimits,
    ForwardBatch,
    KVCache,
    MemoryStats,
    ModelShape,
    PassStats,
    Phase,
    kv_elements_per_token,
    kv_reservation,
)
from runtime.masks import additive_mask, padded_decode_mask, padded_prefill_mask
from runtime.options import renamed_option
from runtime.packing import (
    CAUSAL,
    Packed,
    Segment,
    SegmentMask,
    attention_pairs,
    pack,
    packed_batch,
    packed_pass_stats,
    segment_attention,
    segment_mask,
    segment_masks,
)
from runtime.prefill import PrefilledKV, prefill_kv
from runtime.request import FinishReason, Request, RequestStatus
from runtime.sampling_params import SamplingParams
from runtime.scheduling import AdmissionDecision, SchedulerError, SchedulingBudget, StepStats

__all__ = [
    # hooks and the decisions they return
    "hookimpl",
    "AdmissionDecision",
    "SchedulingBudget",
    "StepStats",
    "SchedulerError",
    "fcfs_admission",
    # requests
    "Request",
    "RequestStatus",
    "FinishReason",
    "SamplingParams",
    # the KV layout contract
    "KVCache",
    "ForwardBatch",
    "AttentionHandle",
    "ModelShape",
    "CacheLimits",
    "MemoryStats",
    "PassStats",
    "Phase",
    "kv_elements_per_token",
    "kv_reservation",
    "PerRequestKVCache",
    "DecodeKernel",
    "DecodePlan",
    "kv_empty",
    # the packed-batch toolkit
    "CAUSAL",
    "Packed",
    "Segment",
    "SegmentMask",
    "pack",
    "packed_batch",
    "segment_mask",
    "segment_masks",
    "segment_attention",
    "attention_pairs",
    "packed_pass_stats",
    # padded masks
    "additive_mask",
    "padded_decode_mask",
    "padded_prefill_mask",
    # prompts prefilled elsewhere (a prefill worker): what `insert_prefilled` takes
    "PrefilledKV",
    "prefill_kv",
    # options
    "renamed_option",
]
