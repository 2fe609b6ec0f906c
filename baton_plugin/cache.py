"""BATON's KV-cache layout: dense, left-padded length buckets in one buffer allocated once.

Storage is `(L, R, H_kv, C, D)` for keys and for values, `R` rows (the batch bound) by `C`
columns (the context length plus slack), allocated once, uninitialised (see `embed`), within
the memory budget (`buffer_shape`). Rows are grouped in length buckets (`buckets.Bucket`):
each is a dense batch over a row range with its own column window `[start, end)`, every row
right-aligned at `end`, so its padding mask follows from the lengths. Widening a window on the
left and trimming it are moves of `start`; a finished row's hole is filled by its bucket's last
row (one row copied).

One step (the engine's generator protocol), for the newcomers admitted since the last one:

- `newcomer_pass="fused"` (default): ONE pass whose GEMMs run the decode rows' tokens and the
  newcomers' prompt tokens together; attention split as `attention.BatonAttention` says; then
  `commit` embeds the newcomers (vector shaping) and they decode from the next step.
- `newcomer_pass="separate"`: a packed prefill pass of the newcomers, `commit` embeds them,
  then one decode pass over every row, newcomers included. This is the form a remote prefill
  worker feeds (`insert_prefilled`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from baton_plugin import embed
from baton_plugin.attention import (
    BatonAttention,
    BatonMask,
    DecodeSegment,
    KernelRows,
    PromptSegment,
    Staging,
)
from baton_plugin.buckets import NEW_BUCKET, Bucket, choose_bucket
from baton_plugin.masks import decode_mask, padding_mask
from baton_plugin.rows import RowSpace
from runtime.api import (
    CacheLimits,
    ForwardBatch,
    KVCache,
    MemoryStats,
    ModelShape,
    PassStats,
    Phase,
    Request,
    kv_elements_per_token,
    kv_empty,
)

NewcomerPass = Literal["fused", "separate"]
NEWCOMER_PASSES = ("fused", "separate")
# Prompt tokens prefilled per step by default: twice Orca's pass size (`max_pass_tokens`).
# Served, a burst of 64 prompts (about 8,700 tokens) is then prefilled in two steps instead of
# three, so fewer decode tokens ride the slow ones: mean TPOT 0.81x 4096's and 0.97x Orca's, first
# tokens still sooner than Orca's (0.92x), six repeats (docs/baton.md, forty-sixth session).
# The cost: staging for up to 8192 prompt tokens' K/V, and later first tokens when a whole burst
# arrives at once (offline, 1.3x Orca's).
DEFAULT_MAX_PREFILL_TOKENS = 8192


@dataclass(frozen=True, slots=True)
class BatonLayout:
    """One pass: decode segments (a bucket each) then prompt segments (a newcomer each)."""

    decode: tuple[DecodeSegment, ...]
    prompts: tuple[PromptSegment, ...]
    buckets: tuple[Bucket, ...]  # the bucket of each decode segment
    lengths: tuple[tuple[int, ...], ...]  # keys per row after this pass, per decode segment
    kernel_rows: KernelRows | None = None  # set when the engine's decode kernel attends


@dataclass(slots=True)
class CopyStats:
    """Copies the layout did beyond the model's own K/V writes (kept small by design)."""

    row_moves: int = 0
    shifts: int = 0  # a bucket's window moved inside the buffer
    zeroed_slots: int = 0  # pad columns zeroed as a window widened over them
    copied_token_slots: int = 0  # rows x columns copied by moves and shifts
    reallocations: int = 0  # the buffer grew (only for a lone request over the budget)


MIN_SLACK = 32  # spare columns a window slides over before it must shift


def buffer_shape(limits: CacheLimits, rows_wanted: int, num_layers: int) -> tuple[int, int]:
    """(rows, columns) of the buffer: rows the KV capacity holds at full context, columns the
    context length plus slack (a quarter of it, at least `MIN_SLACK`) that lets windows slide.

    When the capacity comes from a memory budget (`kv_memory_tokens`), everything allocated,
    slack and the one-layer shift scratch included, stays within that budget: the slack
    shrinks first, then rows go, so that `MIN_SLACK` columns remain (an eighth of a context
    shorter than 256). A budget under one row's context keeps one row (the engine rejects
    requests the capacity cannot hold).
    """
    context = limits.max_model_len
    rows = max(1, min(rows_wanted, limits.kv_cache_tokens // context))
    slack = max(MIN_SLACK, context // 4)
    if limits.kv_memory_tokens is None:
        return rows, context + slack
    # less the shift scratch: one layer's keys or values, 1/(2L) of the buffer
    tokens = limits.kv_memory_tokens * 2 * num_layers // (2 * num_layers + 1)
    least_slack = min(MIN_SLACK, max(1, context // 8))
    rows = max(1, min(rows, tokens // (context + least_slack)))
    return rows, context + max(min(slack, tokens // rows - context), 0)


class BatonCache(KVCache):
    """Dense length buckets over one preallocated buffer; see the module docstring."""

    def __init__(self, shape: ModelShape, limits: CacheLimits, device: torch.device,
                 dtype: torch.dtype, max_rows: int | None = None,
                 newcomer_pass: NewcomerPass = "fused", max_buckets: int = 4,
                 bucket_pad_tolerance: float = 0.15,
                 max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS) -> None:
        super().__init__(shape, limits, device, dtype)
        self.newcomer_pass = newcomer_pass
        self.max_buckets = max_buckets
        self.bucket_pad_tolerance = bucket_pad_tolerance
        self.max_prefill_tokens = max_prefill_tokens
        rows_wanted = min(max_rows or limits.max_num_seqs, limits.max_num_seqs)
        self.max_rows, self.columns = buffer_shape(limits, rows_wanted, shape.num_layers)
        dims = (shape.num_layers, self.max_rows, shape.num_kv_heads, self.columns, shape.head_dim)
        # in huge pages, faulted in now (made once, at startup: runtime/huge_pages.py)
        self.k = kv_empty(dims, self.kv_dtype, self.device)
        self.v = kv_empty(dims, self.kv_dtype, self.device)
        # each layer's views, made once (the buffers are never reallocated): `unbind` made
        # them again every pass, about 0.2 ms of a one-row step
        self.layers = (self.k.unbind(0), self.v.unbind(0))
        self.scratch = torch.empty(dims[1:], dtype=self.kv_dtype, device=self.device)  # one layer
        self.staging: Staging | None = None
        self._start_empty()

    def _start_empty(self) -> None:
        """No rows, no buckets, nothing pending, counters at zero (the buffers untouched)."""
        self.space = RowSpace(self.max_rows)
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[Request, Bucket] = {}
        self.pending: list[Request] = []  # admitted, not yet embedded
        self.copies = CopyStats()

    def reset(self) -> bool:
        """Forget every request and counter, keeping the buffer and the staging area.

        Why: the buffer is faulted in when it is made (`kv_empty`); making a second one after
        the engine's warm-up cost that again, about 1 s per 1.8 GiB buffer on a VM, and held
        both while the scheduler still referred to the first. Stale keys left in the buffer
        are finite, which is all a pad column needs (module docstring)."""
        self._start_empty()
        return True

    # --- what the engine and the scheduler ask -------------------------------------------

    @property
    def num_rows(self) -> int:
        return len(self.bucket_of)

    @property
    def width(self) -> int:
        """Columns of the widest bucket window (0 when empty)."""
        return max((b.width for b in self.buckets), default=0)

    def add(self, request: Request) -> None:
        self.pending.append(request)

    def free(self, request: Request) -> None:
        """Remove a row at once: its bucket's last row fills the hole, then trim the window."""
        if request in self.pending:
            self.pending.remove(request)
        bucket = self.bucket_of.pop(request, None)
        if bucket is None:
            return
        i = bucket.rows.index(request)
        last = bucket.num_rows - 1
        if i != last:
            length = bucket.lengths[last]
            embed.move_row(self.k, self.v, bucket.first + last, bucket.first + i,
                           bucket.end - length, bucket.end)
            bucket.rows[i], bucket.lengths[i] = bucket.rows[last], length
            self.copies.row_moves += 1
            self.copies.copied_token_slots += length
        bucket.rows.pop()
        bucket.lengths.pop()
        self.space.release(bucket.first + last)
        if not bucket.rows:
            self.buckets.remove(bucket)
            return
        bucket.start = bucket.end - max(bucket.lengths)  # trim: no copy

    def forward_batches(self, running: Sequence[Request]) -> Iterator[ForwardBatch]:
        """Fused: one pass of decode rows and newcomers. Separate: prefill pass, then decode.

        `running` is the engine's live list; the cache's own row map is authoritative, and
        each pass is built only when the engine asks for it, after the previous one's frees.
        """
        newcomers = self._newcomers_this_step()
        if self.newcomer_pass == "separate" and newcomers:
            yield self._pass(decode=False, newcomers=newcomers)
            newcomers = []
        if self.bucket_of or newcomers:
            yield self._pass(decode=True, newcomers=newcomers)

    def attention(self, batch: ForwardBatch) -> BatonAttention:
        lay: BatonLayout = batch.layout
        return BatonAttention(self.k, self.v, self.staging, lay.decode, lay.prompts,
                              self.decode_kernel if lay.kernel_rows is not None else None,
                              lay.kernel_rows, self.decode_kernel, layers=self.layers)

    def commit(self, batch: ForwardBatch) -> None:
        """After a pass: decode rows gained a key; newcomers are embedded from staging."""
        lay: BatonLayout = batch.layout
        for bucket in lay.buckets:
            bucket.end += 1
            bucket.lengths = [n + 1 for n in bucket.lengths]
        first_newcomer = len(batch.requests) - len(lay.prompts)
        newcomers = batch.requests[first_newcomer:]
        base = lay.prompts[0].offset if lay.prompts else 0
        for req, seg in zip(newcomers, lay.prompts, strict=True):
            row, end = self._place(req, seg.length)
            embed.embed_packed(self.k, self.v, self.staging.k, self.staging.v,
                               seg.offset - base, seg.length, row, end)

    def insert_prefilled(self, requests: Sequence[Request], kv: embed.PrefilledKV) -> None:
        """Embed K/V prefilled elsewhere (a prefill worker, another device) as new rows."""
        for i, req in enumerate(requests):
            row, end = self._place(req, kv.lengths[i])
            embed.embed_prefilled(self.k, self.v, kv, i, row, end)

    def memory_stats(self) -> MemoryStats:
        per_token = kv_elements_per_token(self.shape)
        used = sum(sum(b.lengths) for b in self.buckets)
        reserved = sum(b.num_rows * b.width for b in self.buckets)
        reserved += sum(r.num_tokens for r in self.pending)
        allocated = self.k.numel() + self.v.numel() + self.scratch.numel()
        return MemoryStats(allocated, used * per_token, reserved, used,
                           self.num_rows + len(self.pending))

    def pass_stats(self, batch: ForwardBatch) -> PassStats:
        """Decode pad columns are computed, not useful; causal prompts compute only their
        lower triangle (the kernel skips the rest), so their pairs are all useful."""
        lay: BatonLayout = batch.layout
        useful = computed = 0
        for seg, lengths in zip(lay.decode, lay.lengths, strict=True):
            useful += sum(lengths)
            computed += seg.rows * (seg.end + 1 - seg.start)
        if lay.kernel_rows is not None:  # the kernel reads each row's real keys only
            computed = useful
        prompt_pairs = sum(p.length * (p.length + 1) // 2 for p in lay.prompts)
        tokens = int(batch.input_ids.numel())
        return PassStats(batch.phase, len(batch.requests), tokens, tokens, useful + prompt_pairs,
                         computed + prompt_pairs)

    def padding_mask(self, bucket: Bucket) -> torch.Tensor:
        """Bool `(B, S)` of one bucket, True on real keys (the paper's padding mask)."""
        return padding_mask(torch.tensor(bucket.lengths, device=self.device), bucket.width)

    # --- building passes -------------------------------------------------------------------

    def _newcomers_this_step(self) -> list[Request]:
        """Pending requests, in admission order, up to `max_prefill_tokens` prompt tokens."""
        chosen, total = [], 0
        for req in self.pending:
            n = len(req.pending_token_ids())
            if chosen and total + n > self.max_prefill_tokens:
                break
            chosen.append(req)
            total += n
        return chosen

    def _pass(self, decode: bool, newcomers: list[Request]) -> ForwardBatch:
        """A packed `(N,)` pass: every bucket's decode rows (if `decode`), then the prompts."""
        requests: list[Request] = []
        ids: list[int] = []
        positions: list[int] = []
        segments, buckets, lengths = [], [], []
        for bucket in self.buckets if decode else ():
            self._ensure_room(bucket, bucket.width, 1)
            segments.append(DecodeSegment(len(ids), bucket.num_rows, bucket.first, bucket.start,
                                          bucket.end))
            for req, n in zip(bucket.rows, bucket.lengths, strict=True):
                pending = req.pending_token_ids()
                if len(pending) != 1:
                    raise RuntimeError("baton: a decode row must have exactly one pending token")
                requests.append(req)
                ids.append(pending[0])
                positions.append(n)
            buckets.append(bucket)
            lengths.append(tuple(n + 1 for n in bucket.lengths))
        prompts = []
        for req in newcomers:
            tokens = req.pending_token_ids()
            prompts.append(PromptSegment(len(ids), len(tokens)))
            requests.append(req)
            ids.extend(tokens)
            positions.extend(range(len(tokens)))
        self._ensure_staging(sum(p.length for p in prompts))
        num_decode = len(ids) - sum(p.length for p in prompts)
        dev = self.device
        sample = list(range(num_decode)) + [p.offset + p.length - 1 for p in prompts]
        phase = Phase.MIXED if prompts and num_decode else Phase.PREFILL if prompts \
            else Phase.DECODE
        layout = BatonLayout(tuple(segments), tuple(prompts), tuple(buckets), tuple(lengths),
                             self._kernel_rows(segments, lengths))
        return ForwardBatch(
            tuple(requests), torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
            tuple([1] * num_decode + [p.length for p in prompts]),
            torch.tensor(sample, device=dev), tuple(requests), phase, layout, self._mask(layout))

    def _kernel_rows(self, segments: Sequence[DecodeSegment],
                     lengths: Sequence[tuple[int, ...]]) -> KernelRows | None:
        """Where each decode row's real keys start in a layer's buffer, for the engine's decode
        kernel: the last `length` columns of its bucket window (right-aligned rows)."""
        if self.decode_kernel is None or not segments:
            return None
        s = self.shape
        row_stride, col_stride = s.num_kv_heads * self.columns * s.head_dim, s.head_dim
        offsets, counts = [], []
        for seg, row_lengths in zip(segments, lengths, strict=True):
            for i, n in enumerate(row_lengths):
                offsets.append((seg.first_row + i) * row_stride + (seg.end + 1 - n) * col_stride)
                counts.append(n)
        return KernelRows(torch.tensor(offsets), torch.tensor(counts), col_stride,
                          self.columns * s.head_dim, s.num_kv_heads)

    def _mask(self, lay: BatonLayout) -> BatonMask:
        """Per bucket, an additive mask with the dtype minimum on padded keys (none needed when
        the decode kernel reads each row's real keys only)."""
        if lay.kernel_rows is not None:
            return BatonMask((None,) * len(lay.decode))
        return BatonMask(tuple(
            decode_mask(list(lengths), seg.end + 1 - seg.start, self.dtype, self.device)
            for seg, lengths in zip(lay.decode, lay.lengths, strict=True)))

    def _ensure_staging(self, tokens: int) -> None:
        """Staging for `tokens` prompt tokens, grown (rarely) and otherwise reused."""
        if not tokens or (self.staging is not None and self.staging.k.shape[1] >= tokens):
            return
        s = self.shape
        size = max(tokens, min(self.max_prefill_tokens, 2 * tokens))
        dims = (s.num_layers, size, s.num_kv_heads, s.head_dim)
        self.staging = Staging(torch.empty(dims, dtype=self.dtype, device=self.device),
                               torch.empty(dims, dtype=self.dtype, device=self.device))

    # --- placement: vector shaping into a bucket --------------------------------------------

    def _place(self, request: Request, length: int) -> tuple[int, int]:
        """Choose the request's bucket and row, widen the window; returns (row, end)."""
        if request in self.pending:
            self.pending.remove(request)
        choice = choose_bucket(self.buckets, length, self.max_buckets, self.bucket_pad_tolerance)
        if choice.index == NEW_BUCKET:
            bucket = Bucket()
            first = self.space.open(bucket)
            end = self._initial_end(length)
            bucket.first, bucket.start, bucket.end = first, end - length, end
            self.buckets.append(bucket)
            row = first
        else:
            bucket = self.buckets[choice.index]
            self._ensure_room(bucket, max(bucket.width, length), 0)
            if length > bucket.width:  # the bucket is padded on the left (vector shaping)
                new_start = bucket.end - length
                self._zero(slice(bucket.first, bucket.stop), new_start, bucket.start)
                bucket.start = new_start
            row = self.space.grow(bucket, self._move_row)
            self._zero(slice(row, row + 1), bucket.start, bucket.end - length)
        at = 0 if row == bucket.first and bucket.rows else len(bucket.rows)
        bucket.rows.insert(at, request)
        bucket.lengths.insert(at, length)
        self.bucket_of[request] = bucket
        return row, bucket.end

    def _initial_end(self, length: int) -> int:
        """A new window's end: an eighth of the spare columns on the left, the rest right."""
        return length + (self.columns - length) // 8

    def _ensure_room(self, bucket: Bucket, width: int, right: int) -> None:
        """Make columns `[end - width, end + right)` fit the buffer, shifting the window."""
        if bucket.end - width >= 0 and bucket.end + right <= self.columns:
            return
        new_end = width + (self.columns - width - right) // 8
        rows = slice(bucket.first, bucket.stop)
        embed.shift_window(self.k, self.scratch, rows, bucket.start, bucket.end,
                           new_end - bucket.width)
        embed.shift_window(self.v, self.scratch, rows, bucket.start, bucket.end,
                           new_end - bucket.width)
        self.copies.shifts += 1
        self.copies.copied_token_slots += bucket.num_rows * bucket.width
        bucket.start, bucket.end = new_end - bucket.width, new_end

    def _move_row(self, bucket: Bucket, src: int, dst: int) -> None:
        """RowSpace's callback: a bucket's row moves (its window's columns come along)."""
        embed.move_row(self.k, self.v, src, dst, bucket.start, bucket.end)
        self.copies.row_moves += 1
        self.copies.copied_token_slots += bucket.width

    def _zero(self, rows: slice, lo: int, hi: int) -> None:
        embed.zero_columns(self.k, self.v, rows, lo, hi)
        self.copies.zeroed_slots += max(hi - lo, 0) * (rows.stop - rows.start)
