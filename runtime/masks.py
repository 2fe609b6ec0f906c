"""Attention-mask builders shared by cache layouts (additive masks, dtype minimum on hidden keys)."""

from __future__ import annotations

import torch


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, the dtype minimum where it is not (never -inf: no NaN rows)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def padded_decode_mask(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mask `(B, 1, 1, S)` of a `[B, 1]` decode step: each row sees its own real keys only."""
    return additive_mask(key_valid[:, None, None, :], dtype)


def padded_prefill_mask(key_valid: torch.Tensor, num_queries: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """Mask `(B, 1, T, S)` of a left-padded prefill whose T queries are the last T columns.

    Query t (column `S - T + t`) sees real keys at columns `<= S - T + t`.
    """
    num_keys = key_valid.shape[1]
    q_col = torch.arange(num_keys - num_queries, num_keys, device=key_valid.device)
    causal = torch.arange(num_keys, device=key_valid.device)[None, :] <= q_col[:, None]  # (T, S)
    return additive_mask(causal[None, None] & key_valid[:, None, None, :], dtype)
