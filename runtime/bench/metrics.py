"""Benchmark metrics from per-request token timestamps and per-pass engine statistics.

Latency definitions follow `vllm bench serve` so numbers are comparable: TTFT from arrival to
the first token, TPOT = (latency - ttft) / (output_tokens - 1) per request, ITL the gaps between
consecutive token (chunk) arrivals, E2EL arrival to last token. Idle computation and memory
come from the engine's `on_step_end` StepStats (offline runs only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime import hookimpl
from runtime.scheduling import StepStats

PERCENTILES = (50, 99)
LATENCY_KEYS = ("ttft", "tpot", "itl", "e2el")


@dataclass(slots=True)
class RequestTrace:
    """One request's timeline on a single clock (seconds): arrival and each token's arrival."""

    prompt_len: int
    output_len: int
    arrival: float
    token_times: list[float] = field(default_factory=list)
    success: bool = True
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def e2el(self) -> float:
        return self.token_times[-1] - self.arrival


STALL_FACTOR = 2.0  # a decode pass this many times its batch size's median is a stall
STALL_MIN_PASSES = 3  # decode passes of one batch size needed for a median to judge by


@dataclass(frozen=True, slots=True)
class PassTrace:
    """One forward pass: phase, seconds, the idle-computation counts of its PassStats and how
    many requests it ran (0 where unknown)."""

    phase: str
    seconds: float
    useful_tokens: int
    computed_tokens: int
    useful_pairs: int
    computed_pairs: int
    requests: int = 0


@dataclass(slots=True)
class RunTrace:
    """Everything one benchmark run recorded; `compute_metrics` turns it into numbers."""

    requests: list[RequestTrace]
    start: float
    end: float
    passes: list[PassTrace] = field(default_factory=list)
    memory: list[tuple[int, int]] = field(default_factory=list)  # (allocated, used) elements/step
    bytes_per_element: int = 4
    cpu_seconds: float | None = None  # process CPU time of the run (robust on a busy machine)


def request_timelines(trace: RunTrace) -> list[dict]:
    """Each request's timeline, in seconds from the run's start: what the aggregates in
    results.json come from, kept so that a TPOT gap can be traced to the tokens that made it
    (those of the first requests while later prompts are prefilled, say)."""
    return [{"prompt_len": r.prompt_len, "output_len": r.output_len,
             "arrival": round(r.arrival - trace.start, 6),
             "token_times": [round(t - trace.start, 6) for t in r.token_times],
             "success": r.success, "error": r.error} for r in trace.requests]


class StepRecorder:
    """Observer plugin: collects every step's passes and KV memory into a RunTrace."""

    def __init__(self) -> None:
        self.passes: list[PassTrace] = []
        self.memory: list[tuple[int, int]] = []

    @hookimpl
    def on_step_end(self, stats: StepStats) -> None:
        for p, sec in zip(stats.passes, stats.pass_seconds, strict=False):
            self.passes.append(
                PassTrace(
                    p.phase.value,
                    sec,
                    p.useful_tokens,
                    p.computed_tokens,
                    p.useful_attention_pairs,
                    p.computed_attention_pairs,
                    p.num_requests,
                )
            )
        self.memory.append((stats.memory.allocated_elements, stats.memory.used_elements))


def _stats(name: str, values_s: Sequence[float]) -> dict[str, float]:
    """mean/median/std/pNN of `values_s` (seconds) as `<stat>_<name>_ms`, vLLM's spelling."""
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    if arr.size == 0:
        arr = np.zeros(1)
    out = {
        f"mean_{name}_ms": float(arr.mean()),
        f"median_{name}_ms": float(np.median(arr)),
        f"std_{name}_ms": float(arr.std()),
    }
    for p in PERCENTILES:
        if p != 50:
            out[f"p{p}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def latency_samples(requests: Iterable[RequestTrace]) -> dict[str, list[float]]:
    """Per-request TTFT, TPOT, E2EL and every inter-token gap, in seconds (successful only)."""
    out: dict[str, list[float]] = {k: [] for k in LATENCY_KEYS}
    for r in requests:
        if not r.success or not r.token_times:
            continue
        out["ttft"].append(r.ttft)
        out["e2el"].append(r.e2el)
        if r.output_len > 1:
            out["tpot"].append((r.e2el - r.ttft) / (r.output_len - 1))
        out["itl"].extend(b - a for a, b in zip(r.token_times, r.token_times[1:], strict=False))
    return out


def compute_metrics(trace: RunTrace) -> dict[str, float | int]:
    """vLLM's result keys plus idle computation, KV memory and prefill/decode time."""
    ok = [r for r in trace.requests if r.success and r.token_times]
    duration = max(trace.end - trace.start, 1e-9)
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    out: dict[str, float | int] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(trace.requests) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    if trace.cpu_seconds:
        out["cpu_time_s"] = trace.cpu_seconds
        out["output_tokens_per_cpu_s"] = output_tokens / trace.cpu_seconds
        out["requests_per_cpu_s"] = len(ok) / trace.cpu_seconds
    for name, values in latency_samples(ok).items():
        out |= _stats(name, values)
    if trace.passes:
        out |= pass_metrics(trace.passes)
        bound = arrival_bound(ok, trace.passes, trace.start)
        if bound is not None:
            out["arrival_bound_s"] = bound
            out["makespan_over_arrival_bound"] = duration / bound
    if trace.memory:
        out |= memory_metrics(trace.memory, trace.bytes_per_element)
    return out


def arrival_bound(
    requests: Sequence[RequestTrace], passes: Sequence[PassTrace], start: float
) -> float | None:
    """The makespan no scheduler could beat on these arrivals with this engine: every request
    served alone from its arrival, each of its tokens costing the run's fastest pass and its
    prompt nothing. None without requests or passes.

    Why: with arrivals spread in time a run ends soon after the last one, and its throughput
    is then set by the arrivals, not by the scheduler. `makespan / bound` is the most any
    scheduler could lead this run by in throughput on this trace (on `orca-trace` at 4
    requests a second a bfloat16 Orca left at most 1.18-1.35x; with the requests all at once
    it is large, and the run is compute-bound)."""
    fastest = min((p.seconds for p in passes if p.seconds > 0), default=None)
    if fastest is None or not requests:
        return None
    return max(r.arrival + r.output_len * fastest for r in requests) - start


def pass_metrics(passes: Sequence[PassTrace]) -> dict[str, float | int]:
    """Idle computation (computed vs useful token slots and attention pairs) and phase times."""
    computed = sum(p.computed_tokens for p in passes)
    useful = sum(p.useful_tokens for p in passes)
    computed_pairs = sum(p.computed_pairs for p in passes)
    useful_pairs = sum(p.useful_pairs for p in passes)
    out: dict[str, float | int] = {
        "num_passes": len(passes),
        "computed_token_slots": computed,
        "useful_token_slots": useful,
        "idle_token_fraction": 1.0 - useful / computed if computed else 0.0,
        "computed_attention_pairs": computed_pairs,
        "useful_attention_pairs": useful_pairs,
        "idle_attention_fraction": 1.0 - useful_pairs / computed_pairs if computed_pairs else 0.0,
        "forward_time_s": sum(p.seconds for p in passes),
    }
    for phase in ("prefill", "decode", "mixed"):
        out[f"{phase}_time_s"] = sum(p.seconds for p in passes if p.phase == phase)
        out[f"{phase}_passes"] = sum(1 for p in passes if p.phase == phase)
    out["decode_stall_passes"], out["decode_stall_s"] = decode_stalls(passes)
    return out


def decode_stalls(passes: Sequence[PassTrace]) -> tuple[int, float]:
    """Decode passes that took over `STALL_FACTOR` times the median of the run's decode passes
    of the same batch size, and the seconds they took beyond that median.

    Why: a decode pass costs about the same at a given batch size, so one that takes several
    times as long did something else: a recompile, a reallocation, a probe of a slow variant.
    Totals hide it (five such passes a run were 14-19% of Orca's decode time on `varied-64`
    before its `attention: auto` stopped probing the loop beside the kernel,
    docs/benchmarks.md); this names it. Batch sizes with fewer than `STALL_MIN_PASSES`
    decode passes are not judged.
    """
    by_rows: dict[int, list[float]] = {}
    for p in passes:
        if p.phase == "decode" and p.requests > 0:
            by_rows.setdefault(p.requests, []).append(p.seconds)
    count, excess = 0, 0.0
    for seconds in by_rows.values():
        if len(seconds) < STALL_MIN_PASSES:
            continue
        median = float(np.median(seconds))
        slow = [s for s in seconds if s > STALL_FACTOR * median]
        count += len(slow)
        excess += sum(s - median for s in slow)
    return count, excess


def memory_metrics(memory: Sequence[tuple[int, int]], bytes_per_element: int) -> dict[str, float]:
    """KV memory allocated versus holding real tokens, averaged over steps and at peak (MiB)."""
    mib = bytes_per_element / 2**20
    allocated = [a for a, _ in memory]
    used = [u for _, u in memory]
    return {
        "mean_kv_allocated_mib": float(np.mean(allocated)) * mib,
        "peak_kv_allocated_mib": max(allocated) * mib,
        "mean_kv_used_mib": float(np.mean(used)) * mib,
        "kv_usage": sum(used) / sum(allocated) if sum(allocated) else 0.0,
    }


def aggregate(runs: Sequence[dict[str, float | int]]) -> dict[str, float | int]:
    """The median of each metric over repeated runs (robust to one noisy repeat)."""
    if len(runs) == 1:
        return dict(runs[0])
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    out: dict[str, float | int] = {}
    for k in keys:
        values = [r[k] for r in runs]
        median = float(np.median(values))
        ints = all(isinstance(v, int) for v in values)
        out[k] = int(round(median)) if ints and median.is_integer() else median
    return out
