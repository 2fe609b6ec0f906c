"""Orca's attention K/V manager: one pool, a contiguous reserved range per request.

A request starting its initiation reserves `prompt_len + max_tokens` slots (the admission
rule charges exactly that); its keys and values live in `pool[:, :, :, start:start + size]`,
so every cache write is in place and each request's keys are one slice per KV head (the
per-request split of selective batching reads them without copying). Every iteration is one
packed pass over all running requests: decode (increment) requests first, by context length,
then initiations (further passes of the same iteration for initiations past
`max_pass_tokens`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from orca_plugin.attention import (
    AttentionTimes,
    FusedAttention,
    KernelAttention,
    LoopAttention,
    VariantChooser,
)
from orca_plugin.groups import DecodeGroup, plan_groups
from orca_plugin.masks import build_orca_mask
from orca_plugin.slots import SlotAllocator
from runtime.api import (
    KVCache,
    MemoryStats,
    PassStats,
    attention_pairs,
    kv_elements_per_token,
    pack,
)

if TYPE_CHECKING:
    from runtime.api import CacheLimits, ForwardBatch, ModelShape, Request, Segment

AttentionMode = Literal["auto", "fused", "loop"]
MIN_POOL_TOKENS = 256  # first allocation; the pool then doubles up to `kv_cache_tokens`


@dataclass(frozen=True, slots=True)
class OrcaLayout:
    """Where each request of one iteration sits: packed tokens, pool slots, attention group.

    Requests `[0, num_decode)` feed one token each (increments, shortest context first); the
    rest are initiations. The fused fields are set only when the decode rows are attended in
    padded groups (`FusedAttention`); otherwise every request is attended on its own.
    """

    segments: tuple[Segment, ...]
    slot_starts: tuple[int, ...]
    write_slots: torch.Tensor  # (N,) pool slot of every token of the pass
    num_decode: int
    num_initiation_tokens: int
    decode_lengths: torch.Tensor | None = None  # (B_dec,) keys per decode row, new one included
    decode_groups: tuple[DecodeGroup, ...] = ()  # fused: rows padded together, by length
    gather_index: torch.Tensor | None = None  # (H_kv x sum of rows x width,) head-major
    kernel_offsets: torch.Tensor | None = None  # (B_dec,) decode kernel: each row's first key


def split_iteration(running: Sequence[Request], max_pass_tokens: int | None
                    ) -> list[list[Request]]:
    """An iteration's requests as passes: the decode rows and the initiations that fit in
    `max_pass_tokens` tokens first, then the rest of the initiations, in order, packed up to
    the limit (a prompt over it runs in a pass of its own). None: one pass.

    Why: a pass of many prompt tokens runs slower per token on a CPU (a 9,600-token pass ran
    at 0.86x the rate of 2,400-token ones: its activations outgrow the caches and the
    allocator's reuse), so bounded passes give Orca the same engine-wide rate BATON's
    `max_prefill_tokens` passes get, without changing whom an iteration serves.
    """
    if max_pass_tokens is None:
        return [list(running)] if running else []
    sizes = [(req, len(req.pending_token_ids())) for req in running]
    passes: list[list[Request]] = [[req for req, n in sizes if n == 1]]  # decode rows
    tokens = len(passes[0])
    for req, n in sizes:
        if n == 1:
            continue
        if passes[-1] and tokens + n > max_pass_tokens:
            passes.append([])
            tokens = 0
        passes[-1].append(req)
        tokens += n
    if not passes[0]:  # no running requests
        return []
    return passes


class OrcaKVCache(KVCache):
    """The pool `(L, 2, H_kv, capacity, D)`: head-major, so a request's slice `(H_kv, n, D)`
    holds each head's keys contiguously (the decode kernel read a token-major pool, where a
    head's keys lie at a stride of `H_kv * D`, 1.25-1.3x slower on a 2-core AVX2 host)."""

    def __init__(
        self,
        shape: ModelShape,
        limits: CacheLimits,
        device: torch.device,
        dtype: torch.dtype,
        kv_cache_tokens: int,
        attention: AttentionMode = "auto",
        time_attention: bool = True,
        max_pass_tokens: int | None = None,
    ) -> None:
        """`kv_cache_tokens` is Orca's slot budget `n_slots`: what admission may reserve;
        `max_pass_tokens` splits an iteration's initiations over passes (None: one pass)."""
        limits = dataclasses.replace(limits, kv_cache_tokens=kv_cache_tokens)
        super().__init__(shape, limits, device, dtype)
        self.mode = attention
        self.max_pass_tokens = max_pass_tokens
        self.slots = SlotAllocator()
        self._set_pool(self._empty_pool(0))
        self.time_attention = time_attention and self.device.type == "cpu"
        if attention == "auto" and not self.time_attention:
            self.mode = "fused"  # nothing to measure with (CUDA): the batched call
        self.chooser = VariantChooser()
        # the current iteration's passes, in order: (layout, attention times) of each
        self.iteration_passes: list[tuple[OrcaLayout, AttentionTimes]] = []

    @property
    def last_layout(self) -> OrcaLayout | None:
        """The layout of the pass that ran last (None before any)."""
        return self.iteration_passes[-1][0] if self.iteration_passes else None

    @property
    def last_times(self) -> AttentionTimes:
        """The attention timings of the pass that ran last (empty before any)."""
        return self.iteration_passes[-1][1] if self.iteration_passes else AttentionTimes()

    @property
    def pool_tokens(self) -> int:
        """Slots physically allocated so far (grows on demand up to `kv_cache_tokens`)."""
        return self.slots.capacity

    def _set_pool(self, pool: torch.Tensor) -> None:
        """Install `pool` with its per-layer `(keys, values)` planes, each `(H_kv, cap, D)`,
        made once here rather than by two indexing ops per layer of every pass (about 0.5 ms
        of a 29 ms one-row step of a 30-layer model)."""
        self.pool = pool
        self.planes = [(layer[0], layer[1]) for layer in pool.unbind(0)]

    def _empty_pool(self, capacity: int) -> torch.Tensor:
        s = self.shape
        dims = (s.num_layers, 2, s.num_kv_heads, capacity, s.head_dim)
        return torch.empty(dims, dtype=self.kv_dtype, device=self.device)

    def add(self, request: Request) -> None:
        size = self.reservation(request)
        budget = self.kv_cache_tokens
        if self.slots.ranges and self.slots.reserved + size > budget:
            raise RuntimeError(
                f"{request.request_id}: {size} slots exceed the free "
                f"{budget - self.slots.reserved} of kv_cache_tokens={budget}"
            )
        start = self.slots.find(size)
        limit = max(budget, size)  # a lone request over the budget still fits
        if start is None and self.slots.capacity < limit:
            want = max(2 * self.slots.capacity, self.slots.high_water + size, MIN_POOL_TOKENS)
            self._grow(min(want, limit))
            start = self.slots.find(size)
        if start is None:
            self._compact()
            start = self.slots.find(size)
        self.slots.place(request, start, size)

    def _grow(self, capacity: int) -> None:
        """Reallocate the pool larger, keeping every live range at its offset."""
        pool = self._empty_pool(capacity)
        live = self.slots.high_water
        pool[:, :, :, :live] = self.pool[:, :, :, :live]
        self._set_pool(pool)
        self.slots.capacity = capacity

    def _compact(self) -> None:
        """Close the holes between ranges (fragmentation), copying each moved request's keys."""
        for req, old, new in self.slots.compact():
            used = min(req.num_computed_tokens, old.size)
            src = self.pool[:, :, :, old.start : old.start + used].clone()
            self.pool[:, :, :, new.start : new.start + used] = src

    def free(self, request: Request) -> None:
        self.slots.release(request)

    def forward_batches(self, running: Sequence[Request]) -> Iterator[ForwardBatch]:
        """One pass per iteration over every running request, decode rows first; with
        `max_pass_tokens`, initiations that do not fit run in further passes of the same
        iteration (every request still advances this step, as Orca schedules it)."""
        self.iteration_passes = []
        for group in split_iteration(running, self.max_pass_tokens):
            yield self._iteration(group)

    def _iteration(self, running: Sequence[Request]) -> ForwardBatch:
        decode = [r for r in running if len(r.pending_token_ids()) == 1]
        ordered = sorted(decode, key=lambda r: r.num_computed_tokens)  # fused groups by length
        num_decode = len(ordered)
        ordered += [r for r in running if len(r.pending_token_ids()) != 1]
        packed = pack(ordered, self.device)
        segments = packed.segments
        starts = [self.slots.ranges[req].start for req in ordered]
        slots = [slot for seg, start in zip(segments, starts, strict=True)
                 for slot in range(start + seg.past, start + seg.past + seg.length)]
        layout = OrcaLayout(
            segments,
            tuple(starts),
            torch.tensor(slots, device=self.device),
            num_decode,
            sum(s.length for s in segments if s.prefill),
            **self._decode_group(segments[:num_decode], starts[:num_decode]),
        )
        mask = build_orca_mask(segments, layout.decode_lengths, layout.decode_groups,
                               self.dtype, self.device)
        return packed.batch(layout, mask)

    def _decode_group(self, segments: Sequence[Segment], starts: Sequence[int]) -> dict:
        """Fused: the decode rows' padded groups and gather indices (pads repeat slot 0).

        Rows arrive sorted by length, so each group pads only to its own longest row. A pad
        points at a slot its row has written, so masked-out values are finite. With the
        engine's decode kernel, the fused variant is one kernel call per layer instead: each
        row's own slot range read in place (no gather, no padding).

        One decode row has nothing to choose between (the loop's one call is the batched
        call), so it takes the kernel where there is one: the loop's per-layer Python and
        indexed writes cost about 4 ms of a 24 ms one-row step on a 2-core host. Without the
        kernel, a gather of one row would only add a copy, so it stays in the loop, as does
        every row of the literal `loop`.

        With the kernel, `auto` takes it without measuring the loop: the kernel reads the same
        slot ranges in place as the loop does, in one call per layer instead of `2 x B_dec`,
        so the loop cannot be the faster one, and each probe of it cost a slow iteration (on
        `varied-64`, bfloat16, the probes made `auto` about 0.93x `fused`'s throughput). The
        chooser weighs the gather against the loop, which is what differs by machine and load.
        """
        if not segments or self.mode == "loop":
            return {}
        if self.decode_kernel is not None:  # `fused` and `auto` alike: the kernel
            variant = "fused"
        elif len(segments) == 1:
            variant = "loop"
        else:
            variant = self.chooser.choose() if self.mode == "auto" else self.mode
        if variant != "fused":
            return {}
        dev = self.device
        lengths = torch.tensor([s.past + 1 for s in segments], device=dev)
        first = torch.tensor(starts, device=dev)
        if self.decode_kernel is not None:  # each row's slot range read in place, no padding
            return {"decode_lengths": lengths, "kernel_offsets": first * self.shape.head_dim}
        groups = plan_groups([s.past + 1 for s in segments])
        index = []
        for g in groups:
            rows = slice(g.first, g.first + g.rows)
            cols = torch.arange(g.width, device=dev)[None, :]
            index.append(first[rows, None] + torch.where(cols < lengths[rows, None], cols, 0))
        index = torch.cat([i.reshape(-1) for i in index])
        heads = torch.arange(self.shape.num_kv_heads, device=dev)[:, None] * self.slots.capacity
        index = (heads + index).reshape(-1)  # each head's copy: rows of the (H_kv * cap, D) view
        return {"decode_lengths": lengths, "decode_groups": groups, "gather_index": index}

    def attention(self, batch: ForwardBatch) -> LoopAttention | FusedAttention:
        times = AttentionTimes(enabled=self.time_attention)
        self.iteration_passes.append((batch.layout, times))
        lay: OrcaLayout = batch.layout
        if lay.kernel_offsets is not None:
            return KernelAttention(self.planes, lay, times, self.decode_kernel)
        cls = FusedAttention if lay.gather_index is not None else LoopAttention
        return cls(self.planes, lay, times, self.decode_kernel)

    def commit(self, batch: ForwardBatch) -> None:
        """Feed `auto` its measurement; lengths need no update (`num_computed_tokens` is it)."""
        lay: OrcaLayout = batch.layout
        if self.mode == "auto" and lay.num_decode >= 2 and self.last_times.enabled:
            fused = lay.gather_index is not None or lay.kernel_offsets is not None
            variant = "fused" if fused else "loop"
            self.chooser.record(variant, self.last_times.decode_s, lay.num_decode)

    def memory_stats(self) -> MemoryStats:
        """Allocated = reserved slots (what requests hold); used = slots with real K/V."""
        per_token = kv_elements_per_token(self.shape)
        reserved = self.slots.reserved
        used = sum(r.num_computed_tokens for r in self.slots.ranges)
        return MemoryStats(
            reserved * per_token, used * per_token, reserved, used, len(self.slots.ranges)
        )

    def pass_stats(self, batch: ForwardBatch) -> PassStats:
        """Token slots are all useful (packed); fused decode padding counts as computed pairs."""
        lay: OrcaLayout = batch.layout
        useful, computed = attention_pairs(lay.segments)
        if lay.gather_index is not None:  # the fused rows score their padded groups instead
            computed -= sum(s.past + 1 for s in lay.segments[: lay.num_decode])
            computed += sum(g.num_keys for g in lay.decode_groups)
        tokens = int(batch.input_ids.numel())
        return PassStats(batch.phase, len(batch.requests), tokens, tokens, useful, computed)
