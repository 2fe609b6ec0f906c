"""Orca's attention masks: causal within each initiation, padding only in the fused decode group.

Selective batching never mixes requests inside one attention call's score matrix, except the
fused decode group, whose keys are gathered into a padded `(B_dec, S)` block: that block needs
a padding mask. Every other segment attends to exactly its own request's keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from orca_plugin.groups import DecodeGroup
from runtime.api import Segment, SegmentMask, additive_mask, segment_masks


@dataclass(frozen=True, slots=True)
class OrcaMask:
    """The mask of one iteration (`ForwardBatch.mask`), handed untouched to the attention handle.

    `segments[i]` is how request i of the pass sees its own keys (`runtime.api.segment_mask`:
    None for a single query, `CAUSAL` for a fresh prompt, a boolean `(n, past + n)` tensor for
    a prompt resumed after cached tokens). `decode` is the additive `(B_dec, 1, 1, S)` padding
    mask of the fused decode group, or None when the loop variant (or no group) is used.
    """

    segments: tuple[SegmentMask, ...]
    decode: torch.Tensor | None = None


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
    return OrcaMask(segment_masks(segments, device), decode)
