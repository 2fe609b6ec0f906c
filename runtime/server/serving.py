"""What completions and chat share: admission, SSE framing, collection, usage, logprobs.

A request with `p` prompts and `n` choices becomes `p * n` engine requests (choice index
`prompt * n + j`, OpenAI's order) read from one `RequestStream`. Streaming ends with
`data: [DONE]` whatever happens; an error after the stream started is sent as an event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from fastapi import Request as HTTPRequest
from fastapi.sse import format_sse_event

from runtime.engine import Engine
from runtime.outputs import RequestOutput
from runtime.request import FinishReason, Request
from runtime.sampling_params import InvalidParameterError, SamplingParams
from runtime.server.async_engine import (
    EngineDeadError,
    NotAcceptingError,
    QueueFullError,
    RequestStream,
)
from runtime.server.errors import QUEUE_FULL_STATUS, APIError
from runtime.server.state import ServerState, state_of

logger = logging.getLogger("runtime.server")
DONE = format_sse_event(data_str="[DONE]")


@dataclass
class Job:
    """One HTTP request's engine requests and what its responses repeat."""

    prefix: str  # of the response id: cmpl or chatcmpl
    chunk_object: str  # the `object` of its stream chunks
    model: str
    n: int
    include_usage: bool
    requests: list[Request] = field(default_factory=list)
    api_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.api_id = self.api_id or f"{self.prefix}-{uuid.uuid4().hex}"

    def usage(self) -> dict[str, int]:
        prompt = sum(r.prompt_len for r in self.requests[:: self.n])
        completion = sum(r.num_output_tokens for r in self.requests)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def build_requests(
    state: ServerState,
    job: Job,
    prompts: Sequence[list[int] | str],
    params_for: Callable[[int, int], SamplingParams],
    rename: dict[str, str] | None = None,
) -> None:
    """Tokenize and validate every choice of every prompt before any is queued.

    `params_for(prompt_len, choice)` builds the sampling params; errors become 400s naming
    the field, renamed through `rename` (chat reports prompt errors under `messages`).
    """
    engine = state.core
    for p_idx, prompt in enumerate(prompts):
        ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        for j in range(job.n):
            try:
                params = params_for(len(ids), j)
                req = engine.make_request(ids, params, f"{job.api_id}-{p_idx * job.n + j}")
            except InvalidParameterError as exc:
                raise APIError(str(exc), 400, (rename or {}).get(exc.param, exc.param)) from None
            req.prompt = prompt if isinstance(prompt, str) else None
            job.requests.append(req)


def submit(state: ServerState, job: Job) -> RequestStream:
    """Admit the job's requests or reject them at once (queue full, shutting down, dead)."""
    assert state.engine is not None
    try:
        stream = state.engine.submit(job.requests)
    except QueueFullError as exc:
        raise APIError(str(exc), QUEUE_FULL_STATUS, headers={"Retry-After": "1"}) from None
    except (NotAcceptingError, EngineDeadError) as exc:
        raise APIError(str(exc), 503) from None
    if state.settings.log_requests:
        for req in job.requests:
            logger.info(
                "request %s: prompt_tokens=%d prompt=%r params=%s",
                req.request_id,
                req.prompt_len,
                (req.prompt or "")[:200],
                req.params,
            )
    return stream


def public_reason(out: RequestOutput) -> str | None:
    """`stop` or `length` once a choice ends normally; failures are reported as errors."""
    if out.finished and out.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
        return out.finish_reason.value
    return None


async def choice_outputs(stream: RequestStream) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) pairs; a failed or shutdown-aborted choice raises APIError
    after its last text was yielded, so clients keep what was generated."""
    try:
        async for out in stream.outputs():
            yield stream.index[out.request_id], out
            if out.finish_reason is FinishReason.ERROR:  # the engine logged the traceback
                logger.error("request %s failed: %s", out.request_id, out.error)
                raise APIError(
                    f"the request failed inside the engine (request {out.request_id}); the "
                    "server log has the details",
                    500,
                )
            if out.finish_reason is FinishReason.ABORT:
                raise APIError("the request was aborted: the server is shutting down", 503)
    except (EngineDeadError, NotAcceptingError) as exc:
        raise APIError(str(exc), 500 if isinstance(exc, EngineDeadError) else 503) from None


def sse(payload: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(payload, ensure_ascii=False))


async def sse_events(
    state: ServerState, job: Job, stream: RequestStream, chunks: AsyncIterator[dict]
) -> AsyncIterator[bytes]:
    """Frame a job's chunks as SSE: usage chunk, error event, `[DONE]`; abort on disconnect.

    A disconnecting client cancels this generator (Starlette watches the socket), and the
    `finally` aborts whatever is unfinished so the scheduler frees its cache at the next step.
    """
    try:
        async for chunk in chunks:
            if job.include_usage:
                chunk["usage"] = None
            yield sse(chunk)
        if job.include_usage:
            yield sse(envelope(job, job.chunk_object, []) | {"usage": job.usage()})
        log_finished(state, job)
    except APIError as exc:
        yield sse(exc.body())
    finally:
        stream.abort()
    yield DONE


def envelope(job: Job, obj: str, choices: list[dict]) -> dict:
    """The fields every response and chunk repeats around its choices."""
    return {
        "id": job.api_id,
        "object": obj,
        "created": job.created,
        "model": job.model,
        "choices": choices,
    }


async def _wait_disconnect(request: HTTPRequest) -> None:
    """Return when the client goes away (the body was already read, so only that is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Choice:
    """A choice's text and finish reason, accumulated for a non-streaming response."""

    text: str = ""
    finish_reason: str | None = None


async def collect(request: HTTPRequest, job: Job, stream: RequestStream) -> list[Choice]:
    """Run the job to the end; abort it if the client disconnects meanwhile.

    Waiting on the ASGI `receive` channel notices a disconnect as soon as it happens, without
    polling, so the abort reaches the engine before its next step.
    """
    choices = [Choice() for _ in job.requests]

    async def run() -> None:
        async for idx, out in choice_outputs(stream):
            choices[idx].text += out.text_delta
            choices[idx].finish_reason = public_reason(out) or choices[idx].finish_reason

    work = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise APIError("client disconnected", 499)
        work.result()
    finally:
        work.cancel()
        gone.cancel()
        stream.abort()
    log_finished(state_of(request), job)
    return choices


def log_finished(state: ServerState, job: Job) -> None:
    if state.settings.log_requests:
        for req in job.requests:
            reason = req.finish_reason.value if req.finish_reason else None
            logger.info(
                "request %s finished: %s, %d tokens", req.request_id, reason, req.num_output_tokens
            )


TokenLogprob = tuple[str, float, list[tuple[str, float]]]


def token_logprobs(engine: Engine, req: Request, start: int, end: int) -> list[TokenLogprob]:
    """(token text, logprob, top alternatives) of output tokens [start, end), from the
    sampler's records; the engine thread has finished appending these before we read them."""
    decode = engine.tokenizer.decode
    out = []
    for token, record in zip(
        req.output_token_ids[start:end], req.output_logprobs[start:end], strict=False
    ):
        top = [(decode([t], skip_special_tokens=False), lp) for t, lp in record["top"]]
        out.append((decode([token], skip_special_tokens=False), record["token_logprob"], top))
    return out
