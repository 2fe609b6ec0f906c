"""What one engine step reports per request: new tokens, new text, and whether it ended."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.request import FinishReason, Request


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request: new tokens, new text, and whether it ended."""

    request: Request
    new_token_ids: tuple[int, ...]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id


def extend_output(prev: RequestOutput | None, request: Request, token_ids: tuple[int, ...] = (),
                  text: str = "", finished: bool = False, finish_reason: FinishReason | None = None,
                  error: str | None = None) -> RequestOutput:
    """A request's output for this step: `prev` (its earlier progress this step) plus more."""
    if prev is not None:
        token_ids, text = prev.new_token_ids + token_ids, prev.text_delta + text
    return RequestOutput(request, token_ids, text, finished, finish_reason, error)
