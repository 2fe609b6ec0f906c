"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, as vLLM serves them.

Every failure path ends here so clients written for vLLM and the `openai` package see the
status, `type` and `param` they already parse.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.sampling_params import InvalidParameterError

# The status a full waiting queue answers with (see runtime/server/__init__.py).
QUEUE_FULL_STATUS = HTTPStatus.SERVICE_UNAVAILABLE

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    422: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error with its HTTP status and OpenAI `param`; raised anywhere, answered as JSON."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.headers = headers

    @property
    def type(self) -> str:
        return _TYPES.get(
            self.status, "InternalServerError" if self.status >= 500 else "BadRequestError"
        )

    def body(self) -> dict[str, Any]:
        """The JSON body, also sent as the payload of an SSE error event. Text that UTF-8
        cannot carry (a lone surrogate echoed from a request) is escaped, never a crash."""
        return {
            "error": {
                "message": _encodable(self.message),
                "type": self.type,
                "param": None if self.param is None else _encodable(self.param),
                "code": self.status,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def internal_error(reference: str) -> APIError:
    """A 500 that names a log reference instead of the exception, whose text may carry
    paths, shapes or other internals."""
    return APIError(
        f"Internal server error (reference {reference}); the server log has the details", 500
    )


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """The top-level field: ("body", "messages", 0, "content") -> "messages"; body -> None."""
    fields = [p for p in loc if p != "body"]
    return str(fields[0]) if fields and isinstance(fields[0], str) else None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem, located by its full path; `param` is the top-level field."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"Invalid JSON body: {first.get('ctx', {}).get('error', 'decode error')}", None
    loc = tuple(first.get("loc", ()))
    param = _param_from_loc(loc)
    if param is None:
        return "The request body must be a JSON object (Content-Type: application/json)", None
    path = ".".join(str(p) for p in loc[1:] if not _is_type_tag(p))
    return f"{path}: {first.get('msg', 'invalid value')}", param


def _is_type_tag(part: Any) -> bool:
    """Pydantic names the member of a union in the location (`str`, `list[int]`)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def install_error_handlers(app: FastAPI) -> None:
    """Map our errors, FastAPI's body validation (422 -> 400) and HTTP errors to one shape;
    anything unexpected is `middleware.InternalErrors`' (a 500 with a log reference)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(message, 400, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "The request body is not valid UTF-8 JSON"
        return APIError(message, exc.status_code, headers=exc.headers).response()

    @app.exception_handler(InvalidParameterError)
    async def _invalid(_: Request, exc: InvalidParameterError) -> JSONResponse:
        return APIError(str(exc), 400, exc.param).response()

