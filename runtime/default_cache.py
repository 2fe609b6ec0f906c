"""The built-in cache layout: one contiguous K/V slab per request and packed token passes.

Every running request feeds its pending tokens (whole prompt, or one token) into a single
packed `(N,)` pass; attention runs per request against that request's own slab. It is the
default a scheduler gets when it supplies no layout of its own, and the simplest correct one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from runtime.kv_cache import (
    ForwardBatch,
    KVCache,
    MemoryStats,
    kv_elements_per_token,
)
from runtime.packing import Segment, SegmentMask, packed_batch, segment_attention
from runtime.request import Request

if TYPE_CHECKING:
    from runtime.attention_kernels import DecodeKernel


class PerRequestKVCache(KVCache):
    """Contiguous per-request slabs `(L, 2, reservation, H_kv, D)`, reserved at admission."""

    def __init__(self, shape, limits, device, dtype) -> None:
        super().__init__(shape, limits, device, dtype)
        self._slabs: dict[Request, torch.Tensor] = {}

    def add(self, request: Request) -> None:
        s = self.shape
        self._slabs[request] = torch.empty(
            (s.num_layers, 2, self.reservation(request), s.num_kv_heads, s.head_dim),
            dtype=self.kv_dtype, device=self.device)

    def free(self, request: Request) -> None:
        self._slabs.pop(request, None)

    def forward_batches(self, running: Sequence[Request]) -> Iterator[ForwardBatch]:
        if running:
            yield packed_batch(running, self.device)

    def attention(self, batch: ForwardBatch) -> _PerRequestAttention:
        return _PerRequestAttention([self._slabs[r] for r in batch.requests], batch.layout,
                                    self.decode_kernel)

    def memory_stats(self) -> MemoryStats:
        per_token = kv_elements_per_token(self.shape)
        reserved = sum(slab.shape[2] for slab in self._slabs.values())
        used = sum(r.num_computed_tokens for r in self._slabs)
        return MemoryStats(reserved * per_token, used * per_token, reserved, used, len(self._slabs))


class _PerRequestAttention:
    """Attention over packed segments, each against its own slab (Orca's literal split)."""

    def __init__(self, slabs: list[torch.Tensor], segments: Sequence[Segment],
                 kernel: DecodeKernel | None = None) -> None:
        self.slabs = slabs
        self.segments = segments
        self.kernel = kernel  # the engine's kernels: prompts through its prompt kernel

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Sequence[SegmentMask]) -> torch.Tensor:
        outputs = []
        for slab, seg, seg_mask in zip(self.slabs, self.segments, mask, strict=True):
            keys, values = slab[layer_idx, 0], slab[layer_idx, 1]  # (reservation, H_kv, D)
            end = seg.past + seg.length
            keys[seg.past:end] = k[seg.start:seg.stop]
            values[seg.past:end] = v[seg.start:seg.stop]
            outputs.append(segment_attention(q[seg.start:seg.stop], keys[:end], values[:end],
                                             seg_mask, self.kernel))
        return torch.cat(outputs, dim=0)  # (N, H, D)
