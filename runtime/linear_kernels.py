"""Which GEMM kernel the model's linears run on: plain `F.linear` or oneDNN prepacked weights.

At decode sizes (a few to a few dozen rows) `F.linear` spends much of its time re-laying the
weight out for the kernel on every call. oneDNN can do that once: `_reorder_linear_weight`
packs the weight into its blocked layout, and `_linear_pointwise` multiplies any number of rows
by it. One packed copy serves every row count (measured: a copy packed for 64 rows runs 1 row as
fast as one packed for 1), so no row bucketing or padding is needed.

Memory: packing moves a weight into the packed copy and frees the dense one (memory-neutral),
except where the dense weight is shared (a tied LM head is also the input embedding), which
costs its size again. `unpack_linears` restores the dense weights exactly.

Exactness: the packed kernel sums in another order than `F.linear` (float32 logits differ by
about 1e-6 relative), so it only runs for float32 and bfloat16; float64, the dtype of the
bit-exact parity and invariance tests, always takes the plain path.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from runtime.architectures.layers import Linear

logger = logging.getLogger(__name__)

LinearBackend = Literal["auto", "torch", "onednn"]
LINEAR_BACKENDS: tuple[str, ...] = ("auto", "torch", "onednn")
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
PROBE_ROWS = (1, 8, 32, 64)  # decode batch sizes the choice must hold at


@dataclass(frozen=True, slots=True)
class LinearChoice:
    """The kernel chosen for a model's linears, why, and what packing cost in memory."""

    backend: str
    reason: str
    extra_bytes: int = 0


_PACKING_GENERATION = 0  # bumped whenever any linear's packed weight changes


def packing_generation() -> int:
    """Changes whenever `pack_linears` or `unpack_linears` changed a weight: holders of a
    linear's kernel tensor (the compiled decoder's C++ slot table) refresh on a change."""
    return _PACKING_GENERATION


def onednn_packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """True when oneDNN can pack a weight of `dtype` here (bf16 needs AVX-512 or AVX-NE)."""
    if device.type != "cpu" or dtype not in PACKABLE_DTYPES:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype))
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 8, dtype=dtype), packed, None,
                                           "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return True


def model_linears(model: nn.Module) -> list[Linear]:
    """Every `Linear` of the model once (a tied head is listed once, as the head)."""
    seen: set[int] = set()
    out = []
    for module in model.modules():
        if isinstance(module, Linear) and id(module) not in seen:
            seen.add(id(module))
            out.append(module)
    return out


def _shared_weights(model: nn.Module) -> set[int]:
    """Ids of parameters that more than one module holds (a tied embedding and head)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {pid for pid, n in counts.items() if n > 1}


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Pack every linear's weight for oneDNN; returns the extra bytes held (shared weights).

    Idempotent: linears already packed are left alone.
    """
    global _PACKING_GENERATION
    shared = _shared_weights(model)
    extra = 0
    for linear in model_linears(model):
        if linear.packed is not None:
            continue
        _PACKING_GENERATION += 1
        weight = linear.weight
        linear.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        if id(weight) in shared:
            extra += weight.numel() * weight.element_size()
        else:  # the packed copy replaces the dense one
            weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
    return extra


@torch.no_grad()
def unpack_linears(model: nn.Module) -> None:
    """Back to dense weights and `F.linear` (exactly the weights that were packed)."""
    global _PACKING_GENERATION
    for linear in model_linears(model):
        if linear.packed is None:
            continue
        _PACKING_GENERATION += 1
        if linear.weight.numel() == 0:
            linear.weight.data = linear.packed.to_dense()
        linear.packed = None


def _median_seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def probe_speedup(model: nn.Module, rounds: int = 5) -> float:
    """Measured `F.linear` time over packed time for one decoder layer's linears and the head.

    Interleaved rounds at each of `PROBE_ROWS`, so a burst of background load hits both alike;
    the sum over row counts weighs batch 1 and batch 64 equally in relative terms.
    """
    linears = [m for m in model_linears(model) if m.packed is None]
    head = max(linears, key=lambda m: m.weight.numel())
    in_first_layer = [m for m in linears[:8] if m is not head]
    sample = [*in_first_layer[:4], head]
    packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach()) for m in sample]
    plain_total = packed_total = 0.0
    for rows in PROBE_ROWS:
        xs = [torch.randn(rows, m.in_features, dtype=m.weight.dtype) for m in sample]

        def plain(xs=xs) -> None:
            for x, m in zip(xs, sample, strict=True):
                F.linear(x, m.weight, m.bias)

        def onednn(xs=xs) -> None:
            for x, m, p in zip(xs, sample, packed, strict=True):
                torch.ops.mkldnn._linear_pointwise(x, p, m.bias, "none", [], "")

        plain(), onednn()  # warm-up: first calls build kernels
        plain_s = [_median_seconds(plain, 1) for _ in range(rounds)]
        onednn_s = [_median_seconds(onednn, 1) for _ in range(rounds)]
        plain_total += statistics.median(plain_s) / rows
        packed_total += statistics.median(onednn_s) / rows
    return plain_total / packed_total


_PROBE_CACHE: dict[tuple, float] = {}


def choose_linear_backend(model: nn.Module, requested: str = "auto") -> LinearChoice:
    """Decide the linears' kernel for this model, device and dtype (see the module docstring).

    `auto` packs when oneDNN supports the dtype here and a short probe (well under a second
    on a 135M model; cached per process and shape) measures packed faster than `F.linear`.
    """
    if requested not in LINEAR_BACKENDS:
        raise ValueError(f"linear_backend: expected one of {', '.join(LINEAR_BACKENDS)}, "
                         f"got {requested!r}")
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    if requested == "torch":
        return LinearChoice("torch", "requested")
    supported = onednn_packing_supported(dtype, device)
    if requested == "onednn":
        if not supported:
            raise ValueError(f"linear_backend onednn: oneDNN cannot pack {dtype} weights on "
                             f"{device.type} here; use auto or torch")
        return LinearChoice("onednn", "requested")
    if not supported:
        return LinearChoice("torch", f"oneDNN packing unavailable for {dtype} on {device.type}")
    linears = model_linears(model)
    if all(m.packed is not None for m in linears):
        return LinearChoice("onednn", "already packed")
    key = (dtype, torch.get_num_threads(), tuple(tuple(m.weight.shape) for m in linears[:8]))
    if key not in _PROBE_CACHE:
        _PROBE_CACHE[key] = probe_speedup(model)
    speedup = _PROBE_CACHE[key]
    if speedup > 1.05:
        return LinearChoice("onednn", f"probe: prepacked {speedup:.2f}x F.linear")
    return LinearChoice("torch", f"probe: prepacked only {speedup:.2f}x F.linear")


def apply_linear_backend(model: nn.Module, requested: str = "auto") -> LinearChoice:
    """Choose and apply the kernel; logs the choice and its memory cost."""
    choice = choose_linear_backend(model, requested)
    if choice.backend == "onednn":
        extra = pack_linears(model)
        choice = LinearChoice(choice.backend, choice.reason, extra)
    else:
        unpack_linears(model)
    logger.info("linear kernels: %s (%s; %.0f MiB extra for shared weights)",
                choice.backend, choice.reason, choice.extra_bytes / 2**20)
    return choice
