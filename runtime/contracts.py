"""Checks of what scheduler plugins hand back, shared by the engine and the conformance kit.

Each check raises `SchedulerError` with a message naming the scheduler and the broken rule,
before the value can reach the cache or a request's state.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from runtime.kv_cache import ForwardBatch, KVCache
from runtime.request import Request
from runtime.scheduling import AdmissionDecision, SchedulerError


def check_kv_cache(cache: object, name: str) -> KVCache:
    """`make_kv_cache` must return a `runtime.kv_cache.KVCache`."""
    if not isinstance(cache, KVCache):
        raise SchedulerError(
            f"scheduler {name!r}: make_kv_cache returned "
            f"{type(cache).__name__}, expected a runtime.kv_cache.KVCache"
        )
    return cache


def check_decision(
    decision: object,
    waiting: Collection[Request],
    running: Collection[Request],
    max_num_seqs: int,
    name: str,
) -> AdmissionDecision:
    """`admit_requests` must admit waiting requests once, preempt running ones, fit the rows."""
    if not isinstance(decision, AdmissionDecision):
        raise SchedulerError(
            f"scheduler {name!r}: admit_requests returned {type(decision).__name__}, "
            "expected AdmissionDecision"
        )
    waiting, running = set(waiting), set(running)
    if not set(decision.admit) <= waiting or len(set(decision.admit)) != len(decision.admit):
        raise SchedulerError(f"scheduler {name!r}: admitted a request that is not waiting")
    if not set(decision.preempt) <= running or len(set(decision.preempt)) != len(decision.preempt):
        raise SchedulerError(f"scheduler {name!r}: preempted a request that is not running")
    size = len(running) - len(set(decision.preempt)) + len(decision.admit)
    if size > max_num_seqs:
        raise SchedulerError(
            f"scheduler {name!r}: batch of {size} exceeds max_num_seqs={max_num_seqs}"
        )
    return decision


def check_batch(batch: object, running: Collection[Request], name: str) -> ForwardBatch:
    """A pass the cache yields must feed running requests and sample each row for one of them."""
    where = f"scheduler {name!r}: the KV cache yielded"
    if not isinstance(batch, ForwardBatch):
        raise SchedulerError(f"{where} {type(batch).__name__}, expected a ForwardBatch")
    running = set(running)
    if not set(batch.requests) <= running:
        raise SchedulerError(f"{where} a ForwardBatch with a request that is not running")
    if len(batch.num_new_tokens) != len(batch.requests):
        raise SchedulerError(
            f"{where} a ForwardBatch with {len(batch.num_new_tokens)} "
            f"num_new_tokens for {len(batch.requests)} requests"
        )
    if not set(batch.sampled_requests) <= set(batch.requests):
        raise SchedulerError(f"{where} a ForwardBatch sampling a request it does not feed")
    indices = batch.sample_indices
    if (
        not isinstance(indices, torch.Tensor)
        or indices.dim() != 1
        or indices.numel() != len(batch.sampled_requests)
    ):
        got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise SchedulerError(
            f"{where} a ForwardBatch whose sample_indices {got} do not match "
            f"its {len(batch.sampled_requests)} sampled_requests"
        )
    num_tokens = batch.input_ids.numel()
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < num_tokens:
        raise SchedulerError(
            f"{where} a ForwardBatch whose sample_indices fall outside its {num_tokens} tokens"
        )
    if batch.positions.shape != batch.input_ids.shape:
        raise SchedulerError(
            f"{where} a ForwardBatch whose positions {tuple(batch.positions.shape)}"
            f" do not match input_ids {tuple(batch.input_ids.shape)}"
        )
    return batch
