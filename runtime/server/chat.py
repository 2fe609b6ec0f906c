"""POST /v1/chat/completions: messages rendered by the model's chat template, then generated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest
from fastapi.sse import EventSourceResponse

from runtime.chat_template import ChatTemplateError
from runtime.server.async_engine import RequestStream
from runtime.server.errors import APIError
from runtime.server.limits import check_choices, check_prompt_chars, check_stops
from runtime.server.parsing import openapi_body, parse_body
from runtime.server.protocol import ChatCompletionRequest
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


def format_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """The chat shape: one record per token with its UTF-8 bytes and top alternatives."""

    def item(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            item(text, lp) | {"top_logprobs": [item(t, x) for t, x in top]}
            for text, lp, top in entries
        ]
    }


def render_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    """Chat template -> token ids; the template carries BOS, so no special tokens are added."""
    tokenizer = state.core.tokenizer
    try:
        text = tokenizer.apply_chat_template(
            [m.template_dict() for m in body.messages],
            add_generation_prompt=body.add_generation_prompt,
            chat_template=state.chat_template,
        )
    except ChatTemplateError as exc:
        raise APIError(str(exc), 400, "messages") from None
    check_prompt_chars(state, len(text), "messages")
    return tokenizer.encode(text, add_special_tokens=False)


def prepare(
    state: ServerState, raw: bytes, content_type: str | None = None
) -> tuple[ChatCompletionRequest, Job]:
    """Parse, check, render and tokenize; CPU-heavy for a large request, so run on a worker
    thread."""
    body = parse_body(raw, ChatCompletionRequest, content_type)
    check_model(state, body.model)
    check_choices(state, 1, body.n)
    check_stops(state, body.stop)
    ids = render_prompt(state, body)
    job = Job(
        "chatcmpl", "chat.completion.chunk", state.settings.model_name, body.n, body.include_usage
    )
    limit = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    defaults = state.core.tokenizer.generation_defaults
    context = state.core.max_model_len

    def params_for(prompt_len: int, choice: int):  # no limit given: up to the context (vLLM)
        max_tokens = limit if limit is not None else max(1, context - prompt_len)
        return body.sampling_params(max_tokens, body.engine_logprobs(), choice, defaults)

    rename = {"prompt": "messages"}
    if body.max_completion_tokens is not None:
        rename["max_tokens"] = "max_completion_tokens"
    build_requests(state, job, [ids], params_for, rename)
    return body, job


@router.post(
    "/v1/chat/completions",
    response_model=None,
    openapi_extra=openapi_body(ChatCompletionRequest),
)
async def create_chat_completion(
    request: HTTPRequest,
    state: Annotated[ServerState, Depends(ready_state)],
) -> dict | EventSourceResponse:
    raw, content_type = await request.body(), request.headers.get("content-type")
    body, job = await asyncio.to_thread(prepare, state, raw, content_type)
    stream = submit(state, job)
    if body.stream:
        return EventSourceResponse(
            sse_events(state, job, stream, _chunks(state, job, stream, body.logprobs))
        )
    choices = await collect(request, job, stream)
    out = []
    for idx, (choice, req) in enumerate(zip(choices, job.requests, strict=True)):
        lp = None
        if body.logprobs:
            lp = format_logprobs(token_logprobs(state.core, req, 0, req.num_output_tokens))
        out.append(
            {
                "index": idx,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": lp,
                "finish_reason": choice.finish_reason,
                "stop_reason": None,
            }
        )
    return envelope(job, "chat.completion", out) | {"usage": job.usage()}


async def _chunks(
    state: ServerState, job: Job, stream: RequestStream, want_logprobs: bool
) -> AsyncIterator[dict]:
    """The role first for every choice, then content deltas, then the finish reason."""
    obj = "chat.completion.chunk"
    for idx in range(len(job.requests)):
        yield envelope(
            job,
            obj,
            [
                {
                    "index": idx,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        )
    counts = [0] * len(job.requests)
    async for idx, out in choice_outputs(stream):
        start = counts[idx]
        counts[idx] += len(out.new_token_ids)
        reason = public_reason(out)
        if not out.text_delta and reason is None and not (want_logprobs and out.new_token_ids):
            continue
        lp = None
        if want_logprobs:
            lp = format_logprobs(token_logprobs(state.core, job.requests[idx], start, counts[idx]))
        delta = {"content": out.text_delta} if out.text_delta else {}
        yield envelope(
            job, obj, [{"index": idx, "delta": delta, "logprobs": lp, "finish_reason": reason}]
        )
