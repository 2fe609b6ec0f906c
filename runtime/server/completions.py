"""POST /v1/completions: text or token-id prompts, a batch of them, `n` choices each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest
from fastapi.sse import EventSourceResponse

from runtime.server.async_engine import RequestStream
from runtime.server.errors import APIError
from runtime.server.limits import check_choices, check_prompt_chars, check_stops
from runtime.server.parsing import openapi_body, parse_body
from runtime.server.protocol import CompletionRequest
from runtime.server.serving import (
    Job,
    TokenLogprob,
    build_requests,
    choice_outputs,
    collect,
    envelope,
    public_reason,
    sse_events,
    submit,
    token_logprobs,
)
from runtime.server.state import ServerState, check_model, ready_state

router = APIRouter()
DEFAULT_MAX_TOKENS = 16  # the OpenAI completions default


def format_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists plus each token's text offset."""
    offsets = []
    for text, _, _ in entries:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": [e[0] for e in entries],
        "token_logprobs": [e[1] for e in entries],
        "top_logprobs": [dict(e[2]) for e in entries],
        "text_offset": offsets,
    }


def prepare(
    state: ServerState, raw: bytes, content_type: str | None = None
) -> tuple[CompletionRequest, Job]:
    """Parse, check and tokenize; CPU-heavy for a large request, so run on a worker thread."""
    body = parse_body(raw, CompletionRequest, content_type)
    check_model(state, body.model)
    if body.echo:
        raise APIError("echo is not supported", 400, "echo")
    prompts = body.prompts()
    check_choices(state, len(prompts), body.n)
    check_stops(state, body.stop)
    check_prompt_chars(state, sum(len(p) for p in prompts if isinstance(p, str)), "prompt")
    job = Job("cmpl", "text_completion", state.settings.model_name, body.n, body.include_usage)
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    defaults = state.core.tokenizer.generation_defaults
    build_requests(
        state,
        job,
        prompts,
        lambda _, j: body.sampling_params(max_tokens, body.logprobs, j, defaults),
    )
    return body, job


@router.post(
    "/v1/completions", response_model=None, openapi_extra=openapi_body(CompletionRequest)
)
async def create_completion(
    request: HTTPRequest,
    state: Annotated[ServerState, Depends(ready_state)],
) -> dict | EventSourceResponse:
    raw, content_type = await request.body(), request.headers.get("content-type")
    body, job = await asyncio.to_thread(prepare, state, raw, content_type)
    stream = submit(state, job)
    if body.stream:
        chunks = _chunks(state, job, stream, body.logprobs is not None)
        return EventSourceResponse(sse_events(state, job, stream, chunks))
    choices = await collect(request, job, stream)
    out = []
    for idx, (choice, req) in enumerate(zip(choices, job.requests, strict=True)):
        lp = None
        if body.logprobs is not None:
            lp = format_logprobs(token_logprobs(state.core, req, 0, req.num_output_tokens), 0)
        out.append(
            {
                "index": idx,
                "text": choice.text,
                "logprobs": lp,
                "finish_reason": choice.finish_reason,
                "stop_reason": None,
            }
        )
    return envelope(job, "text_completion", out) | {"usage": job.usage()}


async def _chunks(
    state: ServerState, job: Job, stream: RequestStream, want_logprobs: bool
) -> AsyncIterator[dict]:
    """One chunk per choice per step that produced text or ended the choice."""
    counts = [0] * len(job.requests)
    offsets = [0] * len(job.requests)
    async for idx, out in choice_outputs(stream):
        start = counts[idx]
        counts[idx] += len(out.new_token_ids)
        reason = public_reason(out)
        if not out.text_delta and reason is None and not (want_logprobs and out.new_token_ids):
            continue
        lp = None
        if want_logprobs:
            entries = token_logprobs(state.core, job.requests[idx], start, counts[idx])
            lp = format_logprobs(entries, offsets[idx])
            offsets[idx] += sum(len(e[0]) for e in entries)
        yield envelope(
            job,
            "text_completion",
            [
                {
                    "index": idx,
                    "text": out.text_delta,
                    "logprobs": lp,
                    "finish_reason": reason,
                    "stop_reason": None,
                }
            ],
        )
