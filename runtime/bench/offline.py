"""Offline benchmark: engines in this process, arrivals replayed against the engine clock.

All contenders (our schedulers, peer engines) share one process and one model folder, and
their repeats are interleaved (A B C, B C A, ...) so slow drifts of a busy machine spread over
all of them instead of biasing the one that happened to run last.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm import tqdm

from runtime.bench.metrics import RequestTrace, RunTrace, StepRecorder, compute_metrics
from runtime.bench.workload import BenchRequest
from runtime.engine import Engine, EngineLimits
from runtime.graph_packages import cache_spec
from runtime.package_builder import ModelSource
from runtime.request import FinishReason
from runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
DEFAULT_SCHEDULER = "default"  # the engine's built-in FCFS admission and per-request cache


class Contender(Protocol):
    """Anything that can replay a request list and report its timeline (engine or peer)."""

    label: str

    def warmup(self) -> None: ...

    def run(self, requests: Sequence[BenchRequest], progress: bool = False) -> RunTrace: ...


def forced_params(output_len: int) -> SamplingParams:
    """Greedy, exactly `output_len` tokens: every contender does the same useful work."""
    return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)


def progress_bar(label: str, total: int, enabled: bool) -> tqdm:
    """A per-run tqdm bar that disappears when done (the summary line stays)."""
    return tqdm(total=total, desc=f"{label:>18}", unit="req", disable=not enabled, leave=False)


def wait_until(clock: Callable[[], float], deadline: float) -> None:
    """Sleep until `clock()` reaches `deadline` (idle engine, next arrival in the future)."""
    delay = deadline - clock()
    if delay > 0:
        time.sleep(delay)


class EngineContender:
    """One of our schedulers: a fresh `Engine` per run over a shared, already loaded model."""

    def __init__(
        self,
        label: str,
        scheduler_name: str,
        model: torch.nn.Module,
        tokenizer: object | None = None,
        limits: EngineLimits | None = None,
        options: dict | None = None,
        linear_backend: str = "auto",
        compile_model: bool = False,
        attention_backend: str = "auto",
        static_decode_rows: tuple[int, ...] = (),
        model_source: ModelSource | None = None,
    ) -> None:
        """`model_source`: where a separate process loads `model` to build its missing bucket
        packages (`runtime.package_builder`); None builds them in this process."""
        self.label = label
        self.static_decode_rows = static_decode_rows
        self.model_source = model_source
        self.attention_backend = attention_backend
        self.linear_backend = linear_backend
        self.compile_model = compile_model
        self.scheduler_name = scheduler_name
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits or EngineLimits()
        self.options = dict(options or {})

    def make_engine(self, observers: tuple[object, ...] = ()) -> Engine:
        if self.scheduler_name == DEFAULT_SCHEDULER:
            scheduler = None
        else:
            from runtime.plugins import instantiate_scheduler

            scheduler = instantiate_scheduler(self.scheduler_name, self.options)
        return Engine(
            self.model,
            self.tokenizer,
            scheduler,
            self.scheduler_name,
            self.limits,
            observers,
            clock=time.perf_counter,
            linear_backend=self.linear_backend,
            compile_model=self.compile_model,
            attention_backend=self.attention_backend,
            static_decode_rows=self.static_decode_rows,
            static_graph_cache=(cache_spec(True, builder=self.model_source)
                                if self.static_decode_rows else None),
        )

    def warmup(self) -> None:
        """A few short requests so first-call costs (allocator, kernels) stay out of the run."""
        vocab = self.model.config.vocab_size
        engine = self.make_engine()
        if self.compile_model:
            engine.warm_up()
        engine.generate(
            [[(7 * i + j) % vocab for j in range(8 + 4 * i)] for i in range(3)], forced_params(4)
        )

    def run(self, requests: Sequence[BenchRequest], progress: bool = False) -> RunTrace:
        recorder = StepRecorder()
        engine = self.make_engine((recorder,))
        pending = collections.deque(sorted(requests, key=lambda r: r.arrival))
        submitted = []
        start = engine.clock()
        with progress_bar(self.label, len(requests), progress) as bar:
            while pending or engine.has_unfinished():
                now = engine.clock() - start
                while pending and pending[0].arrival <= now:
                    br = pending.popleft()
                    req = engine.add_request(
                        list(br.prompt_token_ids),
                        forced_params(br.output_len),
                        f"bench-{br.index}",
                        arrival_time=start + br.arrival,
                    )
                    submitted.append((br, req))
                if not engine.has_unfinished():
                    wait_until(engine.clock, start + pending[0].arrival)
                    continue
                outputs = engine.step()
                bar.update(sum(1 for o in outputs if o.finished))
        end = engine.clock()
        traces = []
        for br, req in submitted:
            ok = req.finish_reason is FinishReason.LENGTH and req.num_output_tokens == br.output_len
            traces.append(
                RequestTrace(
                    br.prompt_len,
                    req.num_output_tokens,
                    req.arrival_time,
                    list(req.token_times),
                    ok,
                    req.error or "",
                )
            )
        elem = engine.kv_cache.kv_dtype.itemsize  # KV bytes as stored (`kv_cache_dtype`)
        return RunTrace(traces, start, end, recorder.passes, recorder.memory, elem)


@dataclass(slots=True)
class ComparisonResult:
    """Per contender: the metrics of every repeat, and the traces (for CDF plots)."""

    runs: dict[str, list[dict]] = field(default_factory=dict)
    traces: dict[str, list[RunTrace]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def run_comparison(
    contenders: Sequence[Contender],
    requests: Sequence[BenchRequest],
    repeats: int = 1,
    progress: bool = True,
) -> ComparisonResult:
    """Warm every contender up, then run the repeats interleaved, rotating the order.

    A contender that raises is recorded in `errors` and dropped; the others carry on.
    """
    result = ComparisonResult()
    alive = []
    for c in contenders:
        try:
            c.warmup()
            alive.append(c)
        except Exception as exc:  # a broken peer must not stop the comparison
            logger.exception("warmup of %s failed", c.label)
            result.errors[c.label] = f"warmup failed: {type(exc).__name__}: {exc}"
    for rep in range(repeats):
        order = alive[rep % len(alive) :] + alive[: rep % len(alive)] if alive else []
        for c in order:
            if c.label in result.errors:
                continue
            try:
                cpu = time.process_time()
                trace = c.run(requests, progress)
                trace.cpu_seconds = time.process_time() - cpu
            except Exception as exc:
                logger.exception("run of %s failed", c.label)
                result.errors[c.label] = f"run failed: {type(exc).__name__}: {exc}"
                continue
            metrics = compute_metrics(trace)
            result.runs.setdefault(c.label, []).append(metrics)
            result.traces.setdefault(c.label, []).append(trace)
            if progress:
                tqdm.write(
                    f"  {c.label:<24} repeat {rep + 1}/{repeats}: "
                    f"{metrics['output_throughput']:8.1f} tok/s, "
                    f"{metrics['request_throughput']:6.2f} req/s, "
                    f"{metrics['duration']:7.1f} s"
                )
    for label in result.errors:
        result.runs.pop(label, None)
        result.traces.pop(label, None)
    return result
