"""Checks of what scheduler plugins hand back, shared by the engine and the conformance kit.

Each check raises `SchedulerError` saying which rule broke, before the value can reach the cache
or a request's state; the caller prefixes the scheduler's name and distribution
(`runtime.plugins.scheduler_origin`).
"""

from __future__ import annotations

from collections.abc import Collection, Generator

import torch

from runtime.kv_cache import ForwardBatch, KVCache
from runtime.request import Request
from runtime.scheduling import AdmissionDecision, SchedulerError


def check_kv_cache(cache: object) -> KVCache:
    """`make_kv_cache` must return a `runtime.api.KVCache`."""
    if not isinstance(cache, KVCache):
        raise SchedulerError(
            f"make_kv_cache returned {type(cache).__name__}, expected a runtime.api.KVCache"
        )
    return cache


def _not_in(req: Request, queue: str, running: Collection[Request]) -> str:
    """Where a request named in a decision really is, for the error message."""
    if req in running:
        return f"{req.request_id}, which is already running"
    if req.status.done:
        return f"{req.request_id}, which is already {req.status.value}"
    return f"{req.request_id}, which is not in this engine's {queue} queue"


def _first_repeat(requests: tuple[Request, ...]) -> Request | None:
    seen: set[Request] = set()
    for req in requests:
        if req in seen:
            return req
        seen.add(req)
    return None


def check_decision(
    decision: object,
    waiting: Collection[Request],
    running: Collection[Request],
    max_num_seqs: int,
) -> AdmissionDecision:
    """`admit_requests` must admit waiting requests once, preempt running ones, fit the rows."""
    if not isinstance(decision, AdmissionDecision):
        raise SchedulerError(
            f"admit_requests returned {type(decision).__name__}, expected AdmissionDecision"
        )
    waiting, running = set(waiting), set(running)
    for verb, named, pool, queue in (("admitted", decision.admit, waiting, "waiting"),
                                     ("preempted", decision.preempt, running, "running")):
        twice = _first_repeat(tuple(named))
        if twice is not None:
            raise SchedulerError(f"{verb} {twice.request_id} twice in one decision")
        stranger = next((r for r in named if r not in pool), None)
        if stranger is not None:
            where = _not_in(stranger, queue, running if queue == "waiting" else ())
            raise SchedulerError(f"{verb} {where}")
    size = len(running) - len(decision.preempt) + len(decision.admit)
    if size > max_num_seqs:
        raise SchedulerError(f"batch of {size} exceeds max_num_seqs={max_num_seqs}")
    return decision


def check_passes(passes: object) -> Generator:
    """`forward_batches` must be a generator: the engine asks for a pass once the last one ran."""
    if not isinstance(passes, Generator):
        raise SchedulerError(f"forward_batches returned {type(passes).__name__}, expected a "
                             "generator (a method that yields each ForwardBatch)")
    return passes


def check_batch(batch: object, running: Collection[Request]) -> ForwardBatch:
    """A pass the cache yields must feed running requests and sample each row for one of them."""
    where = "the KV cache yielded"
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
