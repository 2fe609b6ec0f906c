"""Prompts prefilled away from the decode engine: the K/V format and the pass that makes it.

A prefill worker (another process, device or machine) runs `prefill_kv` with nothing but the
model and ships `PrefilledKV` plus the last prompt token's logits; a decode engine whose KV
layout has `insert_prefilled(requests, kv)` embeds them (`Engine.add_prefilled`) and never
runs that prompt itself. The format is the layout-neutral contract between the two sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from runtime.packing import CAUSAL, segment_attention
from runtime.sdpa_backends import pass_sdpa_backends

if TYPE_CHECKING:
    from runtime.attention_kernels import DecodeKernel


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


class _PromptAttention:
    """Packed prompts, each causal on its own; their per-token K/V kept in `(L, N, H_kv, D)`."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, offsets: Sequence[int],
                 lengths: Sequence[int], kernel: DecodeKernel | None = None) -> None:
        self.k, self.v = k, v
        self.spans = [slice(o, o + n) for o, n in zip(offsets, lengths, strict=True)]
        self.kernel = kernel

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: object) -> torch.Tensor:
        """q `(N, H, D)`, k and v `(N, H_kv, D)` -> `(N, H, D)`."""
        keys, values = self.k[layer_idx], self.v[layer_idx]  # read back: one layout for both
        keys.copy_(k)
        values.copy_(v)
        outputs = [segment_attention(q[s], keys[s], values[s], CAUSAL, self.kernel)
                   for s in self.spans]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


@torch.inference_mode()
def prefill_kv(model: torch.nn.Module, token_lists: Sequence[Sequence[int]],
               kernel: DecodeKernel | None = None) -> tuple[PrefilledKV, torch.Tensor]:
    """The K/V of `token_lists` and the logits `(n, V)` of their last tokens.

    One packed pass (no pad token in any GEMM), each prompt attending causally to itself:
    the same arithmetic as an engine's own prompt pass, so greedy tokens match it. Pass the
    engine's kernels (`runtime.attention_kernels.choose_attention_backend(...).kernel`) to
    attend float32 and bfloat16 prompts through its prompt kernel, as the engine's own passes do.
    """
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    lengths = [len(t) for t in token_lists]
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    total, width = sum(lengths), max(lengths)
    dims = (cfg.num_hidden_layers, total, cfg.num_key_value_heads, cfg.head_dim)
    k_tok = torch.empty(dims, dtype=dtype, device=device)
    v_tok = torch.empty(dims, dtype=dtype, device=device)
    ids = torch.tensor([t for tokens in token_lists for t in tokens], device=device)
    pos = torch.tensor([p for n in lengths for p in range(n)], device=device)
    attention = _PromptAttention(k_tok, v_tok, offsets, lengths, kernel)
    with pass_sdpa_backends(device):  # prompt lengths vary from call to call
        hidden = model(ids, pos, attention, None)  # (N, h)
    last = torch.tensor([o + n - 1 for o, n in zip(offsets, lengths, strict=True)],
                        device=device)
    logits = model.compute_logits(hidden.index_select(0, last))
    shape = (cfg.num_hidden_layers, len(lengths), cfg.num_key_value_heads, width, cfg.head_dim)
    k = torch.zeros(shape, dtype=dtype, device=device)
    v = torch.zeros(shape, dtype=dtype, device=device)
    for i, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
        k[:, i, :, width - n :] = k_tok[:, o : o + n].transpose(1, 2)  # (L, H_kv, P, D)
        v[:, i, :, width - n :] = v_tok[:, o : o + n].transpose(1, 2)
    return PrefilledKV(k, v, tuple(lengths)), logits
