"""Per-request limits, checked before anything is tokenized: a request that exceeds them, or
could never fit the waiting queue, is a 400 at once (a 503 would have clients retry forever)."""

from __future__ import annotations

from collections.abc import Sequence

from runtime.server.errors import APIError
from runtime.server.state import ServerState


def check_choices(state: ServerState, num_prompts: int, n: int) -> None:
    """prompts x n engine requests must fit `max_choices_per_request` and the whole queue."""
    settings = state.settings
    queue = state.engine.max_queued_requests if state.engine else settings.max_queued_requests
    limit = min(settings.max_choices_per_request, queue)
    if num_prompts * n > limit:
        raise APIError(
            f"this request asks for {num_prompts * n} completions (prompts x n), more than the "
            f"{limit} one request may ask for (--max-choices-per-request, "
            "--max-queued-requests)",
            400,
            "prompt" if num_prompts > 1 else "n",
        )


def check_prompt_chars(state: ServerState, num_chars: int, param: str) -> None:
    """Characters of prompt text per request, before tokenizing (a cost bound, not the
    context: the context is checked in tokens afterwards)."""
    limit = state.settings.max_prompt_chars
    if num_chars > limit:
        raise APIError(
            f"the prompt has {num_chars} characters, more than the limit of {limit} "
            "(--max-prompt-chars)",
            400,
            param,
        )


def check_stops(state: ServerState, stop: str | Sequence[str] | None) -> None:
    """Number and length of stop strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    settings = state.settings
    if len(stops) > settings.max_stop_strings:
        raise APIError(
            f"{len(stops)} stop strings, more than the limit of {settings.max_stop_strings} "
            "(--max-stop-strings)",
            400,
            "stop",
        )
    longest = max((len(s) for s in stops), default=0)
    if longest > settings.max_stop_string_chars:
        raise APIError(
            f"a stop string has {longest} characters, more than the limit of "
            f"{settings.max_stop_string_chars} (--max-stop-string-chars)",
            400,
            "stop",
        )
