"""The packed-batch toolkit: every request's pending tokens laid end to end in one `(N,)` pass.

Selective batching (Orca) runs the token-wise GEMMs on all tokens at once and splits only the
attention per request. Layouts that pack build their passes from these pieces: `pack` lays the
tokens out as `Segment`s, `segment_mask` says how a segment sees its own keys,
`segment_attention` attends one segment, `attention_pairs` counts the work. The default
per-request layout, Orca's pool and the paged layout of docs/writing-a-scheduler.md use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from runtime.kv_cache import ForwardBatch, PassStats, Phase
from runtime.request import Request

if TYPE_CHECKING:
    from runtime.attention_kernels import DecodeKernel

CAUSAL: Literal["causal"] = "causal"
"""A segment's mask when it starts at position 0: SDPA's own `is_causal`, no explicit mask."""

SegmentMask = torch.Tensor | Literal["causal"] | None


@dataclass(frozen=True, slots=True)
class Segment:
    """Where one request's tokens sit in a packed pass and how many of its keys are cached."""

    start: int
    length: int
    past: int

    @property
    def stop(self) -> int:
        """One past the segment's last token in the pass."""
        return self.start + self.length

    @property
    def prefill(self) -> bool:
        """It feeds a prompt (after a preemption: prompt and outputs), not one decode token."""
        return self.past == 0 or self.length > 1


@dataclass(frozen=True, slots=True)
class Packed:
    """Requests' pending tokens end to end, and the last token of each, which is sampled."""

    requests: tuple[Request, ...]
    segments: tuple[Segment, ...]
    input_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,) each token's position in its own request
    sample_indices: torch.Tensor  # (B,)

    @property
    def phase(self) -> Phase:
        prefill = [s.prefill for s in self.segments]
        return Phase.PREFILL if all(prefill) else Phase.DECODE if not any(prefill) \
            else Phase.MIXED

    def batch(self, layout: Any = None, mask: Any = None) -> ForwardBatch:
        """The pass over these tokens, sampling every request; by default the segments are its
        `layout` and `segment_masks` its `mask`."""
        device = self.input_ids.device
        return ForwardBatch(
            requests=self.requests,
            input_ids=self.input_ids,
            positions=self.positions,
            num_new_tokens=tuple(s.length for s in self.segments),
            sample_indices=self.sample_indices,
            sampled_requests=self.requests,
            phase=self.phase,
            layout=self.segments if layout is None else layout,
            mask=segment_masks(self.segments, device) if mask is None else mask,
        )


def pack(requests: Sequence[Request], device: torch.device) -> Packed:
    """Lay out every request's pending tokens (`pending_token_ids()`), in the order given."""
    ids: list[int] = []
    positions: list[int] = []
    segments: list[Segment] = []
    for req in requests:
        pending = req.pending_token_ids()
        past = req.num_computed_tokens
        segments.append(Segment(len(ids), len(pending), past))
        ids.extend(pending)
        positions.extend(range(past, past + len(pending)))
    sample = [s.stop - 1 for s in segments]
    return Packed(tuple(requests), tuple(segments),
                  torch.tensor(ids, dtype=torch.long, device=device),
                  torch.tensor(positions, dtype=torch.long, device=device),
                  torch.tensor(sample, dtype=torch.long, device=device))


def packed_batch(requests: Sequence[Request], device: torch.device) -> ForwardBatch:
    """One pass over every request's pending tokens, its segments as `layout`, causal masks."""
    return pack(requests, device).batch()


def segment_mask(seg: Segment, device: torch.device) -> SegmentMask:
    """Causal within the request: query i (position `past + i`) sees keys `0..past + i`.

    None for a single query (it sees every cached key), `CAUSAL` for a prompt from position 0,
    else a boolean `(n, past + n)` mask (a prompt resumed after cached keys).
    """
    if seg.length == 1:
        return None
    if seg.past == 0:
        return CAUSAL
    q_pos = torch.arange(seg.length, device=device).unsqueeze(1) + seg.past
    k_pos = torch.arange(seg.past + seg.length, device=device).unsqueeze(0)
    return k_pos <= q_pos  # (n, past + n)


def segment_masks(segments: Sequence[Segment], device: torch.device) -> tuple[SegmentMask, ...]:
    return tuple(segment_mask(s, device) for s in segments)


def segment_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: SegmentMask, kernel: DecodeKernel | None = None) -> torch.Tensor:
    """One segment's queries q `(n, H, D)` over its request's keys `(S, H_kv, D)` -> `(n, H, D)`,
    `mask` being `segment_mask`'s for the segment.

    With the engine's kernel (`runtime.attention_kernels`) a prompt goes through its causal
    prompt kernel where that applies (float32 or bfloat16 on CPU): the segment's queries are the last
    `n` positions of `S`, so a resumed prompt needs no mask either. Otherwise SDPA, with
    4-D inputs on purpose: on CPU, SDPA takes its flash kernel only for 4-D tensors (3-D ones
    fall back to the math path, about 30x slower for a 300-token prompt). Keys and values
    stored in 16 bits under a wider model (`kv_cache_dtype`) are widened to q's dtype.
    """
    if (kernel is not None and mask is not None and keys.stride() == values.stride()
            and kernel.attends_prompts(q, keys)):
        return kernel.segment(q, keys, values, keys.shape[0] - q.shape[0])
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # no copy when they already are
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # (1, H, n, D)
        keys.transpose(0, 1)[None],  # (1, H_kv, S, D)
        values.transpose(0, 1)[None],
        attn_mask=None if mask is CAUSAL else mask,
        is_causal=mask is CAUSAL,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)  # (n, H, D)


def attention_pairs(segments: Sequence[Segment]) -> tuple[int, int]:
    """(useful, computed) (query, key) pairs of segments attended with `segment_mask`.

    Useful pairs are the causal ones. A causal prompt and a single query compute only those;
    an explicit mask (a resumed prompt) makes the kernel score its whole `n x (past + n)`.
    """
    useful = computed = 0
    for s in segments:
        pairs = s.length * s.past + s.length * (s.length + 1) // 2
        useful += pairs
        computed += s.length * (s.past + s.length) if s.length > 1 and s.past > 0 else pairs
    return useful, computed


def packed_pass_stats(batch: ForwardBatch) -> PassStats:
    """Stats of a packed pass without padding: every token slot useful, causal attention."""
    segments = [Segment(0, n, req.num_computed_tokens)
                for req, n in zip(batch.requests, batch.num_new_tokens, strict=True)]
    useful, computed = attention_pairs(segments)
    tokens = int(batch.input_ids.numel())
    return PassStats(batch.phase, len(batch.requests), sum(batch.num_new_tokens), tokens,
                     useful, computed)
