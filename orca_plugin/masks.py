"""Orca's attention masks: causal within each initiation, padding only in the fused decode group.

Selective batching never mixes requests inside one attention call's score matrix, except the
fused decode group, whose keys are gathered into a padded `(B_dec, S)` block: that block needs
a padding mask. Every other segment attends to exactly its own request's keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from orca_plugin.groups import DecodeGroup
from runtime.default_cache import Segment
from runtime.masks import additive_mask

CAUSAL: Literal["causal"] = "causal"
"""A prompt starting at position 0: SDPA's own `is_causal` (queries and keys both `0..n-1`)."""

SegmentMask = torch.Tensor | Literal["causal"] | None


@dataclass(frozen=True, slots=True)
class OrcaMask:
    """The mask of one iteration, handed untouched from the mask hook to the attention handle.

    `segments[i]` is how request i of the pass sees its own keys: None (a single query sees
    every cached key), `CAUSAL` (a fresh prompt), or a boolean `(n, past + n)` tensor (a
    prompt resumed after cached tokens). `decode` is the additive `(B_dec, 1, 1, S)` padding
    mask of the fused decode group, or None when the loop variant (or no group) is used.
    """

    segments: tuple[SegmentMask, ...]
    decode: torch.Tensor | None = None


def segment_mask(seg: Segment, device: torch.device) -> SegmentMask:
    """Causal within the request: query i (position `past + i`) sees keys `0..past + i`."""
    if seg.length == 1:
        return None
    if seg.past == 0:
        return CAUSAL
    q_pos = torch.arange(seg.length, device=device).unsqueeze(1) + seg.past
    k_pos = torch.arange(seg.past + seg.length, device=device).unsqueeze(0)
    return k_pos <= q_pos  # (n, past + n)


def decode_padding_mask(lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive `(B_dec, 1, 1, width)`: row b sees its first `lengths[b]` gathered keys.

    `lengths` include the key this iteration writes, so no row is fully masked.
    """
    cols = torch.arange(width, device=lengths.device)
    return additive_mask((cols[None, :] < lengths[:, None])[:, None, None, :], dtype)


def build_orca_mask(
    segments: Sequence[Segment],
    decode_lengths: torch.Tensor | None,
    groups: Sequence[DecodeGroup],
    dtype: torch.dtype,
    device: torch.device,
) -> OrcaMask:
    """The iteration's mask from its segments and (fused only) the decode groups' key lengths."""
    decode = ()
    if decode_lengths is not None:
        decode = tuple(
            decode_padding_mask(decode_lengths[g.first : g.first + g.rows], g.width, dtype)
            for g in groups
        )
    return OrcaMask(tuple(segment_mask(s, device) for s in segments), decode)
