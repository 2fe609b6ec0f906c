"""ASGI middleware for what a route cannot do itself: bound a request body's size and arrival
time before anything reads it, and answer an unexpected exception without its text.

Plain ASGI classes (not Starlette's BaseHTTPMiddleware), so streaming responses and the
disconnect messages the routes wait on pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.server.errors import APIError, internal_error
from runtime.server.state import ServerState

logger = logging.getLogger("runtime.server")


async def reject(
    scope: Scope, receive: Receive, send: Send, error: APIError, close: bool = False
) -> None:
    """Answer `error` before the body is read. The connection stays open unless `close`:
    uvicorn reads and drops the rest of the body (closing at once would reset a client still
    sending it, before it reads our answer), and `header_timeout` bounds how long."""
    if close:
        error.headers = {**(error.headers or {}), "Connection": "close"}
    await error.response()(scope, receive, send)


class BodyGuard:
    """Read the whole body before the app does: over `max_request_body_bytes` is a 413 (from
    Content-Length, before reading a byte), a body slower than `body_timeout` a 408, and one
    still arriving when shutdown begins a 503, so no client can hold the server's exit (the
    408 and the 503 close the connection). The app then reads the buffered body; later
    messages (the disconnect) pass through."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.state.settings.max_request_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await reject(scope, receive, send, too_large(limit))
                return
        body = await self._read(scope, receive, send, limit)
        if body is None:
            return
        await self.app(scope, replay(body, receive), send)

    async def _read(self, scope: Scope, receive: Receive, send: Send, limit: int) -> bytes | None:
        """The body, or None once an error was answered (or the client left)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.state.settings.body_timeout
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await first_of(receive, self.state.stopping, deadline - loop.time())
            if message is None:
                await reject(scope, receive, send, self._late(), close=True)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await reject(scope, receive, send, too_large(limit))
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _late(self) -> APIError:
        if self.state.stopping.is_set():
            return APIError("the server is shutting down", 503)
        timeout = self.state.settings.body_timeout
        return APIError(f"the request body did not arrive within {timeout:g} s", 408)


def too_large(limit: int) -> APIError:
    return APIError(
        f"the request body is larger than {limit} bytes (--max-request-body-bytes)", 413
    )


async def first_of(receive: Receive, stop: asyncio.Event, timeout: float) -> Message | None:
    """The next ASGI message, or None when `stop` is set or `timeout` passes first."""
    if stop.is_set() or timeout <= 0:
        return None
    message = asyncio.ensure_future(receive())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        waiting = {message, stopped}
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not message.done():
            message.cancel()
    return message.result() if message.done() and not message.cancelled() else None


def replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    """An ASGI receive that yields `body` once, then defers to the real one."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


class InternalErrors:
    """The last resort for an unexpected exception: log it with a reference, answer a 500 that
    names only the reference, and keep the connection (Starlette's ServerErrorMiddleware
    re-raises, and uvicorn then drops the connection under the client's next request). A task
    cancelled because the shutdown timeout passed logs one line, not a traceback."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            if not self.state.stopping.is_set():
                raise
            logger.warning("%s %s cut off: the shutdown timeout passed", scope["method"],
                           scope["path"])
        except Exception:
            reference = uuid.uuid4().hex[:12]
            logger.exception("internal error %s in %s %s", reference, scope["method"],
                             scope["path"])
            if not started:  # else the response is under way: uvicorn closes the connection
                await internal_error(reference).response()(scope, receive, send)
