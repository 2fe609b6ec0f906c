"""The whole scheduler hook surface. Each docstring is the full contract of its hook.

Hooks are called with keyword arguments from one place each (runtime/engine.py). A hookimpl
may accept fewer arguments than its spec; new arguments are only ever added at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from runtime.kv_cache import CacheLimits, ForwardBatch, KVCache, ModelShape
    from runtime.request import Request
    from runtime.scheduling import AdmissionDecision, SchedulingBudget, StepStats

PROJECT = "baton_runtime"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def admit_requests(
    waiting: Sequence[Request],
    running: Sequence[Request],
    budget: SchedulingBudget,
    kv_cache: KVCache,
) -> AdmissionDecision | None:
    """Decide which waiting requests join the running batch now, and which running ones leave.

    Called once at the start of every engine step, before any forward pass. `waiting` is in
    arrival order (preempted requests go back to its front); `running` is the current batch.
    `budget` holds the limits (max_num_seqs, context length, the KV capacity `kv_cache_tokens`
    and `kv_free_tokens` as `kv_cache` counts them); admitting a request to a layout that
    reserves at admission takes `kv_cache.reservation(request)` of the free tokens. Return an
    `AdmissionDecision(admit=..., preempt=...)`: `admit` must be a subset of `waiting`,
    `preempt` a subset of `running`, each named once, and the resulting batch must not exceed
    `budget.max_num_seqs`. Preempted requests are freed from the cache and recomputed when
    readmitted. An invalid decision fails the requests it names with an error naming the
    scheduler and its distribution. Return None to fall through to the next implementation (the built-in FCFS default).
    """


@hookspec(firstresult=True)
def make_kv_cache(
    shape: ModelShape, limits: CacheLimits, device: torch.device, dtype: torch.dtype
) -> KVCache | None:
    """Create the engine's KV-cache layout object (a `runtime.api.KVCache`).

    Called once per engine, after the model is loaded. The layout decides storage (for example
    a padded `[B, H_kv, S, D]` tensor per layer, or per-request slabs), how a step's tokens are
    arranged into forward passes (`forward_batches`) with their masks, and how attention reads
    the cache. `limits.kv_cache_tokens` is the KV capacity it should hold. Return None to fall
    through to the built-in per-request layout.
    """


@hookspec(firstresult=True)
def build_attention_mask(batch: ForwardBatch, kv_cache: KVCache) -> Any | None:
    """Override the attention mask of one forward pass.

    Called before every forward pass with the `ForwardBatch` the cache yielded, which carries
    the layout's own mask (`batch.mask`). A non-None result replaces it and is handed unchanged
    to the model and from there to `kv_cache.attention(batch).attend(...)`, so its type is
    whatever the layout consumes (an additive float mask `[B, 1, T, S]` with the dtype minimum
    on hidden keys, a tuple of per-request masks, ...). Return None to keep `batch.mask`.
    """


@hookspec
def on_step_end(stats: StepStats) -> None:
    """Observe one finished engine step: its forward passes' `PassStats`, timings, KV memory.

    Called by every plugin after every step that ran at least one forward pass. Results are
    ignored; an observer must not mutate engine state.
    """


@hookspec
def on_request_finished(request: Request) -> None:
    """Observe a request leaving the engine (finished, aborted or failed).

    Called once per request, after its cache space was freed; `request.finish_reason` says why.
    """
