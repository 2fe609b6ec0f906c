"""Large CPU buffers made once at startup (BATON's KV buffer, the engine's packed weights) in
transparent huge pages.

A decode step streams every packed weight and every row's keys and values once, from memory,
in 4 KiB pages by default: one TLB entry and one page walk per 4 KiB, and the hardware
prefetchers stop at each page's end. Backed by 2 MiB pages, one interleaved run on a 2-core
Zen 4 host (docs/benchmarks.md) gave the bfloat16 GEMMs of a pass 1.19-1.21x the speed at one
or two rows, 1.09x at 8 and 1.03x at 32, and the decode attention of 32-64 rows 1.11-1.17x.

Linux backs a region by huge pages when `/sys/kernel/mm/transparent_hugepage/enabled` is
`always`, or `madvise` and the region asked for them (`MADV_HUGEPAGE`), at the first touch of
each 2 MiB. The engine's buffers come from glibc's heap (`hardware.keep_freed_memory` turns
mmap off), where a new tensor may reuse pages already touched in 4 KiB, so a buffer here is
its own fresh anonymous mapping, aligned to 2 MiB and advised before anything touches it.
It is unmapped when the last tensor viewing it goes. `BATON_HUGE_PAGES=0` turns this off.

Only for buffers made at startup: each is faulted in when made (below), which on a host
whose memory must first be compacted took 1.2 s for 778 MiB (55-69 ms once free huge pages
were at hand). A buffer made while serving (Orca's pool as it doubles, BATON's prompt
staging as it grows, the static batcher's per-batch cache) would put that on the requests
waiting for it, so those stay ordinary tensors. Orca's step gained 1.01x from huge pages
for its pool and weights together (32-64 rows), BATON's 1.00-1.07x (1-64 rows).

Where the host makes huge pages slow to fault in (some virtual machines: `_fault_in`), a
KV buffer spends at most the time it would take at `MIN_FAULT_RATE` on them; the rest of it
is 4 KiB pages, as with `BATON_HUGE_PAGES=0`. The weights' arena is faulted in whole: its size
is the model's, not a budget's, and every pass reads all of it.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MIN_BYTES = HUGE_PAGE  # smaller buffers stay ordinary tensors (a mapping each is not worth it)
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ALIGN = 64  # bytes between tensors of an arena: a cache line, as ATen aligns its own
FAULT_CHUNK = 64 << 20  # a multiple of HUGE_PAGE: what one timed fault-in step touches
MIN_FAULT_RATE = 2 << 30  # bytes/s: a buffer's huge pages may take as long as at this rate


@cache
def huge_pages_mode() -> str | None:
    """`always` or `madvise` where transparent huge pages can back a buffer here; None where
    they cannot (not Linux, THP `never`, or `BATON_HUGE_PAGES=0`)."""
    if os.environ.get("BATON_HUGE_PAGES", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return None
    for mode in ("always", "madvise"):
        if f"[{mode}]" in text:
            return mode
    return None


def _mapped_bytes(nbytes: int, timed: bool,
                  clock: Callable[[], float] = time.perf_counter) -> torch.Tensor:
    """`nbytes` of zeros in a fresh anonymous mapping advised for huge pages, starting on a
    2 MiB boundary, as a uint8 tensor that keeps the mapping alive.

    Every page is touched here, once: a huge page's first touch zeroes 2 MiB (and may wait on
    the kernel compacting memory to find one), and left to the first pass that writes there,
    faulting in BATON's 686 MiB KV buffer added 0.6-0.9 s to the first prefill of a
    `varied-64` run (two interleaved runs each way). At startup the same faults cost once,
    before any request waits; the buffer is resident from then on, as its budget says.

    `timed`: touched `FAULT_CHUNK` at a time and timed (`_fault_in`): once that has taken as
    long as the whole buffer would at `MIN_FAULT_RATE`, the rest of the mapping is advised back
    to 4 KiB pages and left to fault in as it fills. For a buffer whose size follows a memory
    budget (a KV buffer); weights, as large as the model and read whole by every pass, are
    faulted in whatever it takes."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    skip = -whole.data_ptr() % HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE, skip, nbytes)
    buffer = whole[skip:skip + nbytes]
    budget = nbytes / MIN_FAULT_RATE if timed else math.inf
    touched = _fault_in(buffer, budget, clock)
    if touched < nbytes:
        start = skip + touched  # a chunk boundary: a multiple of 2 MiB past `skip`
        region.madvise(mmap.MADV_NOHUGEPAGE, start, nbytes - touched)
    return buffer


def _fault_in(buffer: torch.Tensor, budget: float, clock: Callable[[], float]) -> int:
    """Zero `buffer` chunk by chunk until done or until that has taken over `budget`
    seconds; the bytes touched (a multiple of `FAULT_CHUNK` short of all of them).

    Why: on some virtual machines a huge page faults in slowly for a while. On a Firecracker
    guest here (2026-12-07) the first few hundred MiB of a fresh mapping faulted in at
    120-800 MiB/s and the rest at about 10 GiB/s in one run, and a whole 4 GiB buffer took
    1.5-12.9 s from one minute to the next (4 KiB pages: 2.5-3.5 GiB/s); BATON's two 3 GiB
    K/V buffers (64 rows of 2,048 tokens on `smollm2-135m-shape`), made at startup and again
    after the warm-up, added 50 s to its engine's start. A budget in time rather than a rate
    per chunk keeps the huge pages of a slow start that speeds up, and bounds the cost. What
    the step loses there is small: BATON's eager decode step with its K/V in 4 KiB pages took
    0.99-1.03x the time of one in huge pages at 32 rows and 1.005x at 8 (interleaved, one
    process, `smollm2-135m-shape` in float32)."""
    nbytes = buffer.numel()
    started = clock()
    done = 0
    while done < nbytes:
        size = min(FAULT_CHUNK, nbytes - done)
        buffer[done:done + size].zero_()
        done += size
        seconds = clock() - started
        if done < nbytes and seconds > budget:
            logger.info("huge pages: %.0f MiB of a %.0f MiB buffer faulted in at %.0f MiB/s, "
                        "under %.0f; the rest stays in 4 KiB pages, faulted in as it fills",
                        done / 2**20, nbytes / 2**20, done / seconds / 2**20,
                        MIN_FAULT_RATE / 2**20)
            break
    return done


def _fits(device: torch.device | str | None, nbytes: int) -> bool:
    return (torch.device(device or "cpu").type == "cpu" and nbytes >= MIN_BYTES
            and huge_pages_mode() is not None)


def empty(shape: Sequence[int], dtype: torch.dtype,
          device: torch.device | str | None = None) -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype, device=device)`, in huge pages where it can be (a CPU
    buffer of at least 2 MiB on a host with them; then zeros, and resident unless its huge
    pages faulted in too slowly: `_fault_in`)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not _fits(device, nbytes):
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return _mapped_bytes(nbytes, timed=True).view(dtype).view(tuple(shape))


def gather(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """Copies of `tensors` (contiguous CPU tensors) side by side in one huge-page arena, in
    order, each starting on a cache line; None where huge pages cannot back them (then keep
    the originals). One arena instead of a mapping each: packed weights number hundreds, and
    a 2 MiB-aligned mapping per tensor would waste up to 2 MiB apiece."""
    offsets, total = [], 0
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.layout != torch.strided:
            return None
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    if not tensors or not _fits("cpu", total):
        return None
    arena = _mapped_bytes(total, timed=False)  # weights: see _mapped_bytes
    copies = []
    for t, at in zip(tensors, offsets, strict=True):
        nbytes = t.numel() * t.element_size()
        copy = arena[at:at + nbytes].view(t.dtype).view(t.shape)
        copy.copy_(t)
        copies.append(copy)
    return copies


def advised(t: torch.Tensor) -> tuple[bool, int]:
    """Whether every mapping under `t`'s memory asked for huge pages (`VmFlags: hg` in
    `/proc/self/smaps`), and how many of its bytes the kernel backs by them now (which also
    depends on free memory). (False, 0) where smaps cannot be read."""
    lo = t.data_ptr()
    hi = lo + max(t.numel() * t.element_size(), 1)
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return False, 0
    flags, backed, inside = [], 0, False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < hi and lo < end
        elif inside and head == "AnonHugePages:":
            backed += int(line.split()[1]) * 1024
        elif inside and head == "VmFlags:":
            flags.append("hg" in line.split()[1:])
    return bool(flags) and all(flags), backed
