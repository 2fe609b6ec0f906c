"""Vector shaping and KV-cache embedding as pure tensor functions.

The insert path takes prefilled keys and values as data (`PrefilledKV`), so they can come
from this device's own prefill pass (the default) or from a separate prefill worker; nothing
here runs the model. Cache tensors are `(L, B_cap, H_kv, S_cap, D)`; a batch occupies rows
`[0, B)` and the column window `[start, end)`, every row right-aligned at `end`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class PrefilledKV:
    """Keys and values of n prefilled sequences, left-padded to a common length T.

    `k`, `v`: `(L, n, H_kv, T, D)`, after RoPE at positions `0..P_i-1`; sequence i is
    right-aligned, its real keys are the last `lengths[i]` columns. Pad columns must be
    finite (they are masked with the dtype minimum, and 0 * inf would be NaN).
    """

    k: torch.Tensor
    v: torch.Tensor
    lengths: tuple[int, ...]

    @property
    def width(self) -> int:
        return self.k.shape[3]

    @property
    def num_rows(self) -> int:
        return self.k.shape[1]


def left_pad(
    token_lists: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and true positions `(n, T)` of sequences right-aligned at column T."""
    width = max(len(t) for t in token_lists)
    ids = [[0] * (width - len(t)) + list(t) for t in token_lists]
    pos = [[0] * (width - len(t)) + list(range(len(t))) for t in token_lists]
    return (
        torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(pos, dtype=torch.long, device=device),
    )


def shaped_start(start: int, end: int, num_rows: int, new_width: int) -> int:
    """Window start after inserting sequences of up to `new_width` keys (vector shaping).

    A longer newcomer pads the whole batch on the left: `start` moves left, nothing is copied.
    A shorter one is padded itself (it is right-aligned inside the existing window).
    """
    return min(start, end - new_width) if num_rows else end - new_width


def embed_rows(
    k_cache: torch.Tensor, v_cache: torch.Tensor, kv: PrefilledKV, first_row: int, end: int
) -> None:
    """Copy `kv`'s rows into rows `[first_row, first_row + n)`, columns `[end - T, end)`.

    One copy for all n rows: their own left padding comes along and stays masked.
    """
    rows = slice(first_row, first_row + kv.num_rows)
    cols = slice(end - kv.width, end)
    k_cache[:, rows, :, cols] = kv.k.to(k_cache.device, k_cache.dtype)
    v_cache[:, rows, :, cols] = kv.v.to(v_cache.device, v_cache.dtype)


def move_row(
    k_cache: torch.Tensor, v_cache: torch.Tensor, src: int, dst: int, lo: int, hi: int
) -> None:
    """Fill the hole at row `dst` with row `src`'s columns `[lo, hi)` (all layers at once)."""
    k_cache[:, dst, :, lo:hi] = k_cache[:, src, :, lo:hi]
    v_cache[:, dst, :, lo:hi] = v_cache[:, src, :, lo:hi]


def relocate(
    src: torch.Tensor, dst: torch.Tensor, num_rows: int, lo: int, hi: int, new_lo: int
) -> None:
    """Copy the window `[lo, hi)` of rows `[0, num_rows)` to `[new_lo, ...)` of `dst`.

    Layer by layer, cloning when `src is dst` so overlapping windows copy correctly while the
    transient memory stays one layer's window.
    """
    width = hi - lo
    for layer in range(src.shape[0]):
        window = src[layer, :num_rows, :, lo:hi]  # (B, H_kv, W, D)
        if src is dst:
            window = window.clone()
        dst[layer, :num_rows, :, new_lo : new_lo + width] = window
