"""The server's backend on Ray: requests routed to replicas by load, their outputs streamed back.

`ReplicaPool` offers the HTTP handlers what `AsyncEngine` offers them (submit, abort, drain,
stop, health), so completions, chat, SSE, errors and limits are the single-process server's
own code. Per replica one task long-polls the actor: each answer carries every request's
progress since the previous one, fed to the HTTP requests' queues as `RequestOutput`s on
the front's mirror of each request.

Faults: a poll that raises (or hangs past `STUCK_SECONDS`) means the replica is gone. Its
requests that have had no output are sent once more to another replica; the others end with
an error event. Ray restarts the actor; the replica's task probes it until it answers, and
/health says "degraded" meanwhile. No call to an actor is awaited without a bound.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.distributed.metrics import FrontMetrics
from runtime.distributed.prefill_pool import PrefillPool
from runtime.distributed.protocol import Delta, Load, ReplicaInfo, RequestSpec
from runtime.distributed.router import Candidate, choose
from runtime.outputs import RequestOutput
from runtime.request import FinishReason, Request
from runtime.server.async_engine import (
    EngineDeadError,
    NotAcceptingError,
    QueueFullError,
    RequestStream,
)

logger = logging.getLogger("runtime.server")
POLL_SECONDS = 1.0  # an idle replica answers a poll after this
STUCK_SECONDS = 60.0  # a poll unanswered for this long: the actor is treated as failed
PROBE_SECONDS = 5.0  # one restart probe's bound; probes repeat until the actor answers
METRICS_SECONDS = 2.0  # a replica's metrics not fetched within this are left out


@dataclass(eq=False)
class ReplicaSlot:
    """The front's view of one replica actor."""

    index: int
    handle: Any
    info: ReplicaInfo
    up: bool = True
    cursor: int = 0
    load: Load = field(default_factory=Load)
    inflight: dict[str, Tracked] = field(default_factory=dict)
    restarts: int = 0


@dataclass(eq=False)
class Tracked:
    """One engine request in flight: its mirror `Request`, its HTTP stream, where it runs."""

    request: Request
    stream: RequestStream
    slot: ReplicaSlot
    retried: bool = False
    started: bool = False  # output reached the front: it can no longer be retried


class ReplicaPool:
    """Routes, streams and recovers; `engine` is the front's request maker (`FrontEngine`)."""

    def __init__(self, engine: Any, handles: Sequence[Any], infos: Sequence[ReplicaInfo],
                 prefill: PrefillPool | None, max_queued_requests: int, metrics: FrontMetrics,
                 on_stop: Callable[[], None] = lambda: None) -> None:
        self.engine = engine
        self.slots = [ReplicaSlot(i, h, info) for i, (h, info) in enumerate(zip(handles, infos,
                                                                              strict=True))]
        self.prefill = prefill
        self.max_queued_requests = max_queued_requests
        self.metrics = metrics
        self.accepting = True
        self.error: BaseException | None = None  # never set: a down replica is per replica
        self._on_stop = on_stop
        self._where: dict[str, Tracked] = {}
        self._tasks: list[asyncio.Task] = []
        self._calls: set[asyncio.Future] = set()

    def start(self) -> None:
        """Start one poll task per replica (and the workers' watchers) on this event loop."""
        for slot in self.slots:
            self.metrics.replica_up(slot.index, True)
            self._tasks.append(asyncio.ensure_future(self._pump(slot)))
        if self.prefill is not None:
            self.prefill.start()

    # --- what the HTTP handlers call ---------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        """Requests sent to a replica that its last report did not count as running."""
        return sum(max(len(s.inflight) - s.load.running, 0) for s in self.slots if s.up)

    def submit(self, requests: Sequence[Request]) -> RequestStream:
        """Route validated requests to replicas, or reject them all before any is sent."""
        if not self.accepting:
            raise NotAcceptingError("the server is shutting down")
        if not any(s.up for s in self.slots):
            raise EngineDeadError("no replica is up (Ray is restarting them); retry shortly")
        if self.num_waiting + len(requests) > self.max_queued_requests:
            self.metrics.rejected.inc()
            raise QueueFullError(
                f"the waiting queue is full ({self.max_queued_requests} requests); retry later")
        stream = RequestStream(self, requests)
        batches: dict[ReplicaSlot, list[Request]] = collections.defaultdict(list)
        for req in requests:
            slot = self._route()
            self._track(Tracked(req, stream, slot))
            batches[slot].append(req)
        for slot, reqs in batches.items():
            self._send(slot, reqs)
        return stream

    def abort(self, request_id: str) -> None:
        tracked = self._where.get(request_id)
        if tracked is not None and tracked.slot.up:
            self._call(tracked.slot.handle.abort.remote([request_id]))

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let every replica's requests finish for up to `timeout` seconds,
        then abort the rest so each gets a final event."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        if self._where:
            logger.info("draining %d in-flight requests over %d replicas (up to %.0f s)",
                        len(self._where), len(self.slots), timeout)
        deadline = loop.time() + timeout
        while self._where and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if not self._where:
            return
        logger.warning("shutdown timeout: aborting %d unfinished requests", len(self._where))
        for request_id in list(self._where):
            self.abort(request_id)
        deadline = loop.time() + 2.0  # an abort lands at the replica's next step
        while self._where and loop.time() < deadline:
            await asyncio.sleep(0.02)
        error = NotAcceptingError("the server shut down before the replica answered")
        for tracked in list(self._where.values()):
            tracked.stream.queue.put_nowait(error)
            self._untrack(tracked)

    async def stop(self) -> None:
        """Stop the poll tasks, then the actors (and Ray, if this server started it)."""
        self.accepting = False
        for task in self._tasks:
            task.cancel()
        if self.prefill is not None:
            self.prefill.stop()
        await asyncio.to_thread(self._on_stop)

    def health(self) -> tuple[int, dict[str, Any]]:
        """200 while a replica is up ("ok", or "degraded" when something is down), else 503."""
        replicas = [{"replica": s.index, "up": s.up, "restarts": s.restarts, "node": s.info.node,
                     "in_flight": len(s.inflight)} for s in self.slots]
        workers = self.prefill.health() if self.prefill is not None else []
        for w in workers:
            self.metrics.worker_up(w["worker"], w["up"])
        any_up = any(s.up for s in self.slots)
        everything = all(s.up for s in self.slots) and all(w["up"] for w in workers)
        status = "ok" if everything else "degraded" if any_up else "unavailable"
        body = {"status": status, "replicas": replicas, "prefill_workers": workers}
        return (200 if any_up else 503), body

    async def refresh_metrics(self) -> None:
        """Fetch every replica's metrics text for the scrape being served."""
        up = [s for s in self.slots if s.up]
        refs = [asyncio.wait_for(s.handle.metrics_text.remote(), METRICS_SECONDS) for s in up]
        texts = await asyncio.gather(*refs, return_exceptions=True)
        self.metrics.replicas.texts = {s.index: t.decode() for s, t in zip(up, texts, strict=True)
                                       if isinstance(t, bytes)}
        self.health()  # refreshes the worker gauges

    # --- routing and sending -----------------------------------------------------------------

    def _route(self, exclude: ReplicaSlot | None = None) -> ReplicaSlot | None:
        candidates = [Candidate(s.index, len(s.inflight), s.load, s.info.max_num_seqs)
                      for s in self.slots if s.up and s is not exclude]
        index = choose(candidates)
        return None if index is None else self.slots[index]

    def _track(self, tracked: Tracked) -> None:
        tracked.slot.inflight[tracked.request.request_id] = tracked
        self._where[tracked.request.request_id] = tracked

    def _untrack(self, tracked: Tracked) -> None:
        request_id = tracked.request.request_id
        tracked.slot.inflight.pop(request_id, None)
        self._where.pop(request_id, None)

    def _send(self, slot: ReplicaSlot, reqs: Sequence[Request]) -> None:
        """To the replica; with a prefill pool, each with a reference to its worker's result."""
        plain = []
        for req in reqs:
            spec = RequestSpec.of(req)
            ref = self.prefill.send(spec.prompt_token_ids) if self.prefill is not None else None
            if ref is None:
                plain.append(spec)
            else:
                self._call(slot.handle.submit_prefilled.remote(spec, [ref]))
        if plain:
            self._call(slot.handle.submit.remote(plain))

    def _call(self, ref: Any) -> None:
        """Fire and forget, but collect the result, so a dead actor's error is not reported
        as unhandled; the replica's poll task deals with the death itself."""
        future = asyncio.ensure_future(_settle(ref))
        self._calls.add(future)
        future.add_done_callback(self._calls.discard)

    # --- the poll task of one replica ----------------------------------------------------------

    async def _pump(self, slot: ReplicaSlot) -> None:
        while True:
            try:
                report = await asyncio.wait_for(
                    slot.handle.poll.remote(slot.cursor, POLL_SECONDS), STUCK_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the actor died, is restarting, or is stuck
                await self._recover(slot, f"{type(exc).__name__}")
                continue
            if report.incarnation != slot.info.incarnation:
                await self._recover(slot, "it restarted")
                continue
            slot.cursor, slot.load = report.cursor, report.load
            for delta in report.deltas:
                self._deliver(slot, delta)
            if report.dead is not None:
                await self._recover(slot, report.dead)

    def _deliver(self, slot: ReplicaSlot, d: Delta) -> None:
        tracked = slot.inflight.get(d.request_id)
        if tracked is None:  # a request this replica should not run (failed over, stale)
            if not d.finished:
                self._call(slot.handle.abort.remote([d.request_id]))
            return
        req = tracked.request
        req.output_token_ids.extend(d.token_ids)
        req.output_logprobs.extend(d.logprobs)
        tracked.started = tracked.started or bool(d.token_ids or d.text)
        reason = FinishReason(d.finish_reason) if d.finish_reason is not None else None
        if d.finished:
            req.status, req.finish_reason, req.error = reason.status, reason, d.error
            self._untrack(tracked)
        tracked.stream.queue.put_nowait(
            RequestOutput(req, d.token_ids, d.text, d.finished, reason, d.error))

    async def _recover(self, slot: ReplicaSlot, reason: str) -> None:
        """Mark the replica down, settle its requests, then probe until Ray has restarted it."""
        slot.up = False
        self.metrics.replica_up(slot.index, False)
        logger.warning("replica %d is down (%s); %d requests in flight on it", slot.index,
                       reason, len(slot.inflight))
        self._fail_over(slot, reason)
        delay = 0.2
        while True:
            try:
                info = await asyncio.wait_for(slot.handle.start.remote(), PROBE_SECONDS)
                break
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
        slot.info, slot.cursor, slot.load, slot.up = info, 0, Load(), True
        slot.restarts += 1
        self.metrics.replica_up(slot.index, True)
        self.metrics.replica_restarted(slot.index)
        logger.info("replica %d is back (pid %d on %s)", slot.index, info.pid, info.node)

    def _fail_over(self, slot: ReplicaSlot, reason: str) -> None:
        """Retry once elsewhere what produced no output yet; end the rest with an error."""
        for tracked in list(slot.inflight.values()):
            self._untrack(tracked)
            target = None if tracked.started or tracked.retried else self._route(exclude=slot)
            if target is not None:
                tracked.retried, tracked.slot = True, target
                self._track(tracked)
                self.metrics.retried.inc()
                self._send(target, [tracked.request])
                continue
            req = tracked.request
            error = f"replica {slot.index} failed while running this request ({reason})"
            req.status, req.finish_reason, req.error = (FinishReason.ERROR.status,
                                                        FinishReason.ERROR, error)
            tracked.stream.queue.put_nowait(
                RequestOutput(req, (), "", True, FinishReason.ERROR, error))


async def _settle(ref: Any) -> None:
    try:
        await ref
    except Exception as exc:  # the poll task notices the actor's death on its own
        logger.debug("an actor call failed: %r", exc)
