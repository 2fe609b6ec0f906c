"""Orca (Yu et al., OSDI 2022): iteration-level scheduling with selective batching.

Every engine step is one Orca iteration: one forward pass over every running request, each
feeding either its whole prompt (initiation) or its last token (increment); an iteration over
`max_pass_tokens` tokens runs its further initiations in more passes of the same step. A
request that finishes leaves at once; a newly selected one joins the next iteration. Admission
is the paper's Algorithm 1 on one worker; see docs/orca.md for the worked example and
departures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from orca_plugin.cache import AttentionMode, OrcaKVCache
from runtime.api import (
    AdmissionDecision,
    CacheLimits,
    KVCache,
    ModelShape,
    Request,
    SchedulingBudget,
    StepStats,
    hookimpl,
    kv_reservation,
    renamed_option,
)

ATTENTION_MODES: tuple[AttentionMode, ...] = ("auto", "fused", "loop")


def select_batch(
    waiting: Sequence[Request],
    num_running: int,
    max_batch_size: int,
    free_slots: int,
    max_model_len: int,
) -> tuple[Request, ...]:
    """Algorithm 1 for the requests not yet started, in arrival order.

    Running requests (all earlier selections) fill the batch first. A request starting its
    initiation reserves `prompt_len + max_tokens` slots; the first one that does not fit ends
    selection (`break`): later requests wait behind it even if they would fit. One exception
    keeps the queue live: a request larger than the whole budget runs when it is alone.
    """
    selected: list[Request] = []
    alone = num_running == 0
    for req in sorted(waiting, key=lambda r: r.arrival_time):  # stable: ties keep queue order
        if num_running + len(selected) >= max_batch_size:
            break
        need = kv_reservation(req, max_model_len)
        if need > free_slots and not (alone and not selected):
            break
        free_slots -= need
        selected.append(req)
    return tuple(selected)


class OrcaScheduler:
    """Options (YAML `scheduler_options`):

    - `max_batch_size`: requests per iteration (default and cap: the engine's `max_num_seqs`).
    - `kv_cache_tokens`: Orca's slot budget `n_slots`, in tokens (default: the engine's
      `kv_cache_tokens`). A request reserving more than all of it runs alone rather than
      blocking the queue. (`kv_slots`, its former name, is still accepted, with a warning.)
    - `attention`: `fused` (the decode rows gathered into a few padded calls per layer, by
      length; with the engine's decode kernel, one call per layer reading each row's slots
      in place), `loop` (one call per request, the paper's literal split) or `auto` (the
      default: the kernel where there is one; else whichever of the two is measured faster
      here, re-checked as the run goes; `fused` on CUDA).
    - `max_pass_tokens`: tokens per forward pass (default 4096; `null`: no limit, one pass
      per iteration). An iteration with more runs its further initiations in more passes of
      the same step: who runs and when is unchanged, only how the work is cut (docs/orca.md).
    """

    def __init__(
        self,
        max_batch_size: int | None = None,
        kv_cache_tokens: int | None = None,
        attention: AttentionMode = "auto",
        kv_slots: int | None = None,
        max_pass_tokens: int | None = 4096,
    ) -> None:
        kv_cache_tokens = renamed_option("orca", "kv_slots", kv_slots, "kv_cache_tokens",
                                         kv_cache_tokens)
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("kv_cache_tokens", kv_cache_tokens),
            ("max_pass_tokens", max_pass_tokens),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.max_batch_size = max_batch_size
        self.kv_cache_tokens = kv_cache_tokens
        self.attention = attention
        self.max_pass_tokens = max_pass_tokens
        self.cache: OrcaKVCache | None = None

    @hookimpl
    def admit_requests(
        self,
        waiting: Sequence[Request],
        running: Sequence[Request],
        budget: SchedulingBudget,
    ) -> AdmissionDecision:
        """Select in arrival order up to `max_batch_size`, breaking at the first misfit."""
        limit = min(self.max_batch_size or budget.max_num_seqs, budget.max_num_seqs)
        return AdmissionDecision(admit=select_batch(
            waiting, len(running), limit, budget.kv_free_tokens, budget.max_model_len))

    @hookimpl
    def make_kv_cache(
        self, shape: ModelShape, limits: CacheLimits, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        kv_cache_tokens = self.kv_cache_tokens or limits.kv_cache_tokens
        self.cache = OrcaKVCache(shape, limits, device, dtype, kv_cache_tokens, self.attention,
                                 max_pass_tokens=self.max_pass_tokens)
        return self.cache

    @hookimpl(tryfirst=True)
    def on_step_end(self, stats: StepStats) -> None:
        """Put this iteration's token counts and prompt-wait estimate in `stats.extra["orca"]`.

        `tryfirst` so that observers registered after the scheduler already see them.
        """
        cache = self.cache
        if cache is None or not cache.iteration_passes or not stats.pass_seconds:
            return
        stats.extra["orca"] = iteration_info(cache, stats.pass_seconds)


def iteration_info(cache: OrcaKVCache, pass_seconds: Sequence[float]) -> dict[str, Any]:
    """Token counts of the last iteration and the time its decode rows waited on its prompts.

    The wait is the prompts' share of the first pass (the one with the decode rows): their
    measured attention time plus the token-proportional share of everything else
    (projections, MLP, norms: the token-wise work selective batching runs on all tokens at
    once), plus every further pass of the iteration (`max_pass_tokens`), which the decode
    rows' next token waits for too. Without timings (CUDA) the attention is not split out.
    """
    passes = cache.iteration_passes[: len(pass_seconds)]
    lay, times = passes[0]
    first_tokens = int(lay.write_slots.numel())
    num_tokens = sum(int(p.write_slots.numel()) for p, _ in passes)
    init_tokens = sum(p.num_initiation_tokens for p, _ in passes)
    num_init = sum(1 for p, _ in passes for s in p.segments if s.prefill)
    num_decode = lay.num_decode
    attention_s = sum(t.initiation_s + t.decode_s for _, t in passes)
    wait = 0.0
    if num_decode and num_init:
        rest = max(pass_seconds[0] - times.initiation_s - times.decode_s, 0.0)
        wait = times.initiation_s + rest * lay.num_initiation_tokens / first_tokens
        wait += sum(pass_seconds[1:len(passes)])
    return {
        "num_tokens": num_tokens,
        "num_initiation_tokens": init_tokens,
        "num_decode_tokens": num_tokens - init_tokens,
        "num_initiation_requests": num_init,
        "num_decode_requests": num_decode,
        "num_passes": len(passes),
        "attention_s": attention_s,
        "initiation_attention_s": sum(t.initiation_s for _, t in passes),
        "prompt_wait_s": wait,
        "decode_request_wait_s": wait * num_decode,
        "pool_tokens": cache.pool_tokens,
    }
