"""The engine loop on its own thread, beside the asyncio event loop.

`Engine.step()` is blocking compute, so it runs on a dedicated thread; the event loop only
queues requests (`Engine.add_request` and `abort` are thread-safe) and reads results. Outputs
cross back with `loop.call_soon_threadsafe` into one asyncio queue per HTTP request, so a
request with `n` choices or a batch of prompts reads all its engine requests from one place.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence

import torch

from runtime.engine import Engine
from runtime.outputs import RequestOutput
from runtime.request import Request
from runtime.server.metrics import ServerMetrics

logger = logging.getLogger("runtime.server")


class EngineDeadError(RuntimeError):
    """The engine loop crashed; in-flight requests fail and /health reports 503."""


class QueueFullError(RuntimeError):
    """More than `max_queued_requests` would wait for admission."""


class NotAcceptingError(RuntimeError):
    """The server is shutting down and admits no new requests."""


class RequestStream:
    """Outputs of the engine requests behind one HTTP request, in arrival order."""

    def __init__(self, owner: AsyncEngine, requests: Sequence[Request]) -> None:
        self._owner = owner
        self.requests = list(requests)
        self.index = {r.request_id: i for i, r in enumerate(self.requests)}
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.unfinished = set(self.index)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Each step's progress per engine request until all have finished."""
        while self.unfinished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.unfinished.clear()
                raise item
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield item

    def abort(self) -> None:
        """Abort what has not finished (client gone, or an error in a sibling choice)."""
        for request_id in list(self.unfinished):
            self._owner.abort(request_id)
        self.unfinished.clear()


class AsyncEngine:
    """Feeds an `Engine` from asyncio handlers and streams its outputs back to them."""

    def __init__(
        self,
        engine: Engine,
        max_queued_requests: int,
        metrics: ServerMetrics | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.engine = engine
        self.num_threads = num_threads
        self.max_queued_requests = max_queued_requests
        self.metrics = metrics
        self.accepting = True
        self.error: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, requests: Sequence[Request]) -> RequestStream:
        """Queue validated requests together, or reject them all before any work is done."""
        if self.error is not None:
            raise EngineDeadError("the engine loop died; the server log has the details")
        if not self.accepting:
            raise NotAcceptingError("the server is shutting down")
        if self.engine.num_waiting + len(requests) > self.max_queued_requests:
            if self.metrics is not None:
                self.metrics.rejected.inc()
            raise QueueFullError(
                f"the waiting queue is full ({self.max_queued_requests} requests); retry later"
            )
        stream = RequestStream(self, requests)
        for req in requests:
            self._streams[req.request_id] = stream
            self.engine.add_request(req)
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Abort at the start of the next step; the scheduler frees the request's cache."""
        self.engine.abort(request_id)
        self._wake.set()

    def _run(self) -> None:
        """The engine thread: step while there is work, sleep on an event when idle."""
        engine, metrics = self.engine, self.metrics
        if self.num_threads:  # torch's CPU thread count is per thread: carry the loader's over
            torch.set_num_threads(self.num_threads)
        try:
            while not self._stop.is_set():
                if not engine.has_unfinished():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    if metrics is not None:
                        metrics.maybe_log()
                    continue
                before = engine.num_steps
                outputs = engine.step()
                if metrics is not None:
                    metrics.observe_step(engine, outputs)
                    metrics.maybe_log()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
                elif engine.last_step is None or engine.last_step.step <= before:
                    self._wake.wait(timeout=0.005)  # nothing admitted: do not spin a core
                    self._wake.clear()
        except BaseException as exc:  # a bug in the engine or a scheduler: fail loudly, once
            logger.exception("the engine loop died; failing in-flight requests")
            self.error = exc
            error = EngineDeadError("the engine loop died; the server log has the details")
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_all, error)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """On the event loop: route each output to its HTTP request's queue."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.queue.put_nowait(out)

    def _fail_all(self, error: BaseException) -> None:
        """On the event loop: end every in-flight stream with `error`."""
        for stream in {id(s): s for s in self._streams.values()}.values():
            stream.queue.put_nowait(error)
        self._streams.clear()

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let in-flight requests finish for up to `timeout` seconds, then
        abort the rest so each gets a final event (their handlers turn ABORT into it)."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._streams:
            logger.info(
                "draining %d in-flight requests (up to %.0f s)", len(self._streams), timeout
            )
        while self._streams and self.error is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if not self._streams:
            return
        logger.warning("shutdown timeout: aborting %d unfinished requests", len(self._streams))
        for request_id in list(self._streams):
            self.abort(request_id)
        deadline = loop.time() + 1.0  # an abort lands at the next step
        while self._streams and self.error is None and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self._fail_all(NotAcceptingError("the server shut down before the engine stopped"))

    def health(self) -> tuple[int, dict | None]:
        """/health once ready: 200 with no body (a dead loop is a 503 before this is asked)."""
        return 200, None

    async def refresh_metrics(self) -> None:
        """Nothing to fetch: the engine thread updates the metrics after every step."""

    async def stop(self) -> None:
        """Stop the engine thread after its current step."""
        self.accepting = False
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 2.0)  # a daemon: exit does not wait
