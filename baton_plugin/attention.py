"""BATON's attention handle for one pass (a standalone prefill worker is `runtime.prefill`).

A pass's tokens are packed `(N,)`: first the decode rows (one token each, bucket by bucket in
row order), then the newcomers' prompts. Attention is split the way the layout is:

- each bucket's decode rows in ONE `scaled_dot_product_attention` call per layer over the
  bucket's dense window (its rows are one strided view of the cache: no gather, no copy),
  with the bucket's padding mask;
- each prompt causally on its own (`is_causal`, no explicit mask, so the kernel skips the
  upper triangle), over its keys in the packed staging area `commit` embeds them from; with
  the engine's prompt kernel (float32 or bfloat16 on CPU), all prompts in one call per layer.

GQA through `enable_gqa=True`: K/V are never repeated. When the engine has its decode kernel
(`runtime.attention_kernels`), every bucket's decode rows go through ONE kernel call per layer
that reads each row's real keys in place: no padding read, no mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from runtime.api import (
    DecodePlan,
    prefill_kv,  # noqa: F401 - the prefill worker's pass, re-exported
)

if TYPE_CHECKING:
    from runtime.api import DecodeKernel


@dataclass(frozen=True, slots=True)
class DecodeSegment:
    """A bucket's decode rows: pass offset, count, first buffer row, window `[start, end]`."""

    offset: int
    rows: int
    first_row: int
    start: int
    end: int  # the column this pass appends; the window read is [start, end]


@dataclass(frozen=True, slots=True)
class PromptSegment:
    """A newcomer's prompt: pass offset and length (its staging rows are `offset - B_dec`)."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Staging:
    """Packed per-token K/V of a pass's prompts, `(L, N_cap, H_kv, D)` each; reused across passes."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass(frozen=True, slots=True)
class KernelRows:
    """The decode rows for the engine's decode kernel: where each row's real keys start in a
    layer's buffer (elements), how many, and the buffer's strides. Same for every layer."""

    offsets: torch.Tensor  # (B_dec,) int64
    counts: torch.Tensor  # (B_dec,) int64
    key_stride: int
    head_stride: int
    kv_heads: int


@dataclass(frozen=True, slots=True)
class BatonMask:
    """One additive mask per decode segment (None when the bucket has no padding)."""

    decode: tuple[torch.Tensor | None, ...]


class BatonAttention:
    """Writes a pass's K/V (decode rows at their bucket's column, prompts into staging) and
    attends as the module docstring says."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, staging: Staging | None,
                 decode: Sequence[DecodeSegment], prompts: Sequence[PromptSegment],
                 kernel: DecodeKernel | None = None, kernel_rows: KernelRows | None = None,
                 prompt_kernel: DecodeKernel | None = None, *,
                 layers: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]) -> None:
        """`layers`: the caches' per-layer views, made once by the cache (`BatonCache.layers`)."""
        self.k_cache, self.v_cache = k_cache, v_cache
        self.staging = staging
        self.decode = decode
        self.prompts = prompts
        self.num_decode = sum(s.rows for s in decode)
        self.kernel, self.kernel_rows = kernel, kernel_rows
        self.prompt_kernel = prompt_kernel
        self._prompt_segments: torch.Tensor | None = None  # made at the first layer
        self.k_layers, self.v_layers = layers

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: BatonMask | None) -> torch.Tensor:
        """q `(N, H, D)`, k and v `(N, H_kv, D)` -> `(N, H, D)`."""
        outputs = []
        if self.kernel is not None and self.decode:
            outputs.append(self._decode_kernel(layer_idx, q, k, v))
        else:
            masks = mask.decode if mask is not None else (None,) * len(self.decode)
            for seg, seg_mask in zip(self.decode, masks, strict=True):
                outputs.append(self._decode(layer_idx, seg, seg_mask, q, k, v))
        if self.prompts:
            outputs += self._prompts(layer_idx, q, k, v)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    def decode_plan(self) -> DecodePlan | None:
        """A decode-only pass on the kernel: `_decode_kernel`'s call for every layer, which
        the compiled decoder's C++ attention op then makes itself (`runtime.api.DecodePlan`)."""
        if self.kernel is None or self.prompts or not self.decode:
            return None
        r = self.kernel_rows
        return DecodePlan(self.k_layers, self.v_layers, r.offsets, r.counts, r.key_stride,
                          r.head_stride, r.kv_heads)

    def _decode_kernel(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> torch.Tensor:
        """Every bucket's decode rows in one kernel call, each row reading its real keys only.

        The kernel also writes each row's new key and value at its bucket's `end` column (the
        row's last real key): no indexed copy per bucket."""
        n, r = self.num_decode, self.kernel_rows
        if q.shape[0] != n:  # a decode-only pass (most of them) needs no slicing
            q, k, v = q[:n], k[:n], v[:n]
        return self.kernel(q.contiguous(), self.k_layers[layer], self.v_layers[layer],
                           r.offsets, r.counts, r.key_stride, r.head_stride, r.kv_heads, k, v)

    def _decode(self, layer: int, seg: DecodeSegment, mask: torch.Tensor | None,
                q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rows = slice(seg.first_row, seg.first_row + seg.rows)
        tokens = slice(seg.offset, seg.offset + seg.rows)
        k_rows, v_rows = self.k_cache[layer, rows], self.v_cache[layer, rows]  # (n, H_kv, C, D)
        k_rows[:, :, seg.end] = k[tokens]
        v_rows[:, :, seg.end] = v[tokens]
        cols = slice(seg.start, seg.end + 1)
        out = F.scaled_dot_product_attention(  # 16-bit K/V under a wider model: widened
            q[tokens].unsqueeze(2),  # (n, H, 1, D)
            k_rows[:, :, cols].to(q.dtype),  # (n, H_kv, W + 1, D)
            v_rows[:, :, cols].to(q.dtype),
            attn_mask=mask,
            enable_gqa=True,
        )
        return out.squeeze(2)  # (n, H, D)

    def _prompts(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> list[torch.Tensor]:
        first = self.num_decode
        count = q.shape[0] - first
        k_stage = self.staging.k[layer, :count]  # (N_p, H_kv, D)
        v_stage = self.staging.v[layer, :count]
        k_stage.copy_(k[first:])
        v_stage.copy_(v[first:])
        if self.prompt_kernel is not None and self.prompt_kernel.attends_prompts(q, k_stage):
            return [self._prompts_kernel(layer, q)]
        outputs = []
        for seg in self.prompts:
            tokens = slice(seg.offset, seg.offset + seg.length)
            staged = slice(seg.offset - first, seg.offset - first + seg.length)
            out = F.scaled_dot_product_attention(  # 4-D: CPU's flash kernel rejects 3-D
                q[tokens].transpose(0, 1)[None],  # (1, H, P, D)
                k_stage[staged].transpose(0, 1)[None],  # (1, H_kv, P, D)
                v_stage[staged].transpose(0, 1)[None],
                is_causal=True,
                enable_gqa=True,
            )
            outputs.append(out[0].transpose(0, 1))  # (P, H, D)
        return outputs

    def _prompts_kernel(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Every prompt in one call of the engine's prompt kernel, each causal over its own
        staged keys, read in place: `(N_p, H, D)`, the prompts in order."""
        k_layer, v_layer = self.staging.k[layer], self.staging.v[layer]  # (N_cap, H_kv, D)
        if self._prompt_segments is None:
            first, per_token = self.num_decode, k_layer.stride(0)
            self._prompt_segments = torch.tensor(
                [[p.offset, p.length, 0, (p.offset - first) * per_token] for p in self.prompts])
        return self.prompt_kernel.prompts(q, k_layer, v_layer, self._prompt_segments,
                                          k_layer.stride(0), k_layer.stride(1), k_layer.shape[1])
