"""Two simple attention handles (tests, training, bench); the protocol is `runtime.kv_cache`'s.

The model computes q/k/v per token and hands them to `attn.attend(layer_idx, q, k, v, mask)`;
the handle owns the KV cache and the attention kernel, so a scheduler can change the cache
layout without touching model code. Softmax scale is 1/sqrt(head_dim), applied by the handle.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None):
    """SDPA with GQA; rows with no allowed key attend everywhere (their output is padding)."""
    if allowed is not None:
        allowed = allowed | ~allowed.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, is_causal=allowed is None, enable_gqa=True
    )


class CausalSelfAttention:
    """Cache-less handle: full causal attention over the tokens of this forward pass only.

    Padded layout: q (B, T, H, D); `mask` None or a key-padding mask [B, T] (bool, True = real
    token). Packed layout: q (N, H, D); `mask` None (one sequence) or segment ids (N,) (int,
    tokens of one sequence share an id and appear in order). Differentiable: use it to train.
    """

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any
    ) -> torch.Tensor:
        if q.dim() == 4:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|H_kv, T, D)
            allowed = None
            if mask is not None:
                T = q.shape[-2]
                causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
                allowed = causal & mask.bool()[:, None, None, :]  # (B, 1, T, T)
            return _sdpa(q, k, v, allowed).transpose(1, 2)  # (B, T, H, D)
        if q.dim() == 3:
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H|H_kv, N, D)
            allowed = None
            if mask is not None:
                N = q.shape[-2]
                causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
                allowed = causal & (mask[:, None] == mask[None, :])  # (N, N)
            return _sdpa(q, k, v, allowed)[0].transpose(0, 1)  # (N, H, D)
        raise ValueError(f"q must be (B, T, H, D) or (N, H, D), got {tuple(q.shape)}")


class StaticCacheAttention:
    """Preallocated dense cache `[layers, B, H_kv, max_len, D]`, every row the same length.

    Each forward pass appends its T tokens per row at column `length` and attends causally over
    columns [0, length + T); the pass over the last layer advances `length`. `mask` is None or a
    key-padding mask [B, max_len] (bool, True = real). For tests and benchmarks, not serving.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers, self.length = num_layers, 0

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any
    ) -> torch.Tensor:
        T = q.shape[1]
        start, end = self.length, self.length + T
        self.k[layer_idx, :, :, start:end] = k.transpose(1, 2)  # (B, H_kv, T, D)
        self.v[layer_idx, :, :, start:end] = v.transpose(1, 2)
        keys, values = self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]
        allowed = None
        if T > 1 or mask is not None:
            cols = torch.arange(end, device=q.device)
            rows = torch.arange(start, end, device=q.device)
            allowed = (cols[None, :] <= rows[:, None])[None, None]  # (1, 1, T, end)
            if mask is not None:
                allowed = allowed & mask[:, None, None, :end].bool()  # (B, 1, T, end)
        q = q.transpose(1, 2)  # (B, H, T, D)
        if allowed is None:  # one new token per row: it sees every cached key
            out = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
        else:
            out = _sdpa(q, keys, values, allowed)
        if layer_idx == self.num_layers - 1:
            self.length = end
        return out.transpose(1, 2)  # (B, T, H, D)
