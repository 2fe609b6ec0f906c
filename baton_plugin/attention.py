"""The attention handles of BATON's two kinds of pass, and a standalone prefill worker.

Both make exactly one `scaled_dot_product_attention` call per layer for the whole pass
(GQA through `enable_gqa=True`, K/V never repeated), never a per-request loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from baton_plugin.embed import PrefilledKV, left_pad
from baton_plugin.masks import prefill_mask

if TYPE_CHECKING:
    from baton_plugin.cache import BatonCache


class StagingAttention:
    """Prefill pass: keep this pass's K/V in a staging `PrefilledKV`, attend within it."""

    def __init__(self, staged: PrefilledKV) -> None:
        self.staged = staged

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any
    ) -> torch.Tensor:
        keys, values = self.staged.k[layer_idx], self.staged.v[layer_idx]  # (n, H_kv, T, D)
        keys.copy_(k.transpose(1, 2))
        values.copy_(v.transpose(1, 2))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True
        )  # (n, H, T, D)
        return out.transpose(1, 2)  # (n, T, H, D)


class WindowAttention:
    """Decode pass: append every row's new K/V at column `end`, attend over `[start, end]`."""

    def __init__(self, cache: BatonCache, start: int, end: int) -> None:
        self.cache = cache
        self.start = start
        self.end = end

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any
    ) -> torch.Tensor:
        rows = q.shape[0]
        k_layer = self.cache.k[layer_idx, :rows]  # (B, H_kv, S_cap, D)
        v_layer = self.cache.v[layer_idx, :rows]
        k_layer[:, :, self.end] = k[:, 0]  # (B, H_kv, D)
        v_layer[:, :, self.end] = v[:, 0]
        cols = slice(self.start, self.end + 1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k_layer[:, :, cols],
            v_layer[:, :, cols],
            attn_mask=mask,
            enable_gqa=True,
        )  # (B, H, 1, D)
        return out.transpose(1, 2)  # (B, 1, H, D)


def empty_staging(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    lengths: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
) -> PrefilledKV:
    """Uninitialised staging for a prefill pass; the pass writes every column, pads included."""
    dims = (num_layers, len(lengths), num_kv_heads, max(lengths), head_dim)
    return PrefilledKV(
        torch.empty(dims, dtype=dtype, device=device),
        torch.empty(dims, dtype=dtype, device=device),
        tuple(lengths),
    )


@torch.inference_mode()
def prefill_kv(
    model: torch.nn.Module, token_lists: Sequence[Sequence[int]]
) -> tuple[PrefilledKV, torch.Tensor]:
    """A prefill worker: the K/V of `token_lists` and the logits `(n, V)` of their last tokens.

    What `BatonCache.insert_prefilled` takes, computed with nothing but the model, so another
    process or device can do it while the batch keeps decoding.
    """
    cfg = model.config
    param = next(model.parameters())
    ids, pos = left_pad(token_lists, param.device)  # (n, T)
    lengths = [len(t) for t in token_lists]
    staged = empty_staging(
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.head_dim,
        lengths,
        param.device,
        param.dtype,
    )
    mask = prefill_mask(torch.tensor(lengths, device=param.device), staged.width, param.dtype)
    hidden = model(ids, pos, StagingAttention(staged), mask)  # (n, T, hidden)
    return staged, model.compute_logits(hidden[:, -1])
