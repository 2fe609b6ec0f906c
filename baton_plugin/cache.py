"""BATON's KV-cache layout: one dense, left-padded, preallocated batch cache.

Storage is `(L, B_cap, H_kv, S_cap, D)` for keys and for values. The batch occupies rows
`[0, B)` and the column window `[start, end)`; every row is right-aligned at `end`, so row b's
real keys are its last `lengths[b]` columns and the padding mask `[B, S]` follows from the
lengths. Padding the whole batch on the left is moving `start` left, trimming all-padding
columns is moving `start` right: neither copies. A finished row's hole is filled by the last
row (one row copied), with `rows` as the row-to-request map.

One step (the engine's generator protocol): newly admitted requests are prefilled in their own
left-padded pass(es) into a staging `PrefilledKV`; `commit` embeds them (vector shaping); then
one dense `[B, 1]` decode pass runs every row, including the rows embedded this step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from baton_plugin import embed
from baton_plugin.attention import StagingAttention, WindowAttention, empty_staging
from baton_plugin.masks import decode_mask, padding_mask, prefill_mask
from baton_plugin.policy import plan_placement, plan_prefill_groups
from runtime.kv_cache import (
    CacheLimits,
    ForwardBatch,
    KVCache,
    MemoryStats,
    ModelShape,
    PassStats,
    Phase,
    kv_elements_per_token,
)
from runtime.request import Request


@dataclass(frozen=True, slots=True)
class PrefillLayout:
    """A prefill pass: its staging K/V (written by the pass, embedded by `commit`)."""

    staged: embed.PrefilledKV


@dataclass(frozen=True, slots=True)
class DecodeLayout:
    """A decode pass over the window `[start, end]`; `lengths` count the key it appends."""

    start: int
    end: int
    lengths: torch.Tensor  # (B,) real keys per row after this pass
    useful_pairs: int  # sum of lengths, kept on the host (no device sync for accounting)


@dataclass(slots=True)
class CopyStats:
    """Copies the layout did beyond the model's own K/V writes (kept small by design)."""

    row_moves: int = 0
    shifts: int = 0  # window moved inside the same buffer
    reallocations: int = 0  # buffer grown (the window copied over when rows exist)
    copied_token_slots: int = 0  # rows x columns copied by moves and relayouts


class BatonCache(KVCache):
    """Dense batch cache with a sliding column window; see the module docstring."""

    def __init__(
        self,
        shape: ModelShape,
        limits: CacheLimits,
        device: torch.device,
        dtype: torch.dtype,
        max_rows: int | None = None,
        prefill_pad_tolerance: float = 0.25,
    ) -> None:
        super().__init__(shape, limits, device, dtype)
        self.max_rows = min(max_rows or limits.max_num_seqs, limits.max_num_seqs)
        self.prefill_pad_tolerance = prefill_pad_tolerance
        dims = (shape.num_layers, 0, shape.num_kv_heads, 0, shape.head_dim)
        self.k = torch.zeros(dims, dtype=dtype, device=self.device)
        self.v = torch.zeros(dims, dtype=dtype, device=self.device)
        self.start = self.end = 0
        self.rows: list[Request] = []  # row b holds rows[b]
        self.lengths: list[int] = []  # real keys of row b (its last lengths[b] columns)
        self.row_of: dict[Request, int] = {}
        self.pending: list[Request] = []  # admitted, not yet embedded
        self.copies = CopyStats()

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Columns of the window: the longest row, since all-padding columns are trimmed."""
        return self.end - self.start

    def padding_mask(self) -> torch.Tensor:
        """Bool `(B, S)`, True on real keys (the paper's padding mask)."""
        return padding_mask(torch.tensor(self.lengths, device=self.device), self.width)

    def add(self, request: Request) -> None:
        self.pending.append(request)

    def free(self, request: Request) -> None:
        """Remove a row at once: the last row fills its hole, then all-padding columns go."""
        if request in self.pending:
            self.pending.remove(request)
        row = self.row_of.pop(request, None)
        if row is None:
            return
        last = len(self.rows) - 1
        if row != last:
            moved, length = self.rows[last], self.lengths[last]
            embed.move_row(self.k, self.v, last, row, self.end - length, self.end)
            self.rows[row], self.lengths[row] = moved, length
            self.row_of[moved] = row
            self.copies.row_moves += 1
            self.copies.copied_token_slots += length
        self.rows.pop()
        self.lengths.pop()
        self.start = self.end - max(self.lengths, default=0)  # trim: no copy

    def forward_batches(self, running: Sequence[Request]) -> Iterator[ForwardBatch]:
        """Prefill pass(es) for newcomers, then one `[B, 1]` decode pass over every row.

        `running` is the engine's live list; the cache's own row map is authoritative, and
        each pass is built only when the engine asks for it, after the previous one's frees.
        """
        pending = list(self.pending)
        lengths = [len(r.pending_token_ids()) for r in pending]
        for group in plan_prefill_groups(lengths, self.prefill_pad_tolerance):
            requests = [pending[i] for i in group if pending[i] in self.pending]
            if requests:
                yield self._prefill_batch(requests)
        if self.rows:
            self._ensure_room(len(self.rows), self.width, 1)
            yield self._decode_batch()

    def _prefill_batch(self, requests: list[Request]) -> ForwardBatch:
        tokens = [r.pending_token_ids() for r in requests]
        ids, pos = embed.left_pad(tokens, self.device)  # (n, T)
        s = self.shape
        staged = empty_staging(
            s.num_layers,
            s.num_kv_heads,
            s.head_dim,
            [len(t) for t in tokens],
            self.device,
            self.dtype,
        )
        last = torch.arange(1, len(tokens) + 1, device=self.device) * staged.width - 1
        return ForwardBatch(
            tuple(requests),
            ids,
            pos,
            staged.lengths,
            last,
            tuple(requests),
            Phase.PREFILL,
            PrefillLayout(staged),
        )

    def _decode_batch(self) -> ForwardBatch:
        rows = tuple(self.rows)
        last = [r.pending_token_ids() for r in rows]
        if any(len(t) != 1 for t in last):
            raise RuntimeError("baton: a decode row must have exactly one pending token")
        ids = torch.tensor(last, dtype=torch.long, device=self.device)  # (B, 1)
        past = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
        index = torch.arange(len(rows), device=self.device)
        layout = DecodeLayout(self.start, self.end, past + 1, sum(self.lengths) + len(rows))
        return ForwardBatch(
            rows, ids, past[:, None], (1,) * len(rows), index, rows, Phase.DECODE, layout
        )

    def attention(self, batch: ForwardBatch) -> StagingAttention | WindowAttention:
        lay = batch.layout
        if isinstance(lay, PrefillLayout):
            return StagingAttention(lay.staged)
        return WindowAttention(self, lay.start, lay.end)

    def commit(self, batch: ForwardBatch) -> None:
        """After a prefill, embed its K/V into the batch; after a decode, extend the window."""
        if isinstance(batch.layout, PrefillLayout):
            self.insert_prefilled(batch.requests, batch.layout.staged)
            return
        self.end += 1
        self.lengths = [n + 1 for n in self.lengths]

    def insert_prefilled(self, requests: Sequence[Request], kv: embed.PrefilledKV) -> None:
        """Embed prefilled K/V (from this device's pass or any prefill worker) as new rows.

        Vector shaping: the window widens to `max(S, T)` by moving `start` left (the batch is
        left-padded), and the newcomers land right-aligned at `end` (they are left-padded).
        """
        for req in requests:
            if req in self.pending:
                self.pending.remove(req)
        first = len(self.rows)
        width = self.end - embed.shaped_start(self.start, self.end, first, kv.width)
        self._ensure_room(first + kv.num_rows, width, 0)
        self.start = embed.shaped_start(self.start, self.end, first, kv.width)
        embed.embed_rows(self.k, self.v, kv, first, self.end)
        for i, req in enumerate(requests):
            self.row_of[req] = first + i
        self.rows.extend(requests)
        self.lengths.extend(kv.lengths)

    def _ensure_room(self, rows: int, width: int, right: int) -> None:
        """Make rows `[0, rows)` and columns `[end - width, end + right)` fit the buffer."""
        cap_rows, cap_cols = self.k.shape[1], self.k.shape[3]
        fits = rows <= cap_rows and self.end - width >= 0 and self.end + right <= cap_cols
        if fits and self.rows:
            return  # an empty batch is re-placed for free instead
        plan = plan_placement(rows, width, right, cap_rows, cap_cols, self.max_rows)
        src_k, src_v = self.k, self.v
        if plan.reallocate:
            dims = (
                self.shape.num_layers,
                plan.rows,
                self.shape.num_kv_heads,
                plan.columns,
                self.shape.head_dim,
            )
            self.k = torch.zeros(dims, dtype=self.dtype, device=self.device)
            self.v = torch.zeros(dims, dtype=self.dtype, device=self.device)
            self.copies.reallocations += 1
        elif self.rows:
            self.copies.shifts += 1
        new_start = plan.end - self.width
        if self.rows:
            embed.relocate(src_k, self.k, len(self.rows), self.start, self.end, new_start)
            embed.relocate(src_v, self.v, len(self.rows), self.start, self.end, new_start)
            self.copies.copied_token_slots += len(self.rows) * self.width
        self.start, self.end = new_start, plan.end

    def build_mask(self, batch: ForwardBatch) -> torch.Tensor:
        lay = batch.layout
        if isinstance(lay, PrefillLayout):
            lengths = torch.tensor(lay.staged.lengths, device=self.device)
            return prefill_mask(lengths, lay.staged.width, self.dtype)  # (n, 1, T, T)
        return decode_mask(lay.lengths, lay.end + 1 - lay.start, self.dtype)  # (B, 1, 1, W+1)

    def memory_stats(self) -> MemoryStats:
        per_token = kv_elements_per_token(self.shape)
        allocated = self.k.shape[1] * self.k.shape[3]
        used = sum(self.lengths)
        reserved = len(self.rows) * self.width + sum(r.num_tokens for r in self.pending)
        return MemoryStats(
            allocated * per_token,
            used * per_token,
            reserved,
            used,
            len(self.rows) + len(self.pending),
        )

    def pass_stats(self, batch: ForwardBatch) -> PassStats:
        """Pad columns are computed but not useful; causal-masked pairs likewise."""
        lay = batch.layout
        if isinstance(lay, PrefillLayout):
            n, width = lay.staged.num_rows, lay.staged.width
            real = lay.staged.lengths
            return PassStats(
                Phase.PREFILL,
                n,
                sum(real),
                n * width,
                sum(p * (p + 1) // 2 for p in real),
                n * width * width,
            )
        rows, keys = len(batch.requests), lay.end + 1 - lay.start
        return PassStats(Phase.DECODE, rows, rows, rows, lay.useful_pairs, rows * keys)
