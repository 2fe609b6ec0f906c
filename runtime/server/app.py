"""The FastAPI app factory, the readiness/model/metrics routes, and the uvicorn runner.

The model loads in a background thread after the socket is open, so `/health` can say 503
while loading (readiness), then 200; a dead engine loop turns it back to 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.hardware import call_on_fresh_thread
from runtime.server import chat, completions
from runtime.server.async_engine import AsyncEngine
from runtime.server.errors import APIError, install_error_handlers
from runtime.server.http import SHUTDOWN_MARGIN, fit_open_files, uvicorn_config
from runtime.server.metrics import ServerMetrics
from runtime.server.middleware import BodyGuard, InternalErrors
from runtime.server.security import APIKeyCheck, HostCheck, allowed_host_names
from runtime.server.state import Backend, ServerSettings, ServerState, ready_state

logger = logging.getLogger("runtime.server")


async def _load(
    state: ServerState,
    load: Callable[[ServerState], Awaitable[Backend]],
    on_error: Callable[[BaseException], None] | None,
) -> None:
    """Build and start the backend (the engine, or replicas), then mark the server ready."""
    from runtime.tokenizer import load_chat_template

    try:
        if state.settings.chat_template:
            state.chat_template = load_chat_template(state.settings.chat_template)
        backend = await load(state)
        state.max_model_len = backend.engine.max_model_len
        state.engine = backend
    except Exception as exc:
        logger.exception("loading the model failed")
        state.load_error = exc
        if on_error is not None:
            on_error(exc)


def create_app(
    engine_factory: Callable[[], Engine],
    settings: ServerSettings,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """An app serving the engine `engine_factory` builds (called once, on a thread that exits
    before the engine loop starts: see `call_on_fresh_thread`)."""

    async def load(state: ServerState) -> AsyncEngine:
        engine, threads = await asyncio.to_thread(
            call_on_fresh_thread, lambda: (engine_factory(), torch.get_num_threads()))
        aengine = AsyncEngine(engine, settings.max_queued_requests, state.metrics, threads)
        state.metrics.watch_compile(engine.runner.background_compile)
        aengine.start()
        logger.info(
            "ready: model %r, scheduler %r, max_model_len %d, max_num_seqs %d",
            settings.model_name,
            engine.scheduler_name,
            engine.max_model_len,
            engine.limits.max_num_seqs,
        )
        return aengine

    metrics = ServerMetrics(settings.model_name, settings.scheduler, settings.log_interval)
    return build_app(settings, metrics, load, on_load_error)


def build_app(
    settings: ServerSettings,
    metrics: Any,
    load: Callable[[ServerState], Awaitable[Backend]],
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app around any backend `load` starts: one engine here, replicas in
    `runtime.distributed`. `metrics` has the `registry` /metrics serves."""
    state = ServerState(settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load(state, load, on_load_error))
        try:
            yield
        finally:
            await asyncio.wait({loading}, timeout=1.0)
            if state.engine is not None:
                await state.engine.drain(0.0)  # normally already drained by GracefulServer
                await state.engine.stop()

    app = FastAPI(title="baton-runtime", summary="OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    install_guards(app, state)
    app.include_router(completions.router)
    app.include_router(chat.router)

    @app.get("/health")
    async def health(request: Request) -> Response:
        """Readiness: 200 once the model is loaded and the engine loop runs, else 503.
        With replicas, a JSON body says which are up (docs/scale-out.md)."""
        status, body = ready_state(request).engine.health()
        if body is None:
            return Response(status_code=status)
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": settings.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "baton-runtime",
            "root": settings.model_name,
            "parent": None,
            "max_model_len": state.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics_route() -> Response:
        if state.engine is not None:
            await state.engine.refresh_metrics()
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def install_guards(app: FastAPI, state: ServerState) -> None:
    """Middleware, outermost first: unexpected errors, Host check, API key, body bounds (the
    body is read only for a request that passed the checks). Added innermost first."""
    settings = state.settings
    app.add_middleware(BodyGuard, state=state)
    if settings.api_key:
        app.add_middleware(
            APIKeyCheck, api_key=settings.api_key, all_routes=settings.api_key_all_routes
        )
    names = allowed_host_names(settings.host, settings.allowed_hosts)
    if names is not None:
        app.add_middleware(HostCheck, names=names)
    app.add_middleware(InternalErrors, state=state)


class GracefulServer(uvicorn.Server):
    """uvicorn with a drain: on SIGTERM or Ctrl-C, stop admitting (uvicorn closes the socket),
    let in-flight requests finish for up to `shutdown_timeout`, abort the rest with a final
    event, then exit 0. Bodies still arriving get a 503 at once; uvicorn cancels whatever is
    left (a client that stopped reading) after our timeout plus `SHUTDOWN_MARGIN`."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets: Any = None) -> None:
        self.state.stopping.set()
        drain = None
        if self.state.engine is not None:
            timeout = self.state.settings.shutdown_timeout
            drain = asyncio.create_task(self.state.engine.drain(timeout))
        await super().shutdown(sockets)
        if drain is not None:
            await drain

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal after shutting down (exit status 128 + sig);
        # we drained on purpose, so a requested stop is a clean exit.
        self._captured_signals.clear()


def run_server(config: RuntimeConfig) -> int:
    """Serve until SIGTERM/Ctrl-C; 0 after a graceful stop, 1 if the model failed to load."""
    from runtime.bootstrap import create_engine
    from runtime.plugins import load_scheduler_class

    # Fail fast on what needs no model: a wrong scheduler name or folder exits before binding.
    load_scheduler_class(config.scheduler)
    if not config.resolved_model().is_dir():
        raise RuntimeError(f"model folder not found: {config.resolved_model()}")
    settings = ServerSettings.from_config(config)
    settings = dataclasses.replace(
        settings, limit_concurrency=fit_open_files(settings.limit_concurrency)
    )
    server: GracefulServer | None = None

    def stop_on_error(_: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    if config.replicas is None:
        app = create_app(lambda: create_engine(config), settings, stop_on_error)
    else:  # the only place Ray enters: nothing imports runtime.distributed otherwise
        from runtime.distributed.frontend import create_distributed_app, require_ray

        require_ray()
        app = create_distributed_app(config, settings, stop_on_error)
    uv_config = uvicorn_config(app, settings, config.port, access_log=settings.log_requests)
    server = GracefulServer(uv_config, app.state.server)
    server.run()
    return 1 if app.state.server.load_error is not None else 0


__all__ = ["SHUTDOWN_MARGIN", "APIError", "GracefulServer", "create_app", "run_server"]
