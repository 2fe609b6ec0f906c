"""BATON's attention masks, derived from each row's real length.

Every row of the batch cache is right-aligned at the window's end (left-padded), so a row's
real keys are always the last `lengths[b]` columns of the window: the padding mask `[B, S]` is
a function of the lengths alone and never needs to be stored or copied.
"""

from __future__ import annotations

import torch

from runtime.masks import additive_mask, padded_prefill_mask


def padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Bool `(B, width)`, True on real keys: row b's last `lengths[b]` columns."""
    cols = torch.arange(width, device=lengths.device)
    return cols[None, :] >= (width - lengths)[:, None]  # (B, width)


def decode_mask(lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive `(B, 1, 1, width)` mask of a `[B, 1]` decode step; dtype minimum on padding.

    `lengths` already count the key this step appends, so every row has at least one real key
    and no softmax row is all-masked.
    """
    return additive_mask(padding_mask(lengths, width)[:, None, None, :], dtype)


def prefill_mask(lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive `(n, 1, T, T)` mask of a left-padded prefill: causal and padding together."""
    return padded_prefill_mask(padding_mask(lengths, width), width, dtype)
