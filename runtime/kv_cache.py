"""The KV-cache protocol: what the engine asks of any cache layout a scheduler supplies.

A layout decides where keys and values live, how a step's tokens are arranged into forward
passes (padded `[B, T]` or packed `[N]`), and how attention reads the cache. The engine only
calls the methods below, so a scheduler can change all of that without touching the engine.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from runtime.request import Request

if TYPE_CHECKING:
    from runtime.attention_kernels import DecodeKernel


class Phase(enum.Enum):
    """What a forward pass computes; benchmarks split time by it."""

    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The model dimensions a cache layout needs to size its storage."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int


@dataclass(frozen=True, slots=True)
class CacheLimits:
    """Engine-wide limits: rows (sequences), context length and KV capacity in tokens.

    `kv_cache_tokens` is the resolved `kv_cache_tokens` setting (or what `kv_cache_memory`
    holds): the one name of the KV capacity, here, in `SchedulingBudget` and on `KVCache`.
    `kv_dtype` is what the keys and values are stored as (`kv_cache_dtype`; None: the model's
    dtype), `KVCache.kv_dtype` for a layout. `kv_memory_tokens` is what the memory budget
    (`kv_cache_memory`) holds before `kv_cache_tokens`' cap at `max_num_seqs x max_model_len`
    (None when `kv_cache_tokens` was set): the bound on everything a layout allocates, spare
    room included, where `kv_cache_tokens` bounds what it admits.
    """

    max_num_seqs: int
    max_model_len: int
    kv_cache_tokens: int
    kv_dtype: torch.dtype | None = None
    kv_memory_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    """One forward pass: which requests feed which tokens, and where logits are needed.

    `input_ids` and `positions` share one token layout chosen by the cache: `(B, T)` padded or
    `(N,)` packed. `sample_indices` index the flattened layout; row i of the logits belongs to
    `sampled_requests[i]`. `num_new_tokens[i]` is how many real tokens `requests[i]` feeds.
    `layout` is the cache's own metadata (row map, segment offsets), opaque to the engine;
    `mask` is the layout's attention mask for the pass, handed to every layer's `attend`
    unless a `build_attention_mask` hook overrides it.
    """

    requests: tuple[Request, ...]
    input_ids: torch.Tensor
    positions: torch.Tensor
    num_new_tokens: tuple[int, ...]
    sample_indices: torch.Tensor
    sampled_requests: tuple[Request, ...]
    phase: Phase
    layout: Any = None
    mask: Any = None


@dataclass(frozen=True, slots=True)
class PassStats:
    """Useful versus computed work of one forward pass (the idle-computation accounting).

    A token slot is one row of the token-wise GEMMs; an attention pair is one (query, key)
    score. Useful ones belong to a real token attending to a real key of its own request.
    """

    phase: Phase
    num_requests: int
    useful_tokens: int
    computed_tokens: int
    useful_attention_pairs: int
    computed_attention_pairs: int


@dataclass(frozen=True, slots=True)
class MemoryStats:
    """KV memory in elements (keys plus values, all layers): allocated versus holding real tokens."""

    allocated_elements: int
    used_elements: int
    reserved_tokens: int
    used_tokens: int
    num_rows: int

    @property
    def usage(self) -> float:
        """Fraction of allocated KV memory holding real tokens (0 when nothing is allocated)."""
        return self.used_elements / self.allocated_elements if self.allocated_elements else 0.0


class AttentionHandle(Protocol):
    """What the model modules call in every attention layer of one forward pass.

    The model computes q/k/v per token and hands them over; the handle owns the KV cache and
    the attention kernel, so a layout changes both without touching model code.
    """

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any
    ) -> torch.Tensor:
        """q `(*tok, H, D)` after RoPE/qk-norm; k, v `(*tok, H_kv, D)` -> out `(*tok, H, D)`.

        Writes k/v into the cache for `layer_idx` and attends over the cached keys, scaled by
        1/sqrt(D). `mask` is the pass's mask, passed through the model untouched.

        A handle may also offer `decode_plan() -> DecodePlan | None`
        (`runtime.api.DecodePlan`): where the pass's attention is one decode-kernel call per
        layer, its arguments, so the compiled decoder's C++ attention op makes those calls
        without calling `attend` (the plan's calls must do everything `attend` would).
        """
        ...


class KVCache(ABC):
    """Base class of a cache layout: five methods to write, a few to override when needed.

    The engine drives it in this order every step: `free` for each preempted request, `add`
    for each admitted one, then for each pass `forward_batches` yields: `pass_stats(batch)`,
    the forward pass (`attention(batch)` for the model), `commit(batch)`, then the engine adds
    each request's `num_new_tokens` to its `num_computed_tokens` and samples, and only then asks
    for the next pass; `free` for every request that leaves. Rules a layout relies on:

    - `num_computed_tokens` is the engine's: a layout reads it, never writes it.
    - `forward_batches` is a generator consumed lazily; the engine closes it when the step
      ends, also early, when a pass failed (so code after a `yield` may never run).
    - `free` may come for a request never added (aborted while waiting) or already freed.

    `decode_kernel` is set by the engine right after the layout is made: the native
    decode-attention kernel (`runtime.attention_kernels.DecodeKernel`) when the engine's
    `attention_backend` chose it, else None (use SDPA). A layout that can address each decode
    row's keys in place passes them to it; one that cannot ignores it.

    `dtype` is the model's (queries, masks, prefill staging); `kv_dtype` is what the layout
    stores keys and values as (`kv_cache_dtype`: the model's dtype, or 16-bit under a float32
    model, which halves the KV memory the engine sized `kv_cache_tokens` by). A layout stores
    K/V as `kv_dtype` and hands SDPA keys and values of the query's dtype (the decode kernel
    reads 16-bit keys under a float32 query itself).
    """

    decode_kernel: DecodeKernel | None = None

    def __init__(self, shape: ModelShape, limits: CacheLimits, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.shape = shape
        self.limits = limits
        self.device = torch.device(device)
        self.dtype = dtype
        self.kv_dtype = limits.kv_dtype or dtype

    @abstractmethod
    def add(self, request: Request) -> None:
        """Take a newly admitted request (reserve its space; its KV arrives in a later pass)."""

    @abstractmethod
    def free(self, request: Request) -> None:
        """Release everything held for a finished, aborted or preempted request; idempotent."""

    @abstractmethod
    def forward_batches(self, running: Sequence[Request]) -> Iterator[ForwardBatch]:
        """Yield this step's forward passes over `running`, each with its `mask`.

        A generator: the engine runs and samples each pass before asking for the next, so a
        later pass sees the tokens sampled by an earlier one (BATON's prefill, then decode).
        """

    @abstractmethod
    def attention(self, batch: ForwardBatch) -> AttentionHandle:
        """The handle the model uses for `batch` (cache writes and reads)."""

    @abstractmethod
    def memory_stats(self) -> MemoryStats:
        """Allocated versus used KV memory right now; `reserved_tokens` drive admission."""

    def reservation(self, request: Request) -> int:
        """KV tokens `add` will reserve for `request`; admission charges it to `kv_free_tokens`.

        Default: `kv_reservation` (prompt + max_tokens, capped by the context). A layout that
        reserves otherwise (whole blocks, nothing up front) overrides it, so the built-in FCFS
        admission counts what the layout will really take.
        """
        return kv_reservation(request, self.limits.max_model_len)

    def commit(self, batch: ForwardBatch) -> None:  # noqa: B027 - optional, a no-op by default
        """The forward pass of `batch` completed (embed prefilled rows, ...); default: nothing."""

    def pass_stats(self, batch: ForwardBatch) -> PassStats:
        """Useful versus computed token slots and attention pairs of `batch`.

        The default counts a packed pass without padding whose prompts attend causally (the
        `runtime.packing` toolkit's); a layout that pads or masks otherwise overrides it.
        """
        from runtime.packing import packed_pass_stats  # packing builds on this module

        return packed_pass_stats(batch)

    @property
    def kv_cache_tokens(self) -> int:
        """KV capacity in tokens that admission may reserve (the engine's, unless overridden)."""
        return self.limits.kv_cache_tokens

    def kv_free_tokens(self) -> int:
        """KV tokens still free for admission in this layout's own accounting."""
        return self.kv_cache_tokens - self.memory_stats().reserved_tokens

    def reset(self) -> bool:
        """Start again empty, keeping what is allocated; True when done, False to be replaced.

        The engine calls it after its warm-up, when no request is left, so that nothing the
        warm-up taught the layout (counters, timings of its variants) carries over. Default:
        False, and the engine makes a new layout through `make_kv_cache`. A layout that
        reserves and faults in its memory up front overrides it to keep that memory.
        """
        return False

    def is_empty(self) -> bool:
        """True when no request holds rows or reserved slots (the no-leak invariant)."""
        stats = self.memory_stats()
        return stats.num_rows == 0 and stats.reserved_tokens == 0 and stats.used_tokens == 0


def kv_elements_per_token(shape: ModelShape) -> int:
    """Key plus value elements one token occupies across all layers."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim


def kv_reservation(request: Request, max_model_len: int) -> int:
    """KV tokens a request may ever need: `prompt_len + max_tokens`, capped by the context.

    The default of `KVCache.reservation`, so the rule of the default layout and Orca's, which
    admission policies count against `budget.kv_free_tokens`.
    """
    return min(request.max_total_tokens, max_model_len)
