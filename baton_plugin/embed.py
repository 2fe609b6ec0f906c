"""Vector shaping and KV-cache embedding as pure tensor functions.

The insert path takes prefilled keys and values as data (`PrefilledKV`, or the cache's own
packed staging), so they can come from this device's prefill pass or from a separate prefill
worker; nothing here runs the model. Cache tensors are `(L, R, H_kv, C, D)`; a bucket occupies
a row range and a column window `[start, end)`, every row right-aligned at `end`.

Every column a bucket's attention reads is finite: real keys, zeros written when a window
widens over columns its rows never wrote, or stale keys of rows that left. The mask gives pad
columns the dtype minimum, whose softmax weight is exactly 0, and 0 x finite is 0 (0 x NaN
from uninitialised memory would not be), so the buffer itself can start uninitialised.
"""

from __future__ import annotations

import torch

from runtime.api import PrefilledKV  # the layout-neutral format a prefill worker ships


def embed_prefilled(k_cache: torch.Tensor, v_cache: torch.Tensor, kv: PrefilledKV,
                    index: int, row: int, end: int) -> None:
    """Copy sequence `index` of `kv` (its real keys) into cache `row`, ending at column `end`."""
    length = kv.lengths[index]
    src = slice(kv.width - length, kv.width)
    cols = slice(end - length, end)
    k_cache[:, row, :, cols] = kv.k[:, index, :, src].to(k_cache.device, k_cache.dtype)
    v_cache[:, row, :, cols] = kv.v[:, index, :, src].to(v_cache.device, v_cache.dtype)


def embed_packed(k_cache: torch.Tensor, v_cache: torch.Tensor, k_stage: torch.Tensor,
                 v_stage: torch.Tensor, offset: int, length: int, row: int, end: int) -> None:
    """Copy one prompt's staged keys `(L, N, H_kv, D)[:, offset:offset+length]` into `row`."""
    cols = slice(end - length, end)
    tokens = slice(offset, offset + length)
    k_cache[:, row, :, cols] = k_stage[:, tokens].transpose(1, 2)  # (L, H_kv, P, D)
    v_cache[:, row, :, cols] = v_stage[:, tokens].transpose(1, 2)


def zero_columns(k_cache: torch.Tensor, v_cache: torch.Tensor, rows: slice, lo: int,
                 hi: int) -> None:
    """Zero columns `[lo, hi)` of `rows` (pad a window is about to expose)."""
    if hi > lo and rows.stop > rows.start:
        k_cache[:, rows, :, lo:hi] = 0
        v_cache[:, rows, :, lo:hi] = 0


def move_row(k_cache: torch.Tensor, v_cache: torch.Tensor, src: int, dst: int, lo: int,
             hi: int) -> None:
    """Put row `src`'s columns `[lo, hi)` in row `dst` (all layers at once)."""
    k_cache[:, dst, :, lo:hi] = k_cache[:, src, :, lo:hi]
    v_cache[:, dst, :, lo:hi] = v_cache[:, src, :, lo:hi]


def shift_window(cache: torch.Tensor, scratch: torch.Tensor, rows: slice, lo: int, hi: int,
                 new_lo: int) -> None:
    """Move the window `[lo, hi)` of `rows` to start at `new_lo`, within the same buffer.

    Disjoint source and target copy directly; overlapping ones go layer by layer through
    `scratch` (one layer's rows, allocated once by the cache), so no temporary is allocated.
    """
    width = hi - lo
    if new_lo + width <= lo or new_lo >= hi:
        cache[:, rows, :, new_lo : new_lo + width] = cache[:, rows, :, lo:hi]
        return
    n = rows.stop - rows.start
    staged = scratch[:n, :, :width]
    for layer in range(cache.shape[0]):
        staged.copy_(cache[layer, rows, :, lo:hi])
        cache[layer, rows, :, new_lo : new_lo + width] = staged
