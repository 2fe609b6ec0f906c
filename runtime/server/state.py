"""Per-app server state and the checks every endpoint makes before doing any work."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request as HTTPRequest

from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.request import Request
from runtime.server.async_engine import AsyncEngine, RequestStream
from runtime.server.errors import APIError
from runtime.server.metrics import ServerMetrics

API_KEY_ENV = "RUNTIME_API_KEY"  # as vLLM's VLLM_API_KEY: used when no api_key is configured
_DEFAULTS = RuntimeConfig()


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The server's own options (the engine's come from RuntimeConfig through bootstrap);
    defaults and meanings are RuntimeConfig's (docs/configuration.md)."""

    model_name: str
    scheduler: str
    host: str = _DEFAULTS.host
    max_queued_requests: int = _DEFAULTS.max_queued_requests
    shutdown_timeout: float = _DEFAULTS.shutdown_timeout
    chat_template: str | None = None
    log_requests: bool = False
    log_interval: float = _DEFAULTS.log_interval
    max_request_body_bytes: int = _DEFAULTS.max_request_body_bytes
    max_prompt_chars: int = _DEFAULTS.max_prompt_chars
    max_choices_per_request: int = _DEFAULTS.max_choices_per_request
    max_stop_strings: int = _DEFAULTS.max_stop_strings
    max_stop_string_chars: int = _DEFAULTS.max_stop_string_chars
    limit_concurrency: int = _DEFAULTS.limit_concurrency
    keep_alive_timeout: float = _DEFAULTS.keep_alive_timeout
    header_timeout: float = _DEFAULTS.header_timeout
    body_timeout: float = _DEFAULTS.body_timeout
    api_key: str | None = None
    api_key_all_routes: bool = False
    allowed_hosts: str | None = None

    @classmethod
    def from_config(cls, config: RuntimeConfig) -> ServerSettings:
        """The config's server keys; the API key falls back to $RUNTIME_API_KEY."""
        names = {f.name for f in dataclasses.fields(cls)} - {"model_name", "api_key"}
        return cls(
            model_name=config.served_model_name or config.resolved_model().name,
            api_key=config.api_key or os.environ.get(API_KEY_ENV) or None,
            **{name: getattr(config, name) for name in names},
        )


class Backend(Protocol):
    """What the HTTP handlers drive: `AsyncEngine` (one engine in this process), or
    `runtime.distributed.pool.ReplicaPool` (replicas on Ray). `engine` makes and validates
    requests (`tokenizer`, `make_request`, `max_model_len`)."""

    engine: Any
    max_queued_requests: int
    error: BaseException | None

    def submit(self, requests: Sequence[Request]) -> RequestStream: ...
    def abort(self, request_id: str) -> None: ...
    def health(self) -> tuple[int, dict | None]: ...
    async def refresh_metrics(self) -> None: ...
    async def drain(self, timeout: float) -> None: ...
    async def stop(self) -> None: ...


@dataclass
class ServerState:
    """Per-app state; `engine` is None until loading has finished. `metrics` is a
    `ServerMetrics`, or the front's own with replicas; /metrics serves its `registry`."""

    settings: ServerSettings
    metrics: ServerMetrics | Any
    engine: AsyncEngine | Backend | None = None
    load_error: BaseException | None = None
    chat_template: str | None = None
    max_model_len: int | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set when shutdown begins

    @property
    def core(self) -> Engine:
        """The engine, or with replicas the front's request maker (same methods used)."""
        assert self.engine is not None
        return self.engine.engine


def ready_state(request: HTTPRequest) -> ServerState:
    """FastAPI dependency: the state of a server that can take requests, else a 503."""
    state: ServerState = request.app.state.server
    if state.load_error is not None:
        raise APIError(f"the model failed to load: {state.load_error}", 503)
    if state.engine is None:
        raise APIError("the model is still loading", 503)
    if state.engine.error is not None:
        raise APIError("the engine loop died; the server log has the details", 503)
    return state


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.settings.model_name:
        raise APIError(f"The model `{model[:200]}` does not exist.", 404, "model")


def state_of(request: HTTPRequest) -> ServerState:
    return request.app.state.server
