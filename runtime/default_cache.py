"""The built-in cache layout: one contiguous K/V slab per request and packed token passes.

Every running request feeds its pending tokens (whole prompt, or one token) into a single
packed `(N,)` pass; attention runs per request against that request's own slab. It is the
default a scheduler gets when it supplies no layout of its own, and the simplest correct one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from runtime.kv_cache import (
    CacheLimits,
    ForwardBatch,
    KVCache,
    MemoryStats,
    ModelShape,
    PassStats,
    Phase,
    kv_elements_per_token,
)
from runtime.request import Request


@dataclass(frozen=True, slots=True)
class Segment:
    """Where one request's tokens sit in a packed pass and how much of it is already cached."""

    start: int
    length: int
    past: int


def packed_batch(requests: Sequence[Request], device: torch.device) -> ForwardBatch:
    """Flatten every request's pending tokens into one `(N,)` pass (selective batching)."""
    ids: list[int] = []
    positions: list[int] = []
    segments: list[Segment] = []
    sample: list[int] = []
    for req in requests:
        pending = req.pending_token_ids()
        past = req.num_computed_tokens
        segments.append(Segment(len(ids), len(pending), past))
        ids.extend(pending)
        positions.extend(range(past, past + len(pending)))
        sample.append(len(ids) - 1)
    prefill = [req.num_computed_tokens == 0 or len(req.pending_token_ids()) > 1 for req in requests]
    phase = Phase.PREFILL if all(prefill) else Phase.DECODE if not any(prefill) else Phase.MIXED
    return ForwardBatch(
        requests=tuple(requests),
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        num_new_tokens=tuple(s.length for s in segments),
        sample_indices=torch.tensor(sample, dtype=torch.long, device=device),
        sampled_requests=tuple(requests),
        phase=phase,
        layout=tuple(segments),
    )


def segment_causal_masks(segments: Sequence[Segment], device: torch.device) -> tuple:
    """Per-segment boolean masks `(n, past + n)`: query i sees keys up to `past + i`.

    `None` for a single-token segment (it sees every cached key) so SDPA takes its fast path.
    """
    masks: list[torch.Tensor | None] = []
    for seg in segments:
        if seg.length == 1:
            masks.append(None)
            continue
        q_pos = torch.arange(seg.length, device=device).unsqueeze(1) + seg.past
        k_pos = torch.arange(seg.past + seg.length, device=device).unsqueeze(0)
        masks.append(k_pos <= q_pos)  # (n, past + n)
    return tuple(masks)


def attention_pairs(segments: Sequence[Segment]) -> tuple[int, int]:
    """(useful, computed) (query, key) pairs of packed segments.

    Useful pairs are the causal ones; the kernel computes the whole `n x (past + n)` rectangle
    of each segment and masks the rest.
    """
    useful = sum(s.length * s.past + s.length * (s.length + 1) // 2 for s in segments)
    computed = sum(s.length * (s.past + s.length) for s in segments)
    return useful, computed


class PerRequestKVCache(KVCache):
    """Contiguous per-request slabs `(L, 2, H_kv, capacity, D)`, reserved at admission."""

    def __init__(self, shape: ModelShape, limits: CacheLimits, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__(shape, limits, device, dtype)
        self._slabs: dict[Request, torch.Tensor] = {}

    def reservation(self, request: Request) -> int:
        """Slots a request holds: prompt + max_tokens, capped by the context length."""
        return min(request.max_total_tokens, self.limits.max_model_len)

    def add(self, request: Request) -> None:
        s = self.shape
        self._slabs[request] = torch.empty(
            (s.num_layers, 2, s.num_kv_heads, self.reservation(request), s.head_dim),
            dtype=self.dtype, device=self.device,
        )

    def free(self, request: Request) -> None:
        self._slabs.pop(request, None)

    def forward_batches(self, running: Sequence[Request]) -> Iterator[ForwardBatch]:
        if running:
            yield packed_batch(running, self.device)

    def attention(self, batch: ForwardBatch) -> _PerRequestAttention:
        return _PerRequestAttention([self._slabs[r] for r in batch.requests], batch.layout)

    def commit(self, batch: ForwardBatch) -> None:
        """Nothing to do: lengths are the requests' own `num_computed_tokens`."""

    def build_mask(self, batch: ForwardBatch) -> tuple:
        return segment_causal_masks(batch.layout, self.device)

    def memory_stats(self) -> MemoryStats:
        per_token = kv_elements_per_token(self.shape)
        reserved = sum(slab.shape[3] for slab in self._slabs.values())
        used = sum(r.num_computed_tokens for r in self._slabs)
        return MemoryStats(reserved * per_token, used * per_token, reserved, used, len(self._slabs))

    def pass_stats(self, batch: ForwardBatch) -> PassStats:
        useful, computed = attention_pairs(batch.layout)
        tokens = int(batch.input_ids.numel())
        return PassStats(batch.phase, len(batch.requests), tokens, tokens, useful, computed)


class _PerRequestAttention:
    """Attention over packed segments, each against its own slab (Orca's literal split)."""

    def __init__(self, slabs: list[torch.Tensor], segments: Sequence[Segment]) -> None:
        self.slabs = slabs
        self.segments = segments

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Any) -> torch.Tensor:
        outputs = []
        for slab, seg, seg_mask in zip(self.slabs, self.segments, mask, strict=True):
            end = seg.past + seg.length
            sl = slice(seg.start, seg.start + seg.length)
            slab[layer_idx, 0, :, seg.past:end] = k[sl].transpose(0, 1)  # (H_kv, n, D)
            slab[layer_idx, 1, :, seg.past:end] = v[sl].transpose(0, 1)
            out = F.scaled_dot_product_attention(  # 4-D: CPU's flash kernel rejects 3-D
                q[sl].transpose(0, 1)[None],  # (1, H, n, D)
                slab[layer_idx, 0, :, :end][None],
                slab[layer_idx, 1, :, :end][None],
                attn_mask=seg_mask,
                enable_gqa=True,
            )
            outputs.append(out[0].transpose(0, 1))  # (n, H, D)
        return torch.cat(outputs, dim=0)
