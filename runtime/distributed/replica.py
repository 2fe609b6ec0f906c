"""One engine replica: its own model, scheduler and KV cache, stepping on its own thread.

`cluster` runs this class as a Ray actor (async: every method runs on the actor's event
loop, the engine on `AsyncEngine`'s step thread beside it); nothing here imports Ray, so
tests can drive it in process. The front end sends `RequestSpec`s and long-polls `poll` for
`Delta`s, all requests' progress in one answer: one call per engine step, not per token.
A request whose prompt a prefill worker computes arrives with a reference to that result;
the replica awaits it off the step thread and hands the K/V to `Engine.add_prefilled`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import sys
import uuid
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import Counter, generate_latest

from runtime.config import ConfigError, RuntimeConfig
from runtime.distributed.protocol import Delta, Load, ReplicaInfo, Report, RequestSpec
from runtime.engine import Engine
from runtime.hardware import call_on_fresh_thread
from runtime.hookspecs import hookimpl
from runtime.outputs import RequestOutput
from runtime.request import Request
from runtime.server.async_engine import AsyncEngine
from runtime.server.metrics import ServerMetrics

logger = logging.getLogger("runtime.replica")
EXIT_AFTER_DEATH_SECONDS = 2.0  # time for the front's poll to collect the failure first


class PassCounter:
    """Observer: the engine's forward passes by phase (shows where prompts were computed)."""

    def __init__(self) -> None:
        self.phases: collections.Counter[str] = collections.Counter()

    @hookimpl
    def on_step_end(self, stats) -> None:
        self.phases.update(p.phase.value for p in stats.passes)


class ReplicaLoop(AsyncEngine):
    """AsyncEngine's step thread with its outputs sent to `sink` instead of HTTP streams."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, num_threads: int,
                 sink: Callable[[list[RequestOutput]], None],
                 on_death: Callable[[BaseException], None]) -> None:
        super().__init__(engine, sys.maxsize, metrics, num_threads)  # the front bounds the queue
        self._sink, self._on_death = sink, on_death

    def add(self, req: Request, prefilled: tuple[Any, torch.Tensor] | None = None) -> None:
        if prefilled is None:
            self.engine.add_request(req)
        else:
            self.engine.add_prefilled(req, *prefilled)
        self._wake.set()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        self._sink(outputs)

    def _fail_all(self, error: BaseException) -> None:
        self._on_death(error)


def prefilled_refusal(engine: Engine) -> str:
    return (f"prefill_workers: scheduler {engine.scheduler_name!r} cannot take prefilled K/V "
            f"(its KV layout {type(engine.kv_cache).__name__} has no insert_prefilled); use a "
            "scheduler whose layout has one, such as baton, or no prefill workers")


class ReplicaServer:
    """One replica; `start` once from the actor's event loop, then submit, abort and poll."""

    def __init__(self, config: RuntimeConfig, index: int, model_name: str) -> None:
        from runtime.bootstrap import create_engine

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.index = index
        self.passes = PassCounter()
        self.engine, threads = call_on_fresh_thread(  # its OpenMP team must not outlive it
            lambda: (create_engine(config, observers=(self.passes,)), torch.get_num_threads()))
        if config.prefill_workers and not self.engine.accepts_prefilled:
            raise ConfigError(prefilled_refusal(self.engine))
        self.metrics = ServerMetrics(model_name, config.scheduler, config.log_interval,
                                     {"replica": str(index)})
        labels = self.metrics.labels
        self.prefilled = Counter("runtime:prefilled_requests", "Requests whose prompt K/V came "
                                 "from a prefill worker.", list(labels),
                                 registry=self.metrics.registry).labels(**labels)
        self.fallbacks = Counter("runtime:prefill_fallbacks", "Requests prefilled here after "
                                 "their prefill worker failed.", list(labels),
                                 registry=self.metrics.registry).labels(**labels)
        self.loop = ReplicaLoop(self.engine, self.metrics, threads,
                                self._collect, self._died)
        self.num_prefilled = self.num_fallbacks = 0
        self.incarnation = uuid.uuid4().hex
        self.dead: str | None = None
        self._outbox: list[Delta] = []
        self._base = 0  # the cursor of _outbox[0]
        self._sent: dict[str, int] = {}  # output tokens already in deltas, per request
        self._prefilling: dict[str, Request] = {}
        self._tasks: set[asyncio.Task] = set()
        self._ready: asyncio.Event | None = None

    async def start(self) -> ReplicaInfo:
        """Start the step thread (idempotent: the front also uses it to probe a restart)."""
        if self._ready is None:
            self._ready = asyncio.Event()
            self.loop.start()
            logger.info("replica %d ready (pid %d)", self.index, os.getpid())
        e = self.engine
        return ReplicaInfo(self.incarnation, e.max_model_len, e.shape.vocab_size,
                           e.limits.max_num_seqs, e.scheduler_name, e.accepts_prefilled,
                           socket.gethostname(), os.getpid())

    async def submit(self, specs: list[RequestSpec]) -> None:
        for spec in specs:
            self._admit(self._request(spec))

    async def submit_prefilled(self, spec: RequestSpec, payload: list) -> None:
        """`payload[0]` is a reference to a worker's `(PrefilledKV, logits)`, in a list so Ray
        hands it over unresolved and this call returns at once."""
        req = self._request(spec)
        self._prefilling[req.request_id] = req
        task = asyncio.get_running_loop().create_task(self._embed_when_ready(req, payload[0]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self._prefilling.pop(request_id, None) is not None:  # the engine never saw it
                self._emit(Delta(request_id, (), "", finished=True, finish_reason="abort"))
            else:
                self.loop.abort(request_id)

    async def poll(self, cursor: int, timeout: float) -> Report:
        """Deltas from `cursor` on (those before it are acknowledged and dropped), waiting up
        to `timeout` seconds for one; the front passes the previous answer's cursor."""
        drop = min(max(cursor - self._base, 0), len(self._outbox))
        del self._outbox[:drop]
        self._base += drop
        if not self._outbox and self.dead is None and self._ready is not None:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
        e = self.engine
        usage = self.metrics.load[2]
        load = Load(len(e.running), e.num_waiting + len(self._prefilling), usage)
        return Report(self.incarnation, self._base + len(self._outbox), tuple(self._outbox),
                      load, self.dead)

    def metrics_text(self) -> bytes:
        return generate_latest(self.metrics.registry)

    def stats(self) -> dict[str, Any]:
        """Counters for tests and debugging: passes by phase, prefilled and fallback counts."""
        return {"index": self.index, "pid": os.getpid(), "passes": dict(self.passes.phases),
                "prefilled": self.num_prefilled, "fallbacks": self.num_fallbacks,
                "running": len(self.engine.running), "waiting": self.engine.num_waiting}

    # --- inside the actor -------------------------------------------------------------------

    def _request(self, spec: RequestSpec) -> Request:
        req = self.engine.make_request(list(spec.prompt_token_ids), spec.params,
                                       spec.request_id, spec.arrival_monotonic())
        req.prompt = spec.prompt
        return req

    def _admit(self, req: Request, prefilled: tuple[Any, torch.Tensor] | None = None) -> None:
        try:
            self.loop.add(req, prefilled)
        except Exception as exc:  # a payload that does not fit: this request fails alone
            logger.exception("replica %d could not queue %s", self.index, req.request_id)
            self._emit(Delta(req.request_id, (), "", finished=True, finish_reason="error",
                             error=f"replica {self.index} could not queue it: {exc!r}"))

    async def _embed_when_ready(self, req: Request, ref: Any) -> None:
        """Await the worker's K/V; if the worker failed, prefill here instead (the retry)."""
        try:
            kv, logits = await ref
            prefilled = (kv, logits)
        except Exception as exc:
            logger.warning("replica %d: the prefill of %s failed (%s); prefilling it here",
                           self.index, req.request_id, type(exc).__name__)
            self.fallbacks.inc()
            self.num_fallbacks += 1
            prefilled = None
        if self._prefilling.pop(req.request_id, None) is None:
            return  # aborted while its prompt was computed
        if prefilled is not None:
            self.prefilled.inc()
            self.num_prefilled += 1
        self._admit(req, prefilled)

    def _collect(self, outputs: list[RequestOutput]) -> None:
        """On the event loop: the step's outputs become deltas, and a waiting poll wakes."""
        for out in outputs:
            first = self._sent.get(out.request_id, 0)
            self._outbox.append(Delta.of(out, first))
            if out.finished:
                self._sent.pop(out.request_id, None)
            else:
                self._sent[out.request_id] = first + len(out.new_token_ids)
        if self._ready is not None:
            self._ready.set()

    def _emit(self, delta: Delta) -> None:
        self._outbox.append(delta)
        if self._ready is not None:
            self._ready.set()

    def _died(self, error: BaseException) -> None:
        """The engine loop died: tell the front at its next poll, then exit so Ray restarts us."""
        self.dead = f"the engine loop of replica {self.index} died: {error!r}"
        if self._ready is not None:
            self._ready.set()
        asyncio.get_running_loop().call_later(EXIT_AFTER_DEATH_SECONDS, os._exit, 1)
