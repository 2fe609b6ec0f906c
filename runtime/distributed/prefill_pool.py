"""The prefill pool: workers that compute prompts' K/V, and the front's view of them.

A worker (`PrefillServer`, a Ray actor) holds the model and nothing else: no scheduler, no
KV cache. For each new request the front picks the least loaded worker and hands the
replica a reference to the worker's result, so the K/V go from the worker to the replica
through Ray's object store, never through the front, and the replica's batch keeps
decoding while the prompt is computed elsewhere (the paper's prefill/decode separation).
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from runtime.config import RuntimeConfig
from runtime.prefill import PrefilledKV, prefill_kv

logger = logging.getLogger("runtime.prefill")
WATCH_SECONDS = 0.5  # how often the front asks each worker for its queue
PROBE_SECONDS = 5.0  # a worker that does not answer within this is down


class PrefillServer:
    """A prefill worker: prompts in, `(PrefilledKV, last-token logits)` out, one at a time.

    The compute runs on one thread beside the actor's event loop, so `load` answers while a
    prompt is computed. Results are CPU tensors (the object store's currency); the replica's
    layout moves them to its own device and dtype.
    """

    def __init__(self, config: RuntimeConfig, index: int) -> None:
        from runtime.attention_kernels import choose_attention_backend
        from runtime.bootstrap import configure_host, resolve_device
        from runtime.hardware import call_on_fresh_thread
        from runtime.linear_kernels import apply_linear_backend
        from runtime.loader import load_model

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        def load() -> tuple[torch.nn.Module, int]:  # on a thread whose OpenMP team then goes
            configure_host(config.num_threads)
            model = load_model(config.resolved_model(), dtype=config.dtype,
                               device=resolve_device(config.device))
            apply_linear_backend(model, config.linear_backend)
            param = next(model.parameters())
            attention = choose_attention_backend(config.attention_backend, param.device,
                                                 param.dtype)
            return model, attention.kernel, torch.get_num_threads()

        self.index = index
        self.model, self.kernel, self.threads = call_on_fresh_thread(load)
        self.queued = 0
        self.num_requests = self.num_tokens = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="prefill")
        logger.info("prefill worker %d ready (pid %d)", index, os.getpid())

    async def prefill(self, token_ids: tuple[int, ...]) -> tuple[PrefilledKV, torch.Tensor]:
        self.queued += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._compute, token_ids)
        finally:
            self.queued -= 1

    async def load(self) -> int:
        """Prompts queued or in progress (the front's health probe and load signal)."""
        return self.queued

    def stats(self) -> dict[str, Any]:
        return {"index": self.index, "pid": os.getpid(), "requests": self.num_requests,
                "tokens": self.num_tokens}

    def _compute(self, token_ids: tuple[int, ...]) -> tuple[PrefilledKV, torch.Tensor]:
        torch.set_num_threads(self.threads)  # per thread in torch: carry the actor's over
        kv, logits = prefill_kv(self.model, [list(token_ids)], self.kernel)
        self.num_requests += 1
        self.num_tokens += len(token_ids)
        return PrefilledKV(kv.k.cpu(), kv.v.cpu(), kv.lengths), logits.cpu()


@dataclass(eq=False)
class WorkerSlot:
    """The front's view of one worker: up or not, and its queue."""

    index: int
    handle: Any
    up: bool = True
    queued: int = 0  # as of the last probe
    sent: int = 0  # prompts sent since then
    recoveries: int = 0


class PrefillPool:
    """Picks a worker per request and watches each one's health."""

    def __init__(self, handles: list[Any]) -> None:
        self.workers = [WorkerSlot(i, h) for i, h in enumerate(handles)]
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._watch(w)) for w in self.workers]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    def send(self, token_ids: tuple[int, ...]) -> Any | None:
        """A reference to the prefill of `token_ids` on the least loaded worker that is up;
        None when none is (the replica then prefills the request itself)."""
        up = [w for w in self.workers if w.up]
        if not up:
            return None
        worker = min(up, key=lambda w: (w.queued + w.sent, w.index))
        worker.sent += 1
        return worker.handle.prefill.remote(token_ids)

    def health(self) -> list[dict[str, Any]]:
        return [{"worker": w.index, "up": w.up, "recoveries": w.recoveries}
                for w in self.workers]

    async def _watch(self, worker: WorkerSlot) -> None:
        while True:
            try:
                queued = await asyncio.wait_for(worker.handle.load.remote(), PROBE_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # dead, restarting or stuck: route around it
                if worker.up:
                    logger.warning("prefill worker %d is down (%s)", worker.index,
                                   type(exc).__name__)
                worker.up = False
            else:
                if not worker.up:
                    logger.info("prefill worker %d is back", worker.index)
                    worker.recoveries += 1
                worker.up, worker.queued, worker.sent = True, queued, 0
            await asyncio.sleep(WATCH_SECONDS)
