"""The decode-attention kernel every KV layout may use, and the choice between it and SDPA.

A decode step's attention reads every cached key and value once and does little arithmetic on
them, so it should run near memory bandwidth. torch's CPU `scaled_dot_product_attention`
runs one query row as a series of tiny GEMMs and reached about a third of it here (a 2-core
AVX2 host: 32 rows over 211 keys, 30 layers, 48.7 ms against 18.4 ms to merely read the
keys and values; the kernel 21.5 ms). `kernels/decode_attention.cpp` is a plain loop per
(row, KV head) that reads only each row's real keys, where the layout keeps them (no gather,
no padding, no mask), so BATON's dense rows and Orca's slot ranges use the same kernel.

The same build holds the prompts' kernel (`kernels/prompt_attention.cpp`, `DecodeKernel.prompts`):
a prefill pass's prompts, each causal over its own keys in place, float32 or bfloat16 on AVX2 +
FMA (float32 arithmetic; other dtypes keep SDPA), which every packed layout calls where it
applies.

It is compiled for this CPU's instruction set on first use (`torch.utils.cpp_extension`, about
15 s on 2 cores, then cached under `~/.cache/torch_extensions`; processes starting together
take turns, and a build killed midway does not leave the next start waiting: `_build_turn`)
and used on CPU for float32,
float64, bfloat16 and float16 models: arithmetic is float32 (float64 for float64), 16-bit
keys and values are widened as they are loaded. For a bfloat16 model it is about 8x faster
than torch's bfloat16 SDPA on an AVX2 host (docs/benchmarks.md). The same extension holds the
compiled decoder's C++ linear op (`kernels/linear_slots.cpp`, see `runtime.compiled_forward`)
and the MKL packed-sgemm linears (`kernels/mkl_linear.cpp`, see `runtime.linear_kernels`).
`attention_backend`:

- `auto` (default): the kernel where it applies and builds; otherwise SDPA, with the reason
  logged (CUDA, no C++ compiler);
- `native`: the kernel, or an error saying why it cannot run;
- `sdpa`: torch's SDPA everywhere (the reference the kernel is tested against).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.hardware import cpu_info

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "sdpa", "native")
NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
PROMPT_DTYPES = (torch.float32, torch.bfloat16)  # the prompts' kernel: float32 arithmetic
SOURCES = tuple(Path(__file__).parent / "kernels" / name
                for name in ("decode_attention.cpp", "attend_plan.cpp", "linear_slots.cpp",
                             "mkl_linear.cpp", "packed_sgemm.cpp", "packed_bf16.cpp",
                             "prompt_attention.cpp"))


class DecodeKernel:
    """Single-query attention over keys addressed in place (see the C++ file's header), and
    the prompts' causal attention (`prompts`, `segment`) where it applies (`attends_prompts`).

    q `(n, H, D)`, each row's heads dense (any row stride: q as a view of a fused projection);
    `k`/`v` a layer's contiguous K/V storage (q's dtype, or bfloat16 or float16 under a
    float32/float64 q: a 16-bit `kv_cache_dtype`); row r reads
    `counts[r]` keys from element `offsets[r]`, key j of KV head h at
    `offsets[r] + j * key_stride + h * head_stride`. Returns `(n, H, D)`, scaled by `D**-0.5`.

    With `new_k`/`new_v` (`(n, H_kv, D)`, unit last stride), row r's decode key and value are
    first written to its last key position (`offsets[r] + (counts[r] - 1) * key_stride`): the
    layer's cache write folded into the call (rounded to the cache's dtype; q's dtype in).
    """

    def __init__(self, isa: str) -> None:
        self.isa = isa
        self._op = torch.ops.baton_kernels.decode_attention.default  # no overload lookup
        ops = torch.ops.baton_kernels
        self._prompt_op = (ops.prompt_attention.default if ops.prompt_attention_available()
                           else None)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 offsets: torch.Tensor, counts: torch.Tensor, key_stride: int,
                 head_stride: int, kv_heads: int, new_k: torch.Tensor | None = None,
                 new_v: torch.Tensor | None = None) -> torch.Tensor:
        if new_k is not None and new_k.stride(-1) != 1:  # the kernel needs dense vectors
            new_k = new_k.contiguous()
        if new_v is not None and new_v.stride(-1) != 1:
            new_v = new_v.contiguous()
        return self._op(q, k, v, offsets, counts, key_stride, head_stride, kv_heads, new_k, new_v)

    def attends_prompts(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether `prompts` takes these: float32 or bfloat16 queries and keys of one dtype
        on a CPU build with AVX2 and FMA, head size a multiple of 16, unit last strides.
        Otherwise prompts go through SDPA (a 16-bit cache under a float32 model, float64)."""
        return (self._prompt_op is not None and q.dtype in PROMPT_DTYPES
                and k.dtype == q.dtype and q.device.type == "cpu"
                and q.shape[-1] % 16 == 0 and q.stride(-1) == 1 and k.stride(-1) == 1)

    def prompts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                segments: torch.Tensor, key_stride: int, head_stride: int,
                kv_heads: int) -> torch.Tensor:
        """Causal attention of packed prompts over keys in place (`kernels/prompt_attention.cpp`).

        `segments` `(S, 4)` int64 rows `(q_row, length, past, key_offset)`: queries
        `q[q_row:q_row+length]` at positions `past..`, each seeing keys `0..past+i`, key j of
        KV head h at element `key_offset + j * key_stride + h * head_stride` of `k` / `v`
        (views with unit last stride; the bound is their storage). Returns `(sum of lengths,
        H, D)`, the segments in order, scaled by `D**-0.5` like SDPA.
        """
        return self._prompt_op(q, k, v, segments, key_stride, head_stride, kv_heads)

    def segment(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                past: int) -> torch.Tensor:
        """One prompt's queries `(n, H, D)` at positions `past..` over its keys `(S, H_kv, D)`
        (any strided views of one storage each, unit last stride) -> `(n, H, D)`."""
        segments = torch.tensor([[0, q.shape[0], past, 0]])
        return self.prompts(q, keys, values, segments, keys.stride(0), keys.stride(1),
                            keys.shape[1])


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """A decode-only pass's whole attention as one decode-kernel call per layer, which the
    compiled decoder's C++ attention op then makes itself, without calling the layout's
    handle back in Python (`kernels/attend_plan.cpp`; about 1.5 ms of interpreter time per
    30-layer step). A layout's handle offers one through `decode_plan()` where its decode
    rows are all the pass has; the arguments are `DecodeKernel.__call__`'s, per layer
    `keys[l]` / `values[l]`, the pass's new keys and values appended as `new_k` / `new_v`.
    `on_done` gets the seconds the kernel calls took (layouts that time their attention)."""

    keys: Sequence[torch.Tensor]
    values: Sequence[torch.Tensor]
    offsets: torch.Tensor
    counts: torch.Tensor
    key_stride: int
    head_stride: int
    kv_heads: int
    on_done: Callable[[float], None] | None = None


class NativeKernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


@dataclass(frozen=True, slots=True)
class AttentionChoice:
    backend: str  # "native" or "sdpa"
    reason: str
    kernel: DecodeKernel | None = None


def instruction_set() -> tuple[str, list[str]]:
    """The ISA to build for and its compiler flags: AVX-512 BF16 (with BW and VL) where this
    CPU has it (bfloat16 scores by `vdpbf16ps` and values widened in registers: a bfloat16
    model's decode attention 0.65-0.70x the time of the widening loop), else AVX-512
    (foundation) on top of AVX2 (the 16-lane loops for float32 keys, 1.17-1.27x the 8-lane
    ones), else AVX2+FMA+F16C (every AVX2 CPU has them; F16C widens float16 keys)."""
    flags = cpu_info().flags
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    if {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags:
        return "avx512bf16", [*avx2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
    if {"avx2", "fma", "f16c", "avx512f"} <= flags:
        return "avx512", [*avx2, "-mavx512f"]
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2", avx2
    return "generic", []


_LOCK = threading.Lock()
_LOADED: DecodeKernel | None = None
_FAILURE: str | None = None


BUILD_TURN_FILE = "baton-build.flock"  # beside torch's own `lock` in the build directory


@contextlib.contextmanager
def _build_turn(name: str) -> Iterator[None]:
    """Hold this machine's turn to build or check extension `name`, and clear a `lock` file
    that a killed build left behind.

    Why: `cpp_extension.load` takes its build directory by creating a `lock` file and waits,
    forever, while one exists. A process killed while it held it (a server stopped during its
    first build, a test's child timed out) left every later start of the kernel waiting,
    with no message. An `flock` is released by the kernel when its holder dies, so every
    loader takes one first: whoever holds it and still finds torch's `lock` knows its maker
    is gone, and removes it. Where the build directory cannot be known or locked, torch's
    own waiting is all there is, as before."""
    try:
        import fcntl  # POSIX only

        from torch.utils.cpp_extension import _get_build_directory  # torch's own path rule

        directory = Path(_get_build_directory(name, verbose=False))
        handle = (directory / BUILD_TURN_FILE).open("a")
    except Exception:  # no fcntl, a torch without the helper, or an unwritable cache
        yield
        return
    with handle:  # closing it gives the turn up
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits while another process builds
        stale = directory / "lock"
        if stale.exists():
            logger.warning("removing %s, left by a kernel build that was killed", stale)
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
        yield


def load_native_kernel() -> DecodeKernel:
    """Build (first time on this machine) and load the kernel, once per process.

    The build is named after the ISA so a cache shared between machines of different CPUs
    never loads code this CPU cannot run. Raises `NativeKernelUnavailable` with the reason.
    """
    global _LOADED, _FAILURE
    with _LOCK:
        if _LOADED is not None:
            return _LOADED
        if _FAILURE is not None:
            raise NativeKernelUnavailable(_FAILURE)
        isa, isa_flags = instruction_set()
        started = time.perf_counter()
        try:
            from torch.utils import cpp_extension

            name = f"baton_kernels_{isa}"
            with _build_turn(name):
                cpp_extension.load(
                    name=name, sources=[str(s) for s in SOURCES],
                    extra_cflags=["-O3", "-fopenmp", *isa_flags], extra_ldflags=["-fopenmp"],
                    is_python_module=False, verbose=False)
            _LOADED = DecodeKernel(isa)
        except Exception as exc:  # a missing compiler or ninja, a failed build: fall back
            lines = str(exc).strip().splitlines()
            _FAILURE = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
            raise NativeKernelUnavailable(_FAILURE) from exc
        logger.info("decode-attention kernel (%s) ready in %.1f s", isa,
                    time.perf_counter() - started)
        return _LOADED


def choose_attention_backend(requested: str, device: torch.device,
                             dtype: torch.dtype) -> AttentionChoice:
    """Decide the decode attention for this device and dtype (see the module docstring)."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend: expected one of {', '.join(ATTENTION_BACKENDS)}, "
                         f"got {requested!r}")
    if requested == "sdpa":
        return AttentionChoice("sdpa", "requested")
    applies = torch.device(device).type == "cpu" and dtype in NATIVE_DTYPES
    if not applies:
        why = f"the native kernel runs on CPU, not {dtype} on {device}"
        if requested == "native":
            raise ValueError(f"attention_backend native: {why}; use auto or sdpa")
        return AttentionChoice("sdpa", why)
    try:
        kernel = load_native_kernel()
    except NativeKernelUnavailable as exc:
        if requested == "native":
            raise ValueError(f"attention_backend native: the kernel could not be built ({exc}); "
                             "use auto or sdpa") from exc
        logger.warning("decode attention: SDPA, the native kernel could not be built (%s)", exc)
        return AttentionChoice("sdpa", f"native kernel unavailable: {exc}")
    return AttentionChoice("native", f"{requested}: {kernel.isa} kernel for {dtype}", kernel)
