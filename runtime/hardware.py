"""What this machine can do fast, decided at startup: dtype, threads, OpenMP and allocator.

The project's machines change from day to day (one had AVX2 only, where a bfloat16 matmul ran
100x slower than float32; another had AMX, where bfloat16 GEMMs ran 2-5x faster), so nothing
here assumes one: each choice reads the CPU or the environment and is logged with its reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True, slots=True)
class CpuInfo:
    """The CPU facts the startup choices depend on."""

    model_name: str
    flags: frozenset[str]
    physical_cores: int

    @property
    def native_bf16(self) -> bool:
        """True when bfloat16 matmul runs in hardware (AMX or AVX-512 BF16)."""
        return any(flag in self.flags for flag in NATIVE_BF16_FLAGS)


def _parse_cpuinfo(text: str, allowed: set[int]) -> CpuInfo:
    """Model name, flags and physical cores (distinct package/core ids) of the allowed CPUs."""
    name, flags, cores = "unknown", frozenset(), set()
    for block in text.strip().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if "processor" not in fields or int(fields["processor"]) not in allowed:
            continue
        name = fields.get("model name", name)
        flags = frozenset(fields.get("flags", "").split()) or flags
        cores.add((fields.get("physical id", "0"), fields.get("core id", fields["processor"])))
    return CpuInfo(name, flags, max(len(cores), 1))


@cache
def cpu_info() -> CpuInfo:
    """This machine's CPU as the process may use it (its affinity mask), read once."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    try:
        info = _parse_cpuinfo(Path("/proc/cpuinfo").read_text(), allowed)
    except OSError:  # not Linux: trust torch's own probe for bf16, one core per CPU
        info = CpuInfo("unknown", frozenset(), len(allowed) or os.cpu_count() or 1)
    try:  # torch's cpuinfo-based probe also sees flags a hypervisor hides from /proc
        import torch

        extra = {f for f, ok in (("amx_bf16", torch.cpu._is_amx_tile_supported()),
                                 ("avx512_bf16", torch.cpu._is_avx512_bf16_supported())) if ok}
    except (ImportError, AttributeError, RuntimeError):
        extra = set()
    return CpuInfo(info.model_name, info.flags | extra, info.physical_cores)


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    dtype: str
    reason: str


HALF_TYPES = ("bfloat16", "float16")


def choose_auto_dtype(checkpoint_dtype: str, device_type: str, cpu: CpuInfo) -> DtypeChoice:
    """`--dtype auto`: the fastest dtype that keeps the checkpoint's precision class.

    Full-precision checkpoints (float32, float64) keep their dtype. Half-precision ones run in
    their own dtype on CUDA, in bfloat16 on a CPU with native bfloat16 matmul, and upcast to
    float32 on a CPU without it (where bfloat16 GEMMs are emulated and far slower).
    """
    if checkpoint_dtype not in HALF_TYPES:
        return DtypeChoice(checkpoint_dtype, f"checkpoint is {checkpoint_dtype}")
    if device_type == "cuda":
        return DtypeChoice(checkpoint_dtype, f"{checkpoint_dtype} checkpoint on CUDA")
    if cpu.native_bf16:
        have = sorted(f for f in NATIVE_BF16_FLAGS if f in cpu.flags)
        return DtypeChoice("bfloat16", f"{checkpoint_dtype} checkpoint; CPU has {', '.join(have)}")
    return DtypeChoice("float32", f"{checkpoint_dtype} checkpoint upcast: this CPU has no "
                                  "native bfloat16 matmul (no AMX or AVX-512 BF16)")


def warn_if_slow_dtype(dtype: str, device_type: str, cpu: CpuInfo) -> str | None:
    """The warning for an explicit half dtype this CPU can only emulate, or None."""
    if device_type != "cpu" or dtype not in HALF_TYPES or cpu.native_bf16:
        return None
    return (f"--dtype {dtype} on a CPU without native bfloat16 matmul (no AMX or AVX-512 BF16): "
            "GEMMs are emulated and can run 10-100x slower than float32; --dtype auto picks "
            "float32 here")


@dataclass(frozen=True, slots=True)
class ThreadChoice:
    num_threads: int
    reason: str


def choose_num_threads(requested: int | None, cpu: CpuInfo | None = None) -> ThreadChoice:
    """Torch intra-op threads: as asked, else one per physical core this process may use.

    Hyperthreads share a core's FMA units, so a thread per logical CPU makes GEMMs no faster
    and makes OpenMP barriers wait on the slowest sibling.
    """
    if requested:
        return ThreadChoice(requested, "requested")
    cpu = cpu or cpu_info()
    return ThreadChoice(cpu.physical_cores, "one per physical core")


SPIN_COUNT = "300000"  # libgomp's own default when no policy is set: well under a millisecond
BUSY_CPUS_FOR_PASSIVE = 0.5  # other work on at least half a CPU at start: sleep, do not spin
# Names the variable our own choice set, so a `runtime` started by another (a server launched
# by `runtime bench serve`) measures its own start instead of taking the parent's as the user's.
AUTO_MARK = "RUNTIME_OPENMP_AUTO"


def _cpu_jiffies(stat_path: str) -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from `/proc/stat`; steal time (the hypervisor's) is
    neither, so a noisy host does not count as local load."""
    try:
        with open(stat_path) as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:7])  # user nice system idle iowait irq softirq; not steal/guest
    return total - idle, total


def busy_cpus(window: float = 0.25, stat_path: str = "/proc/stat") -> float | None:
    """CPUs' worth of work other processes run now, sampled over `window` seconds (None when
    `/proc/stat` is unreadable). Called while this process is still idle at startup."""
    before = _cpu_jiffies(stat_path)
    time.sleep(window)
    after = _cpu_jiffies(stat_path)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def set_openmp_defaults(environ: dict[str, str] | None = None,
                        busy: float | None = None, measure: bool = True) -> str:
    """Choose how idle OpenMP threads wait, unless the user chose; returns what was decided.

    Must run before torch is imported (libgomp reads its environment when it loads). Measured
    on a 2-core machine (docs/benchmarks.md): when nothing else runs, worker threads that spin
    briefly between the ops of a step beat sleeping ones (batch-1 TPOT over HTTP 78 against
    91 ms; the same at 32 rows), but when another process is busy on the cores, spinning
    threads take the cores the others need (a 32-row step 664 against 427 ms). So: sample the
    machine's load for a quarter second (`busy`, when not given) and sleep (PASSIVE) when other
    work uses half a CPU or more, or when the load cannot be read; otherwise spin briefly.
    """
    env = os.environ if environ is None else environ
    inherited = env.pop(AUTO_MARK, None)  # a parent `runtime` decided for its own start
    if inherited is not None and inherited in env:
        del env[inherited]
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', '')!s} GOMP_SPINCOUNT=" \
               f"{env.get('GOMP_SPINCOUNT', '')!s} (set by the user)"
    if busy is None and measure:
        busy = busy_cpus()
    if busy is None or busy >= BUSY_CPUS_FOR_PASSIVE:
        env["OMP_WAIT_POLICY"], env[AUTO_MARK] = "PASSIVE", "OMP_WAIT_POLICY"
        load = "load unknown" if busy is None else f"other work on {busy:.1f} CPUs at start"
        return f"OMP_WAIT_POLICY=PASSIVE ({load}: idle threads sleep; set it to override)"
    env["GOMP_SPINCOUNT"], env[AUTO_MARK] = SPIN_COUNT, "GOMP_SPINCOUNT"
    return (f"GOMP_SPINCOUNT={SPIN_COUNT} (other work on {busy:.1f} CPUs at start: idle threads "
            "spin briefly between ops; OMP_WAIT_POLICY=PASSIVE on a machine shared with "
            "CPU-heavy jobs)")


def call_on_fresh_thread(fn: Callable[[], T]) -> T:
    """`fn()` on a short-lived thread: its OpenMP threads leave with it.

    libgomp keeps a team of worker threads for every thread that has run a parallel region,
    idle or not, and once a process holds more OpenMP threads than CPUs it stops spinning
    between regions (its "throttled" spin count, 100) and every op pays a futex wake. Loading
    and compiling a model on one thread and stepping it on another is enough: on 2 cores a
    batch-1 decode step on the engine thread took 50-66 ms instead of 29-32. So build the
    engine here, and step it on one thread; the builder's team goes when it exits.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised on the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name="build-engine")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_MMAP_THRESHOLD = -3  # moot with mmap off; benchmarks/prefill_passes.py sets it
M_ARENA_MAX = -8


def keep_freed_memory(keep_top_bytes: int = 2**30) -> bool:
    """Stop glibc returning freed activation buffers to the OS after every forward pass.

    By default, buffers over 128 KiB are mmap'ed and unmapped when freed, so the next pass
    page-faults them back in (a 1,024-token prefill took 187k minor faults, 17% of its time).
    Raising the mmap and trim thresholds (as this did first) kept them in the heap for reuse,
    but glibc caps the mmap threshold at 32 MiB, so a buffer above it (a pass over ~2,700
    tokens of a 576-wide model: its MLP's `(tokens, 2 x 1536)` output) was still mapped afresh
    every pass: 0.23M faults in
    a 4,096-token pass, 1.05M in an 8,192-token one, which then ran 1.05-1.13x slower per
    token. So mmap is turned off (`M_MMAP_MAX` 0) and every thread allocates from the main
    arena (`M_ARENA_MAX` 1: another thread's arena is made of 64 MiB heaps and maps anything
    larger anyway): big buffers come from the heap and are reused. Up to `keep_top_bytes`
    free at the heap's top stays there (more goes back to the OS): with glibc's 128 KiB, or
    the 128 MiB kept before, the top of a pass's freed buffers was trimmed and faulted in
    again by the next pass. The price is memory: the heap holds the largest pass's buffers,
    up to about twice their size with the holes between them (a pass of 270 MiB of buffers
    settled at 790 MiB resident against 356 MiB with glibc's defaults). Call it before the
    engine's threads start; threads already attached to an arena keep it. True if applied.
    """
    libc = _glibc()
    if libc is None:
        return False
    try:
        settings = ((M_TRIM_THRESHOLD, keep_top_bytes), (M_ARENA_MAX, 1), (M_MMAP_MAX, 0))
        return all([libc.mallopt(option, value) == 1 for option, value in settings])
    except AttributeError:  # not glibc
        return False


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim`), after a one-off
    release of a large block (the dense weight copies `runtime.static_graphs` drops): with
    `keep_freed_memory`'s settings glibc would otherwise keep it resident until reused. True
    if glibc released any."""
    libc = _glibc()
    if libc is None:
        return False
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:  # not glibc
        return False


def _glibc() -> ctypes.CDLL | None:
    """The C library, for glibc's allocator controls; None where it cannot be loaded."""
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None
