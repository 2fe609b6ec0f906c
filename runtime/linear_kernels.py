"""Which GEMM kernel the model's linears run on: plain `F.linear`, or prepacked weights.

At decode sizes (a few to a few dozen rows) `F.linear` spends much of its time re-laying the
weight out for the kernel on every call. Two libraries can do that once, and one packed copy
serves every row count in both (no row bucketing or padding):

- `onednn` (float32, bfloat16): `_reorder_linear_weight` packs the weight into oneDNN's
  blocked layout, and `_linear_pointwise` multiplies any number of rows by it (measured: a
  copy packed for 64 rows runs 1 row as fast as one packed for 1).
- `mkl` (float32, where torch links MKL and the engine's C++ kernels build): MKL's packed
  sgemm (`kernels/mkl_linear.cpp`). On a 2-core AVX-512 Xeon it ran a SmolLM2-135M-shaped
  model's linears 1.15-1.6x faster than oneDNN's packed ones at 1-128 rows; on a 2-core
  AVX2 EPYC oneDNN was the faster. Hence the probe.

- `native` (float32 on a CPU with AVX2 and FMA, bfloat16 on one with AVX-512 BF16, where the
  engine's C++ kernels build): the engine's own packed GEMMs, written for decode sizes. The
  sgemm (`kernels/packed_sgemm.cpp`) ran the 135M shape's linears on a 2-core AVX2 EPYC at
  1.3x oneDNN's packed ones at 32 rows, 1.25x at 64, 1.2-1.6x at 1-16, and level or faster
  at prefill sizes; the bfloat16 GEMM (`kernels/packed_bf16.cpp`, `vdpbf16ps`) on a 2-core
  Zen 4 EPYC at 1.5x oneDNN's bfloat16 ones at 1-2 rows, 1.2-1.3x at 8-64 and level at 256.

`auto` measures the candidates at startup (`probe_speedups`) and takes the fastest.
`benchmarks/linear_backends.py` times them at any row count, prefill sizes included.

Memory: packing moves a weight into the packed copy and frees the dense one (memory-neutral),
except where the dense weight is shared (a tied LM head is also the input embedding), which
costs its size again. `unpack_linears` restores the dense weights exactly (an MKL-packed
weight is read back as identity x W^T: every product is by 1 or 0, so every value is exact,
though a -0.0 weight comes back as +0.0).

Exactness: the packed kernels sum in another order than `F.linear` (float32 logits differ by
about 1e-6 relative), so they only run for float32 and bfloat16; float64, the dtype of the
bit-exact parity and invariance tests, always takes the plain path.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from runtime import huge_pages, sgemm_prefetch
from runtime.architectures.layers import Linear, sample_by_shape
from runtime.attention_kernels import NativeKernelUnavailable, load_native_kernel
from runtime.hardware import release_freed_memory

logger = logging.getLogger(__name__)

LinearBackend = Literal["auto", "torch", "onednn", "mkl", "native"]
LINEAR_BACKENDS: tuple[str, ...] = ("auto", "torch", "onednn", "mkl", "native")
PACKED_BACKENDS: tuple[str, ...] = ("onednn", "mkl", "native")
LIBRARY_NAMES = {"onednn": "oneDNN", "mkl": "MKL", "native": "the engine's GEMM"}
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


def _cpp_kernel(available_op: str, dtype: torch.dtype, device: torch.device,
                dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """True when the engine's C++ kernels build here and their `available_op` says the kernel
    it names can run (`dtypes` on a CPU only)."""
    if device.type != "cpu" or dtype not in dtypes:
        return False
    try:
        load_native_kernel()
    except NativeKernelUnavailable:
        return False
    return bool(getattr(torch.ops.baton_kernels, available_op)())


def mkl_packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """True when MKL's packed sgemm can run a weight of `dtype` here (float32 on a CPU whose
    torch links MKL, with the engine's C++ kernels built)."""
    return _cpp_kernel("mkl_available", dtype, device)


def native_packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """True when the engine's own packed GEMM can run a weight of `dtype` here: float32 on a
    CPU whose C++ kernels built with AVX2 and FMA, bfloat16 on one with AVX-512 BF16."""
    if dtype == torch.bfloat16:
        return _cpp_kernel("bf16_gemm_available", dtype, device, (torch.bfloat16,))
    return _cpp_kernel("sgemm_available", dtype, device)


def packing_supported(backend: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the packed `backend` (one of `PACKED_BACKENDS`) can run `dtype` weights here."""
    if backend == "mkl":
        return mkl_packing_supported(dtype, device)
    if backend == "native":
        return native_packing_supported(dtype, device)
    return onednn_packing_supported(dtype, device)


def pack_weight(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """`weight` (out, in) in the packed layout of `backend`; the dense tensor is not changed."""
    if backend == "mkl":
        return torch.ops.baton_kernels.mkl_pack(weight.detach())
    if backend == "native" and weight.dtype == torch.bfloat16:
        return torch.ops.baton_kernels.bf16_pack(weight.detach())
    if backend == "native":
        return torch.ops.baton_kernels.sgemm_pack(weight.detach())
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def dense_weight(linear: Linear) -> torch.Tensor:
    """`linear`'s dense (out, in) weight: the parameter's tensor while unpacked or shared (a
    tied head keeps the embedding's), else a copy read back exactly from the packed one."""
    if linear.packed is None or linear.weight.numel():
        return linear.weight.detach()
    if linear.packed_by == "mkl":  # identity x W^T, without the bias
        eye = torch.eye(linear.in_features, dtype=torch.float32)
        return torch.ops.baton_kernels.mkl_linear(eye, linear.packed, linear.out_features,
                                                  None).t().contiguous()
    if linear.packed_by == "native" and linear.packed.dtype == torch.bfloat16:
        return torch.ops.baton_kernels.bf16_unpack(linear.packed, linear.out_features,
                                                   linear.in_features)
    if linear.packed_by == "native":  # the packing only moved the values
        return torch.ops.baton_kernels.sgemm_unpack(linear.packed, linear.out_features)
    return linear.packed.to_dense()


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
def pack_linears(model: nn.Module, backend: str = "onednn") -> int:
    """Pack every linear's weight for `backend` (one of `PACKED_BACKENDS`); returns the extra bytes
    held (shared weights).

    Idempotent: linears already packed for `backend` are left alone; those packed for the
    other one are unpacked first.
    """
    global _PACKING_GENERATION
    if backend not in PACKED_BACKENDS:
        raise ValueError(f"pack_linears: backend must be one of {PACKED_BACKENDS}, got {backend!r}")
    if any(m.packed is not None and m.packed_by != backend for m in model_linears(model)):
        unpack_linears(model)
    shared = _shared_weights(model)
    extra = 0
    packed_now = []
    for linear in model_linears(model):
        if linear.packed is not None:
            continue
        _PACKING_GENERATION += 1
        weight = linear.weight
        linear.packed = pack_weight(weight, backend)
        linear.packed_by = backend
        packed_now.append(linear)
        if id(weight) in shared:
            extra += weight.numel() * weight.element_size()
        else:  # the packed copy replaces the dense one
            weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
    if backend in HUGE_PAGE_BACKENDS:
        copies = huge_pages.gather([linear.packed for linear in packed_now])
        for linear, copy in zip(packed_now, copies or (), strict=False):
            linear.packed = copy
        if copies:  # the heap copies just freed would otherwise stay resident
            release_freed_memory()
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
            linear.weight.data = dense_weight(linear)
        linear.packed = None
        linear.packed_by = None


# The engine's own packed weights move into one huge-page arena (`runtime.huge_pages`), which a
# decode step streams with fewer TLB misses: the bfloat16 GEMMs of a pass ran 1.19-1.21x as
# fast at one or two rows, 1.09x at 8 and 1.03x at 32 (docs/benchmarks.md). MKL's and
# oneDNN's formats are opaque: an MKL-packed weight copied elsewhere computed other values
# (its layout depends on where it was packed), so those stay where their library put them.
HUGE_PAGE_BACKENDS = ("native",)
MIN_SPEEDUP = 1.05  # a packed kernel must beat `F.linear` by this much to be chosen
# A first probe this close to MIN_SPEEDUP is re-measured over three times the rounds: a busy
# 2-core host moved one backend from 1.16x to 0.93x between two startups.
CLOSE_CALL = 0.1
PROBE_ROUNDS = 5
PROBE_CALLS = 4  # linears timed per shape and round, scaled up to the shape's count per pass


def _probe_sample(model: nn.Module) -> list[tuple[list[Linear], int]]:
    """Up to `PROBE_CALLS` of the model's unpacked linears per shape (the head included),
    with how many of that shape a pass runs (`sample_by_shape`)."""
    return sample_by_shape((linear for linear in model_linears(model) if linear.packed is None),
                           PROBE_CALLS)


@torch.inference_mode()
def probe_speedups(model: nn.Module, backends: tuple[str, ...], rounds: int = PROBE_ROUNDS
                   ) -> dict[str, float]:
    """Measured `F.linear` time over each packed backend's, for one pass's linears.

    At each of `PROBE_ROWS`, interleaved rounds (a burst of background load hits every
    contender alike) time each distinct weight shape (`_probe_sample`); the speedup at a row
    count is the ratio of the estimated pass times, and the result is the geometric mean over
    row counts, so batch 1 and batch 64 weigh the same in relative terms.
    """
    sample = _probe_sample(model)
    packed = {b: [[pack_weight(m.weight, b) for m in group] for group, _ in sample]
              for b in backends}
    log_speedups = dict.fromkeys(backends, 0.0)
    for rows in PROBE_ROWS:
        xs = [torch.randn(rows, group[0].in_features, dtype=group[0].weight.dtype)
              for group, _ in sample]

        def pass_seconds(backend: str, xs=xs) -> float:
            total = 0.0
            for i, (group, count) in enumerate(sample):
                start = time.perf_counter()
                for j, m in enumerate(group):
                    if backend == "torch":
                        F.linear(xs[i], m.weight, m.bias)
                    else:
                        m.packed_forward(xs[i], packed[backend][i][j], backend)
                total += (time.perf_counter() - start) * count / len(group)
            return total

        names = ("torch", *backends)
        for name in names:  # warm-up: first calls build kernels
            pass_seconds(name)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(rounds):
            for name in names:
                seconds[name].append(pass_seconds(name))
        plain = statistics.median(seconds["torch"])
        for b in backends:
            log_speedups[b] += math.log(plain / statistics.median(seconds[b]))
    return {b: math.exp(total / len(PROBE_ROWS)) for b, total in log_speedups.items()}


_PROBE_CACHE: dict[tuple, dict[str, float]] = {}


def choose_linear_backend(model: nn.Module, requested: str = "auto") -> LinearChoice:
    """Decide the linears' kernel for this model, device and dtype (see the module docstring).

    `auto` packs when a packed kernel supports the dtype here and a short probe (about a
    second on a 135M model, longer when the first result is a close call; cached per process
    and shape) measures it the fastest, and faster than `F.linear` by `MIN_SPEEDUP`.
    """
    if requested not in LINEAR_BACKENDS:
        raise ValueError(f"linear_backend: expected one of {', '.join(LINEAR_BACKENDS)}, "
                         f"got {requested!r}")
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    if requested == "torch":
        return LinearChoice("torch", "requested")
    if requested in PACKED_BACKENDS:
        if not packing_supported(requested, dtype, device):
            library = LIBRARY_NAMES[requested]
            raise ValueError(f"linear_backend {requested}: {library} cannot pack {dtype} "
                             f"weights on {device.type} here; use auto or torch")
        return LinearChoice(requested, "requested")
    candidates = tuple(b for b in PACKED_BACKENDS if packing_supported(b, dtype, device))
    if not candidates:
        return LinearChoice("torch", f"no packed kernel for {dtype} on {device.type}")
    linears = model_linears(model)
    if all(m.packed is not None for m in linears) and linears[0].packed_by in candidates:
        return LinearChoice(linears[0].packed_by, "already packed")
    unpack_linears(model)  # the probe reads the dense weights
    key = (dtype, torch.get_num_threads(), candidates,
           tuple(tuple(m.weight.shape) for m in linears[:8]))
    if key not in _PROBE_CACHE:
        speedups = probe_speedups(model, candidates)
        if abs(max(speedups.values()) - MIN_SPEEDUP) < CLOSE_CALL:  # within the noise
            speedups = probe_speedups(model, candidates, rounds=3 * PROBE_ROUNDS)
        _PROBE_CACHE[key] = speedups
    speedups = _PROBE_CACHE[key]
    measured = ", ".join(f"{b} {x:.2f}x" for b, x in speedups.items())
    best = max(speedups, key=speedups.__getitem__)
    if speedups[best] > MIN_SPEEDUP:
        return LinearChoice(best, f"probe, against F.linear: {measured}")
    return LinearChoice("torch", f"probe, no packed kernel faster than F.linear: {measured}")


def apply_linear_backend(model: nn.Module, requested: str = "auto") -> LinearChoice:
    """Choose and apply the kernel; logs the choice and its memory cost."""
    choice = choose_linear_backend(model, requested)
    if choice.backend in PACKED_BACKENDS:
        extra = pack_linears(model, choice.backend)
        choice = LinearChoice(choice.backend, choice.reason, extra)
    else:
        unpack_linears(model)
    logger.info("linear kernels: %s (%s; %.0f MiB extra for shared weights)",
                choice.backend, choice.reason, choice.extra_bytes / 2**20)
    if choice.backend == "native":  # how its float32 GEMMs ask for weights, measured
        sgemm_prefetch.tune(model)
    return choice
