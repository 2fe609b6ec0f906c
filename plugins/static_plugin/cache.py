"""A padded `[B, H_kv, S, D]` cache for one run-to-completion batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.api import (
    ForwardBatch,
    KVCache,
    MemoryStats,
    PassStats,
    Phase,
    Request,
    kv_elements_per_token,
    padded_decode_mask,
    padded_prefill_mask,
)


@dataclass(frozen=True, slots=True)
class StaticLayout:
    """Which cache columns a pass writes, and which rows are live (finished rows are not).

    `kernel_counts` is set on decode passes when the engine has its decode kernel: keys per
    row (every row, finished ones too: the static batch computes them all), read from the
    row's first real column instead of the padded window.
    """

    start: int
    width: int
    live_rows: tuple[int, ...]
    kernel_offsets: torch.Tensor | None = None
    kernel_counts: torch.Tensor | None = None


class StaticBatchCache(KVCache):
    """Left-padded rows that all append at the same column; freed rows stay until the batch ends."""

    def __init__(self, shape, limits, device, dtype) -> None:
        super().__init__(shape, limits, device, dtype)
        self._reset()

    def _reset(self) -> None:
        self.rows: list[Request] = []
        self.live: list[bool] = []
        self.k: torch.Tensor | None = None  # (L, B, H_kv, S_cap, D)
        self.v: torch.Tensor | None = None
        self.key_valid: torch.Tensor | None = None  # (B, S_cap) bool
        self.first_key: list[int] = []  # each row's first real column (its left padding)
        self.length = 0
        self.prefilled = False

    def add(self, request: Request) -> None:
        if self.prefilled:
            raise RuntimeError("static batch: cannot add a request to a running batch")
        self.rows.append(request)
        self.live.append(True)

    def free(self, request: Request) -> None:
        if request in self.rows:
            self.live[self.rows.index(request)] = False
        if not any(self.live):
            self._reset()

    def _allocate(self) -> None:
        s, b = self.shape, len(self.rows)
        cap = max(r.num_tokens for r in self.rows) + max(r.params.max_tokens for r in self.rows)
        dims = (s.num_layers, b, s.num_kv_heads, cap, s.head_dim)
        self.k = torch.zeros(dims, dtype=self.kv_dtype, device=self.device)
        self.v = torch.zeros(dims, dtype=self.kv_dtype, device=self.device)
        self.key_valid = torch.zeros((b, cap), dtype=torch.bool, device=self.device)

    def forward_batches(self, running: Sequence[Request]) -> Iterator[ForwardBatch]:
        if not self.rows or not any(self.live):
            return
        yield self._decode_batch() if self.prefilled else self._prefill_batch()

    def _prefill_batch(self) -> ForwardBatch:
        self._allocate()
        tokens = [r.pending_token_ids() for r in self.rows]
        width = max(len(t) for t in tokens)
        ids = torch.zeros((len(tokens), width), dtype=torch.long)
        pos = torch.zeros((len(tokens), width), dtype=torch.long)
        for i, row in enumerate(tokens):
            pad = width - len(row)
            ids[i, pad:] = torch.tensor(row)
            pos[i, pad:] = torch.arange(len(row))
            self.key_valid[i, pad:width] = True
            self.first_key.append(pad)
        sample = torch.arange(len(tokens)) * width + width - 1
        mask = padded_prefill_mask(self.key_valid[:, :width], width, self.dtype)
        return ForwardBatch(
            tuple(self.rows), ids.to(self.device), pos.to(self.device),
            tuple(len(t) for t in tokens), sample.to(self.device), tuple(self.rows),
            Phase.PREFILL, StaticLayout(0, width, tuple(range(len(self.rows)))), mask)

    def _decode_batch(self) -> ForwardBatch:
        live = tuple(i for i, alive in enumerate(self.live) if alive)
        ids = torch.zeros((len(self.rows), 1), dtype=torch.long)
        pos = torch.zeros((len(self.rows), 1), dtype=torch.long)
        for i in live:
            ids[i, 0] = self.rows[i].output_token_ids[-1]
            pos[i, 0] = self.rows[i].num_computed_tokens
        self.key_valid[list(live), self.length] = True
        reqs = tuple(self.rows[i] for i in live)
        mask = padded_decode_mask(self.key_valid[:, :self.length + 1], self.dtype)
        return ForwardBatch(
            reqs, ids.to(self.device), pos.to(self.device), (1,) * len(live),
            torch.tensor(live, device=self.device), reqs, Phase.DECODE,
            StaticLayout(self.length, 1, live, *self._kernel_rows()), mask)

    def _kernel_rows(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each row's real keys for the engine's decode kernel: from its first real column to
        the one this pass appends."""
        if self.decode_kernel is None:
            return None, None
        s, cap = self.shape, self.k.shape[3]
        row_stride = s.num_kv_heads * cap * s.head_dim
        offsets = [i * row_stride + first * s.head_dim for i, first in enumerate(self.first_key)]
        counts = [self.length + 1 - first for first in self.first_key]
        return torch.tensor(offsets), torch.tensor(counts)

    def attention(self, batch: ForwardBatch) -> _StaticAttention:
        return _StaticAttention(self, batch.layout)

    def commit(self, batch: ForwardBatch) -> None:
        self.length = batch.layout.start + batch.layout.width
        self.prefilled = True

    def memory_stats(self) -> MemoryStats:
        per_token = kv_elements_per_token(self.shape)
        if self.k is None:
            reserved = sum(r.max_total_tokens for r in self.rows)
            return MemoryStats(0, 0, reserved, 0, len(self.rows))
        allocated = self.k.shape[1] * self.k.shape[3]
        used = sum(r.num_computed_tokens for r, alive in zip(self.rows, self.live, strict=True) if alive)
        return MemoryStats(allocated * per_token, used * per_token, allocated, used, len(self.rows))

    def pass_stats(self, batch: ForwardBatch) -> PassStats:
        lay: StaticLayout = batch.layout
        rows = len(self.rows)
        keys = lay.start + lay.width
        useful_tokens = sum(batch.num_new_tokens)
        if batch.phase is Phase.PREFILL:
            useful_pairs = sum(n * (n + 1) // 2 for n in batch.num_new_tokens)
        else:
            useful_pairs = sum(r.num_computed_tokens + 1 for r in batch.requests)
        computed_pairs = rows * lay.width * keys
        if lay.kernel_counts is not None:  # the kernel skips each row's left padding
            computed_pairs = int(lay.kernel_counts.sum())
        return PassStats(batch.phase, len(batch.requests), useful_tokens, rows * lay.width,
                         useful_pairs, computed_pairs)


class _StaticAttention:
    """One batched SDPA call per layer over the padded cache (one decode-kernel call per
    layer on decode passes when the engine has the kernel)."""

    def __init__(self, cache: StaticBatchCache, layout: StaticLayout) -> None:
        self.cache = cache
        self.layout = layout

    def attend(self, layer_idx: int, q, k, v, mask) -> torch.Tensor:
        c, lay = self.cache, self.layout
        end = lay.start + lay.width
        if lay.kernel_counts is not None:  # decode: q (B, 1, H, D); the kernel writes k, v
            s = c.shape
            out = c.decode_kernel(q[:, 0].contiguous(), c.k[layer_idx], c.v[layer_idx],
                                  lay.kernel_offsets, lay.kernel_counts, s.head_dim,
                                  c.k.shape[3] * s.head_dim, s.num_kv_heads, k[:, 0], v[:, 0])
            return out.unsqueeze(1)
        c.k[layer_idx, :, :, lay.start:end] = k.transpose(1, 2)  # (B, H_kv, T, D)
        c.v[layer_idx, :, :, lay.start:end] = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(  # 16-bit K/V under a wider model: widened
            q.transpose(1, 2), c.k[layer_idx, :, :, :end].to(q.dtype),
            c.v[layer_idx, :, :, :end].to(q.dtype), attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)
