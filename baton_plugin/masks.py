"""BATON's attention masks, derived from each row's real length.

Every row of a bucket is right-aligned at the bucket window's end (left-padded), so a row's
real keys are always the last `lengths[b]` columns of the window: the padding mask `[B, S]` is
a function of the lengths alone and never needs to be stored or copied.
"""

from __future__ import annotations

import torch

from runtime.api import additive_mask


def padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Bool `(B, width)`, True on real keys: row b's last `lengths[b]` columns."""
    cols = torch.arange(width, device=lengths.device)
    return cols[None, :] >= (width - lengths)[:, None]  # (B, width)


def decode_mask(lengths: list[int], width: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor | None:
    """Additive `(B, 1, 1, width)` mask of a bucket's decode; None when it has no padding.

    `lengths` already count the key this step appends, so every row has at least one real key
    and no softmax row is all-masked. Without padding, no mask lets SDPA take its fast path.
    """
    if min(lengths) == width:
        return None
    lengths_t = torch.tensor(lengths, device=device)
    return additive_mask(padding_mask(lengths_t, width)[:, None, None, :], dtype)
