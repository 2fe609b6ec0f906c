"""Turning sampled tokens into request progress: stop conditions, text deltas, outputs."""

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


def stop_reason_for_token(request: Request, token_id: int, eos_token_ids: tuple[int, ...],
                          max_model_len: int) -> FinishReason | None:
    """Why a request ends after appending `token_id`, or None (EOS, stop ids, length)."""
    params = request.params
    if token_id in params.stop_token_ids:
        return FinishReason.STOP
    if not params.ignore_eos and token_id in (params.eos_token_ids or eos_token_ids):
        return FinishReason.STOP
    if request.num_output_tokens >= params.max_tokens or request.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None
