"""The OpenAI server in front of Ray replicas: the same app, another backend.

The front holds the tokenizer and no model. It validates and tokenizes requests exactly as a
single-process server does (`FrontEngine.make_request` checks what `Engine.make_request`
checks), so errors are the same before anything reaches a replica.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI

from runtime.config import RuntimeConfig
from runtime.distributed.metrics import FrontMetrics
from runtime.request import Request
from runtime.sampling_params import SamplingParams, check_prompt, prompt_token_ids
from runtime.server.app import build_app
from runtime.server.state import ServerSettings, ServerState

logger = logging.getLogger("runtime.server")


def require_ray() -> None:
    """Fail before binding the port when Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RuntimeError("--replicas needs Ray: pip install 'baton-runtime[ray]' (or "
                           "pip install -e '.[ray]' in a checkout)") from None


class FrontEngine:
    """What the handlers ask of `state.core`: the tokenizer, the context, `make_request`."""

    def __init__(self, tokenizer: Any, max_model_len: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self._ids = itertools.count()

    def make_request(self, prompt: str | Sequence[int], params: SamplingParams,
                     request_id: str | None = None, arrival_time: float | None = None) -> Request:
        """Tokenize and validate (raises InvalidParameterError) as `Engine.make_request`."""
        text, token_ids = prompt_token_ids(self.tokenizer, prompt)
        check_prompt(token_ids, params.max_tokens, self.vocab_size, self.max_model_len)
        req = Request(request_id or f"req-{next(self._ids)}", token_ids, params, prompt=text)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        return req


def create_distributed_app(
    config: RuntimeConfig,
    settings: ServerSettings,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The server app with `config.replicas` replicas (and prefill workers) on Ray."""
    metrics = FrontMetrics(settings.model_name, settings.scheduler)

    async def load(state: ServerState) -> Any:
        return await start_pool(config, settings, metrics)

    return build_app(settings, metrics, load, on_load_error)


async def start_pool(config: RuntimeConfig, settings: ServerSettings, metrics: FrontMetrics):
    """Connect to Ray, launch the actors, wait for them, and start routing."""
    from runtime.distributed import cluster as ray_cluster
    from runtime.distributed.pool import ReplicaPool
    from runtime.distributed.prefill_pool import PrefillPool
    from runtime.tokenizer import Tokenizer

    tokenizer = await asyncio.to_thread(Tokenizer.from_dir, config.resolved_model())
    launched = await asyncio.to_thread(ray_cluster.launch, config, settings.model_name)
    ray_cluster.keep_sigterm()  # on the event loop: the main thread under `runtime serve`
    try:
        infos = await ray_cluster.started(launched)
    except BaseException:
        await asyncio.to_thread(launched.shutdown)
        raise
    first = infos[0]
    front = FrontEngine(tokenizer, first.max_model_len, first.vocab_size)
    prefill = PrefillPool(launched.workers) if launched.workers else None
    pool = ReplicaPool(front, launched.replicas, infos, prefill, settings.max_queued_requests,
                       metrics, launched.shutdown)
    pool.start()
    nodes = sorted({info.node for info in infos})
    logger.info("ready: model %r, scheduler %r, %d replicas on %s, %d prefill workers, "
                "max_model_len %d, max_num_seqs %d per replica", settings.model_name,
                first.scheduler, len(infos), ", ".join(nodes), len(launched.workers),
                first.max_model_len, first.max_num_seqs)
    return pool
