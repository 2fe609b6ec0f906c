"""Who may use the server: an API key (Bearer token, as vLLM's `--api-key`) and, on a loopback
server, the Host header (a DNS-rebinding web page reaches 127.0.0.1 under its own host name).

Both answer before the body is read, with the OpenAI error shape.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.server.errors import APIError
from runtime.server.middleware import reject

ALWAYS_OPEN = frozenset({"/health"})  # readiness probes carry no key
DOCS_AND_METRICS = frozenset({"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
LOOPBACK_NAMES = frozenset({"localhost"})


def _digest(secret: bytes) -> bytes:
    """Hash first so the constant-time comparison also hides the key's length."""
    return hashlib.sha256(secret).digest()


def bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


class APIKeyCheck:
    """401 unless `Authorization: Bearer <key>`; `/health` is always open, `/metrics` and the
    docs pages too unless `all_routes` (vLLM guards only /v1; every other route needs the key)."""

    def __init__(self, app: ASGIApp, api_key: str, all_routes: bool = False) -> None:
        self.app = app
        self.digest = _digest(api_key.encode("utf-8"))
        self.open = ALWAYS_OPEN if all_routes else ALWAYS_OPEN | DOCS_AND_METRICS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in self.open:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and hmac.compare_digest(_digest(token), self.digest):
            await self.app(scope, receive, send)
            return
        error = APIError(
            "Invalid or missing API key: send the header `Authorization: Bearer <key>`",
            401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await reject(scope, receive, send, error)


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_host_names(bind_host: str, allowed_hosts: str | None) -> frozenset[str] | None:
    """Host names to accept, or None for any: `allowed_hosts` is None (auto: loopback names
    when bound to loopback, any otherwise), `*`, or a comma-separated list of names."""
    if allowed_hosts is None:
        return frozenset() if is_loopback(bind_host) else None
    names = frozenset(n.strip().lower() for n in allowed_hosts.split(",") if n.strip())
    return None if "*" in names else names


def host_name(value: bytes) -> str | None:
    """The host of a Host header value (`name:port`, `[::1]:port`), or None if malformed."""
    try:
        return urlsplit("//" + value.decode("latin-1")).hostname
    except ValueError:
        return None


class HostCheck:
    """400 for a Host header outside `names` (loopback names always pass); none is fine
    (HTTP/1.0), since browsers, the rebinding attacker's vehicle, always send one."""

    def __init__(self, app: ASGIApp, names: frozenset[str]) -> None:
        self.app = app
        self.names = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name != b"host":
                    continue
                host = host_name(value)
                if host is None or not (host in self.names or is_loopback(host)):
                    shown = value.decode("latin-1")[:100]
                    error = APIError(
                        f"Host header {shown!r} is not allowed; list it in --allowed-hosts", 400
                    )
                    await reject(scope, receive, send, error)
                    return
                break
        await self.app(scope, receive, send)
