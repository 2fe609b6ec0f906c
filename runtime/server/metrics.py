"""Prometheus metrics named as vLLM's (`vllm:` -> `runtime:`), plus the periodic busy log line.

One `CollectorRegistry` per app, so several servers (tests) in one process never share counts.
Everything is observed from the engine thread right after each step, from the requests' own
timestamps, so the numbers do not depend on how fast clients read their streams.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from runtime.engine import Engine
from runtime.outputs import RequestOutput

if TYPE_CHECKING:
    from runtime.compiled_forward import BackgroundCompile

logger = logging.getLogger("runtime.server")
disable_created_metrics()  # no `_created` series, as vLLM: they double the scrape for no use

# vLLM's buckets, so dashboards built for it read ours unchanged.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class ServerMetrics:
    """The server's metrics, labelled with `model_name` and `scheduler` (and `extra_labels`,
    such as a replica's `replica`)."""

    def __init__(self, model_name: str, scheduler: str, log_interval: float = 10.0,
                 extra_labels: dict[str, str] | None = None) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "scheduler": scheduler, **(extra_labels or {})}
        self.labels = labels
        names = list(labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=self.registry).labels(
                **labels
            )

        self.running = gauge("runtime:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("runtime:num_requests_waiting", "Requests waiting for admission.")
        self.kv_usage = gauge(
            "runtime:kv_cache_usage_perc", "Fraction of KV capacity reserved or used (1 = full)."
        )
        self.compile_pending = gauge(
            "runtime:compile_pending_graphs",
            "Pass shapes whose compiled decoder is queued or building (compile: background); "
            "0 when every pass shape seen runs compiled or compiling is off.",
        )
        self.preemptions = counter("runtime:num_preemptions", "Preempted requests.")
        self.prompt_tokens = counter("runtime:prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("runtime:generation_tokens", "Generated tokens.")
        self.rejected = counter(
            "runtime:num_requests_rejected", "Requests rejected because the waiting queue was full."
        )
        self._success = Counter(
            "runtime:request_success",
            "Finished requests by reason.",
            [*names, "finished_reason"],
            registry=self.registry,
        )
        self.ttft = histogram(
            "runtime:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "runtime:inter_token_latency_seconds", "Time between tokens.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "runtime:e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "runtime:request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS
        )
        self.log_interval = log_interval
        self._last_step = 0
        self._last_log = time.monotonic()
        self._log_prompt = 0
        self._log_generation = 0
        self._snapshot: tuple[int, int, float] = (0, 0, 0.0)

    def watch_compile(self, background: BackgroundCompile | None) -> None:
        """Report a `BackgroundCompile`'s queue at every scrape (it drains while idle too)."""
        if background is not None:
            self.compile_pending.set_function(lambda: background.pending)

    @property
    def load(self) -> tuple[int, int, float]:
        """Running, waiting and KV usage as of the last step."""
        return self._snapshot

    def request_finished(self, reason: str) -> None:
        self._success.labels(**self.labels, finished_reason=reason).inc()

    def observe_step(self, engine: Engine, outputs: Sequence[RequestOutput]) -> None:
        """Called in the engine thread after each step with that step's outputs."""
        for out in outputs:
            req, new = out.request, len(out.new_token_ids)
            if new:
                self.generation_tokens.inc(new)
                self._log_generation += new
                first = req.num_output_tokens - new
                if first == 0 and req.first_token_time is not None:
                    self.prompt_tokens.inc(req.prompt_len)
                    self._log_prompt += req.prompt_len
                    self.ttft.observe(req.first_token_time - req.arrival_time)
                    if req.first_scheduled_time is not None:
                        self.queue_time.observe(req.first_scheduled_time - req.arrival_time)
                times = req.token_times
                for k in range(max(first, 1), min(req.num_output_tokens, len(times))):
                    self.itl.observe(times[k] - times[k - 1])
            if out.finished:
                self.request_finished(out.finish_reason.value if out.finish_reason else "stop")
                if req.finished_time is not None:
                    self.e2e.observe(req.finished_time - req.arrival_time)
        stats = engine.last_step
        if stats is not None and stats.step != self._last_step:
            self._last_step = stats.step
            self.preemptions.inc(stats.num_preempted)
        capacity = engine.kv_cache.kv_cache_tokens
        free = engine.kv_cache.kv_free_tokens()
        usage = min(1.0, max(0.0, 1.0 - free / capacity)) if capacity else 0.0
        self._snapshot = (len(engine.running), engine.num_waiting, usage)
        self.running.set(self._snapshot[0])
        self.waiting.set(self._snapshot[1])
        self.kv_usage.set(usage)

    def maybe_log(self, force: bool = False) -> None:
        """vLLM's periodic line, every `log_interval` seconds while there was work."""
        now = time.monotonic()
        elapsed = now - self._last_log
        if elapsed < self.log_interval and not force:
            return
        running, waiting, usage = self._snapshot
        if self._log_prompt or self._log_generation or running or waiting:
            logger.info(
                "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%",
                self._log_prompt / elapsed,
                self._log_generation / elapsed,
                running,
                waiting,
                100 * usage,
            )
        self._last_log, self._log_prompt, self._log_generation = now, 0, 0
