"""Data exchanged between the engine and the scheduling hooks."""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.kv_cache import MemoryStats, PassStats
from runtime.request import Request


@dataclass(frozen=True, slots=True)
class SchedulingBudget:
    """Limits the admission hook must respect this step.

    `kv_cache_tokens` is the layout's KV capacity and `kv_free_tokens` what it has not
    reserved (`kv_cache.kv_free_tokens()`), both in tokens.
    """

    max_num_seqs: int
    max_model_len: int
    kv_cache_tokens: int
    kv_free_tokens: int


@dataclass(frozen=True, slots=True)
class AdmissionDecision:
    """Requests to admit from `waiting` and to preempt from `running`, in that order."""

    admit: tuple[Request, ...] = ()
    preempt: tuple[Request, ...] = ()


@dataclass(frozen=True, slots=True)
class StepStats:
    """What one engine step did: passes with their idle-computation counts, time and memory."""

    step: int
    passes: tuple[PassStats, ...]
    pass_seconds: tuple[float, ...]
    memory: MemoryStats
    num_running: int
    num_waiting: int
    num_admitted: int = 0
    num_preempted: int = 0
    num_finished: int = 0
    extra: dict = field(default_factory=dict)


class SchedulerError(RuntimeError):
    """A scheduler plugin returned a decision the engine cannot carry out."""
