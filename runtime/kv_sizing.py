"""How many tokens of KV cache the engine may hold: from a memory budget, as vLLM sizes it.

The budget is `--kv-cache-memory`: an absolute size (`4GiB`, `512MiB`, `2.5GB`), a fraction
of the memory available when the engine starts (`0.4`, the share of `MemAvailable` on a CPU,
of free device memory on CUDA), or `auto` (`DEFAULT_FRACTION`). The token capacity is the
budget over the bytes one token's keys and values take in every layer, capped at
`max_num_seqs x max_model_len` (no layout can hold more). `--kv-cache-tokens` overrides it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: the CLI sets OpenMP's environment before it loads
    import torch

DEFAULT_FRACTION = 0.4
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class KVMemoryBudget:
    """Either `fraction` of available memory or an absolute `num_bytes` (exactly one is set)."""

    fraction: float | None = None
    num_bytes: int | None = None

    def resolve(self, available_bytes: int) -> int:
        if self.num_bytes is not None:
            return self.num_bytes
        return int(self.fraction * available_bytes)

    def describe(self) -> str:
        if self.num_bytes is not None:
            return f"{self.num_bytes / 2**30:.2f} GiB"
        return f"{self.fraction:.0%} of available memory"


def parse_kv_memory(value: str | float | int) -> KVMemoryBudget:
    """`auto`, a fraction in (0, 1], or a size with a unit; anything else raises ValueError."""
    text = str(value).strip().lower()
    if text == "auto":
        return KVMemoryBudget(fraction=DEFAULT_FRACTION)
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"kv_cache_memory: expected auto, a fraction such as 0.4, or a size "
                         f"such as 4GiB, got {value!r}")
    number, unit = float(match.group(1)), match.group(2)
    if not unit:
        if not 0 < number <= 1:
            raise ValueError(f"kv_cache_memory: a plain number is a fraction of available "
                             f"memory in (0, 1]; give a unit for a size (4GiB), got {value!r}")
        return KVMemoryBudget(fraction=number)
    if unit not in _UNITS:
        raise ValueError(f"kv_cache_memory: unknown unit {unit!r} in {value!r}; use "
                         f"{', '.join(u for u in _UNITS if u != 'b')}")
    num_bytes = int(number * _UNITS[unit])
    if num_bytes <= 0:
        raise ValueError(f"kv_cache_memory: must be positive, got {value!r}")
    return KVMemoryBudget(num_bytes=num_bytes)


def available_memory(device: torch.device) -> int:
    """Bytes free for the cache now: `MemAvailable` on a CPU, free device memory on CUDA."""
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class KVCapacity:
    """The engine's KV capacity and how it was derived (logged at startup)."""

    tokens: int
    bytes_per_token: int
    reason: str
    # Tokens the memory budget holds before the cap (None when `kv_cache_tokens` was given):
    # a layout that allocates beyond its token capacity (BATON's slack columns) stays within it.
    memory_tokens: int | None = None

    @property
    def gib(self) -> float:
        return self.tokens * self.bytes_per_token / 2**30


def kv_capacity(bytes_per_token: int, max_num_seqs: int, max_model_len: int,
                tokens: int | None, memory: str | float | None, device: torch.device,
                available: int | None = None) -> KVCapacity:
    """Token capacity from `tokens` when given, else from the memory budget (see module doc)."""
    ceiling = max_num_seqs * max_model_len
    if tokens is not None:
        return KVCapacity(tokens, bytes_per_token, "kv_cache_tokens")
    budget = parse_kv_memory("auto" if memory is None else memory)
    free = available_memory(device) if available is None else available
    fitted = budget.resolve(free) // bytes_per_token
    if fitted < 1:
        raise ValueError(f"kv_cache_memory {budget.describe()} holds no token of KV cache "
                         f"({bytes_per_token} bytes per token); raise it")
    reason = f"kv_cache_memory {budget.describe()} ({free / 2**30:.1f} GiB available)"
    if fitted > ceiling:
        return KVCapacity(ceiling, bytes_per_token,
                          f"{reason}, capped at max_num_seqs x max_model_len", fitted)
    return KVCapacity(fitted, bytes_per_token, reason, fitted)
