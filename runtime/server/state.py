"""Per-app server state and the checks every endpoint makes before doing any work."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request as HTTPRequest

from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.server.async_engine import AsyncEngine
from runtime.server.errors import APIError
from runtime.server.metrics import ServerMetrics


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The server's own options (the engine's come from RuntimeConfig through bootstrap)."""

    model_name: str
    scheduler: str
    max_queued_requests: int = 1024
    shutdown_timeout: float = 30.0
    chat_template: str | None = None
    log_requests: bool = False
    log_interval: float = 10.0

    @classmethod
    def from_config(cls, config: RuntimeConfig) -> ServerSettings:
        name = config.served_model_name or config.resolved_model().name
        return cls(
            name,
            config.scheduler,
            config.max_queued_requests,
            config.shutdown_timeout,
            config.chat_template,
            config.log_requests,
            config.log_interval,
        )


@dataclass
class ServerState:
    """Per-app state; `engine` is None until loading has finished."""

    settings: ServerSettings
    metrics: ServerMetrics
    engine: AsyncEngine | None = None
    load_error: BaseException | None = None
    chat_template: str | None = None
    max_model_len: int | None = None

    @property
    def core(self) -> Engine:
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
        raise APIError(f"the engine loop died: {state.engine.error!r}", 503)
    return state


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.settings.model_name:
        raise APIError(f"The model `{model}` does not exist.", 404, "model")


def state_of(request: HTTPRequest) -> ServerState:
    return request.app.state.server
