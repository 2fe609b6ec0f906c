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
