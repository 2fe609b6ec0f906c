"""uvicorn set up against idle, slow and numerous connections.

uvicorn bounds concurrency (`limit_concurrency`: 503 at the limit) and idle keep-alive
connections (`timeout_keep_alive`), but its timer starts only after a first response, and it
has no deadline for a request's headers. `GuardedH11Protocol` adds both, and closes at once a
connection beyond the limit, which would otherwise hold a file descriptor to get its 503. We
always use uvicorn's h11 protocol (httptools, when installed, would bypass these guards).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from runtime.server.state import ServerSettings

logger = logging.getLogger("runtime.server")

# uvicorn cancels what is left this long after --shutdown-timeout: time for aborted requests
# to send their final event and for the engine to stop after its step.
SHUTDOWN_MARGIN = 3.0
RESERVED_FILES = 128  # descriptors kept for model files, threads, logs beyond the connections


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers (counted
    from the connection's opening or its previous response), its idle timer armed from the
    start, and no connection kept beyond `limit_concurrency`."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.limit_concurrency is not None and len(self.connections) > self.limit_concurrency:
            transport.close()
            return
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        self._sync_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._sync_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._cancel_header_deadline()

    def _sync_header_deadline(self) -> None:
        """Armed while the connection waits for a request's headers, cancelled once they came."""
        waiting = self.cycle is None or self.cycle.response_complete
        if self.transport.is_closing() or not waiting:
            self._cancel_header_deadline()
        elif self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            logger.debug("closing a connection whose request headers did not arrive in time")
            self.transport.close()


def uvicorn_config(app: Any, settings: ServerSettings, port: int, **extra: Any) -> uvicorn.Config:
    """The uvicorn config of `runtime serve` (tests use it too, on port 0)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        http=functools.partial(GuardedH11Protocol, header_timeout=settings.header_timeout),
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.shutdown_timeout + SHUTDOWN_MARGIN,  # type: ignore[arg-type]
        **extra,
    )


def fit_open_files(limit_concurrency: int) -> int:
    """Raise the soft open-files limit (to at most the hard one) so `limit_concurrency`
    connections fit beside what the process needs; else lower the bound to what fits, with a
    warning. Without this a flood of idle sockets ends in EMFILE on every accept."""
    try:
        import resource
    except ImportError:  # not POSIX
        return limit_concurrency
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = limit_concurrency + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitted = max(1, soft - RESERVED_FILES)
        logger.warning(
            "open-files limit %d leaves room for %d connections: limit_concurrency %d -> %d",
            soft, fitted, limit_concurrency, fitted,
        )
        return fitted
    return limit_concurrency
