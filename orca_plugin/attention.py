"""Selective batching's split attention: each request attends to its own keys only.

The model runs every token-wise op on the packed `(N, ...)` tokens of the iteration; only the
attention is split per request and merged back. Two implementations of the split:

- `LoopAttention`, the literal one: per layer, one call per request (a causal SDPA for an
  initiation, two `bmm`s for an increment).
- `FusedAttention`: the increment (decode) requests of the iteration in ONE padded SDPA call
  per layer over keys gathered from their ranges (varlen batching of the attention op; the
  gather's padding is masked and counted as computed), initiations one call each as before.
- `KernelAttention`: the fused variant when the engine has its decode kernel: one call per
  layer that reads each request's range in place (no gather, no padding).

All write the iteration's keys and values into the pool in place with one `index_copy_` (the
kernel variant stores the decode rows' inside its call, `index_copy_` only the initiations').
A decode query uses the GQA fold: its `H` query heads become `G = H / H_kv` queries against
each KV head, so no K/V is repeated and a single request needs no mask.
"""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from orca_plugin.masks import OrcaMask
from runtime.api import DecodePlan, segment_attention

if TYPE_CHECKING:
    from orca_plugin.cache import OrcaLayout
    from runtime.api import DecodeKernel


@dataclass(slots=True)
class AttentionTimes:
    """Seconds spent in attention during one pass, split by who was attended (CPU only).

    The split lets the scheduler estimate how long decode rows waited on the iteration's
    prompts; timing on CUDA would need a synchronize per layer, so it stays off there.
    """

    enabled: bool = False
    initiation_s: float = 0.0
    decode_s: float = 0.0


class VariantChooser:
    """`attention: auto` without the decode kernel: pick, per iteration, the variant whose
    decode attention is cheaper (with the kernel, `auto` takes it: `OrcaKVCache._decode_group`).

    Both variants compute the same attention, so the choice only changes speed. Which one is
    faster depends on the machine and on its load (the fused gather is memory-bound, the loop
    dispatch-bound), so it is measured: seconds per decode row, the median of each variant's
    last `window` iterations (robust to a one-off stall and to warm-up), each variant measured
    `warmup` times first, and the slower one re-measured every `probe_every` iterations.

    A probe runs an iteration on the slower variant, which costs when the gap is wide (in
    bfloat16 on a CPU the literal loop's mean TPOT was 1.55x the kernel's). So
    while the slower variant stays at least `clear_margin` times the faster one's cost at each
    probe, the interval doubles, up to `max_probe_every`; once the gap narrows it is back to
    `probe_every`.
    """

    VARIANTS = ("fused", "loop")

    def __init__(self, probe_every: int = 16, window: int = 5, warmup: int = 2,
                 max_probe_every: int = 256, clear_margin: float = 1.5) -> None:
        self.probe_every = probe_every
        self.max_probe_every = max(max_probe_every, probe_every)
        self.clear_margin = clear_margin
        self.warmup = warmup
        self.samples: dict[str, collections.deque[float]] = {
            v: collections.deque(maxlen=window) for v in self.VARIANTS
        }
        self.num_choices = 0
        self.interval = probe_every
        self.next_probe = probe_every

    def cost(self, variant: str) -> float | None:
        """Median seconds per decode row of the recent iterations, None before any."""
        samples = self.samples[variant]
        return statistics.median(samples) if samples else None

    def choose(self) -> str:
        self.num_choices += 1
        for variant, samples in self.samples.items():
            if len(samples) < self.warmup:
                return variant
        best = min(self.VARIANTS, key=self.cost)
        if self.num_choices < self.next_probe:
            return best
        other = next(v for v in self.VARIANTS if v != best)
        clear = self.cost(other) >= self.clear_margin * self.cost(best)
        self.interval = min(2 * self.interval, self.max_probe_every) if clear else self.probe_every
        self.next_probe = self.num_choices + self.interval
        return other

    def record(self, variant: str, seconds: float, rows: int) -> None:
        self.samples[variant].append(seconds / rows)


def _one_query(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One request's decode query q `(H, D)` over its pool slice `(H_kv, S, D)` -> `(1, H, D)`.

    Two `bmm`s and a softmax: per call this is cheaper than SDPA's kernel dispatch on CPU,
    which dominates at one query (the loop makes `L x B` of these calls per iteration).
    """
    heads, dim = q.shape
    kv_heads = keys.shape[0]
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # 16-bit K/V under a wider model
    folded = q.view(kv_heads, heads // kv_heads, dim)  # (H_kv, G, D)
    scores = torch.bmm(folded, keys.transpose(1, 2)).mul_(dim**-0.5)  # (H_kv, G, S)
    out = torch.bmm(scores.softmax(-1), values)  # (H_kv, G, D)
    return out.view(1, heads, dim)


class LoopAttention:
    """One SDPA call per request: its queries against its own pool slice."""

    def __init__(self, planes: Sequence[tuple[torch.Tensor, torch.Tensor]], layout: OrcaLayout,
                 times: AttentionTimes, kernel: DecodeKernel | None = None) -> None:
        self.planes = planes  # per layer: the pool's (keys, values), each (H_kv, capacity, D)
        self.layout = layout
        self.times = times
        self.kernel = kernel  # the engine's kernels, for the initiations' prompt kernel
        self._initiations: torch.Tensor | None = None  # its segments, made at the first layer

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the pass's keys/values at their slots; return this layer's pool (H_kv, cap, D)."""
        keys, values = self.planes[layer_idx]
        slots = self.layout.write_slots  # k, v: (N, H_kv, D); rounded if the pool is 16-bit
        keys.index_copy_(1, slots, k.transpose(0, 1).to(keys.dtype))
        values.index_copy_(1, slots, v.transpose(0, 1).to(values.dtype))
        return keys, values

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: OrcaMask
    ) -> torch.Tensor:
        keys, values = self.write(layer_idx, k, v)
        started = time.perf_counter() if self.times.enabled else 0.0
        outputs = self.attend_decode(q, keys, values, mask)
        split = time.perf_counter() if self.times.enabled else 0.0
        outputs += self.attend_initiations(q, keys, values, mask)
        if self.times.enabled:
            self.times.decode_s += split - started
            self.times.initiation_s += time.perf_counter() - split
        return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]  # (N, H, D)

    def attend_decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: OrcaMask) -> list[torch.Tensor]:
        """The decode rows' outputs, in packed order: one call per request here."""
        return self.attend_segments(q, keys, values, mask, 0, self.layout.num_decode)

    def attend_initiations(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           mask: OrcaMask) -> list[torch.Tensor]:
        """The initiations' outputs, in packed order: each request's prompt causally over its
        own slot range. With the engine's prompt kernel, all of them in one call that reads
        each range in place (still per request: no request sees another's keys); else one
        SDPA call each."""
        lay = self.layout
        first, last = lay.num_decode, len(lay.segments)
        if first == last:
            return []
        if self.kernel is None or not self.kernel.attends_prompts(q, keys):
            return self.attend_segments(q, keys, values, mask, first, last)
        if self._initiations is None:
            dim = keys.shape[2]  # keys: (H_kv, capacity, D), contiguous
            self._initiations = torch.tensor(
                [[lay.segments[i].start, lay.segments[i].length, lay.segments[i].past,
                  lay.slot_starts[i] * dim] for i in range(first, last)])
        return [self.kernel.prompts(q, keys, values, self._initiations, keys.shape[2],
                                    keys.stride(0), keys.shape[0])]

    def attend_segments(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: OrcaMask,
        first: int,
        last: int,
    ) -> list[torch.Tensor]:
        """Requests `[first, last)` of the pass, one call each, outputs in packed order."""
        outputs = []
        for i in range(first, last):
            seg, start = self.layout.segments[i], self.layout.slot_starts[i]
            end = start + seg.past + seg.length
            if seg.length == 1:
                outputs.append(_one_query(q[seg.start], keys[:, start:end], values[:, start:end]))
                continue
            outputs.append(  # an initiation: causal, or masked when resumed
                segment_attention(
                    q[seg.start : seg.start + seg.length],
                    keys[:, start:end].transpose(0, 1),  # (S, H_kv, D) views
                    values[:, start:end].transpose(0, 1),
                    mask.segments[i],
                )
            )
        return outputs


class FusedAttention(LoopAttention):
    """The decode rows in one gather and a few padded SDPA calls per layer (one per group of
    similar lengths, `groups.plan_groups`); initiations as in the loop."""

    def attend_decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: OrcaMask) -> list[torch.Tensor]:
        lay = self.layout
        kv_heads, dim = keys.shape[0], keys.shape[2]  # keys: (H_kv, capacity, D), contiguous
        # One gather per plane over its (H_kv x capacity, D) rows (`gather_index` names every
        # head's copy of a slot): 1.5x faster here than a gather along the slot dimension.
        k_all = keys.view(-1, dim).index_select(0, lay.gather_index).to(q.dtype)
        v_all = values.view(-1, dim).index_select(0, lay.gather_index).to(q.dtype)
        k_all, v_all = k_all.view(kv_heads, -1, dim), v_all.view(kv_heads, -1, dim)
        outputs, offset = [], 0
        for g, group_mask in zip(lay.decode_groups, mask.decode, strict=True):
            shape = (kv_heads, g.rows, g.width, dim)
            keys_g = slice(offset, offset + g.num_keys)
            # batched over (H_kv, rows), GQA folded: a row's G query heads share its KV head
            q_g = q[g.first : g.first + g.rows].view(g.rows, kv_heads, -1, dim).transpose(0, 1)
            out = F.scaled_dot_product_attention(  # (H_kv, rows, G, D)
                q_g, k_all[:, keys_g].view(shape), v_all[:, keys_g].view(shape),
                attn_mask=group_mask.transpose(0, 1),  # (1, rows, 1, S)
            )
            outputs.append(out.transpose(0, 1).reshape(g.rows, -1, dim))
            offset += g.num_keys
        return outputs


class KernelAttention(LoopAttention):
    """The decode rows in ONE call per layer of the engine's decode kernel
    (`runtime.attention_kernels`), each row reading its own pool slot range in place: the
    fused variant without the gather or the padding. Initiations as in the loop.

    The kernel also stores each decode row's new key and value at the row's last slot (its
    `write_slots` entry), so only the initiations' tokens go through `index_copy_`: two
    indexed copies per layer cost 4 ms of a 200 ms 64-row decode pass on a 2-core host.
    """

    def __init__(self, planes: Sequence[tuple[torch.Tensor, torch.Tensor]], layout: OrcaLayout,
                 times: AttentionTimes, kernel: DecodeKernel) -> None:
        super().__init__(planes, layout, times, kernel)
        self.initiation_slots = layout.write_slots[layout.num_decode:]
        self.new_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # this layer's decode K/V

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the initiations' keys/values; keep the decode rows' for the kernel call."""
        keys, values = self.planes[layer_idx]
        n = self.layout.num_decode
        if k.shape[0] == n:  # a decode-only pass (most of them) needs no slicing
            self.new_kv = (k, v)
            return keys, values
        self.new_kv = (k[:n], v[:n])
        keys.index_copy_(1, self.initiation_slots, k[n:].transpose(0, 1).to(keys.dtype))
        values.index_copy_(1, self.initiation_slots, v[n:].transpose(0, 1).to(values.dtype))
        return keys, values

    def decode_plan(self) -> DecodePlan | None:
        """A decode-only iteration: `attend_decode`'s kernel call for every layer, which the
        compiled decoder's C++ attention op then makes itself (`runtime.api.DecodePlan`),
        reporting the seconds it took to this pass's attention times."""
        lay = self.layout
        if lay.num_decode != len(lay.segments):
            return None
        keys, values = zip(*self.planes, strict=True)
        on_done = self._add_decode_seconds if self.times.enabled else None
        return DecodePlan(keys, values, lay.kernel_offsets, lay.decode_lengths, keys[0].shape[2],
                          keys[0].stride(0), keys[0].shape[0], on_done)

    def _add_decode_seconds(self, seconds: float) -> None:
        self.times.decode_s += seconds

    def attend_decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: OrcaMask) -> list[torch.Tensor]:
        kv_heads, dim = keys.shape[0], keys.shape[2]  # keys: (H_kv, capacity, D)
        lay = self.layout
        new_k, new_v = self.new_kv
        rows = q if q.shape[0] == lay.num_decode else q[: lay.num_decode]
        return [self.kernel(rows.contiguous(), keys, values, lay.kernel_offsets,
                            lay.decode_lengths, dim, keys.stride(0), kv_heads, new_k, new_v)]
