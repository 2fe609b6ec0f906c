"""What crosses between the front end and the actors: plain, picklable, small.

Requests go out as `RequestSpec` (token ids, params: the front has validated and tokenized);
results come back in batches, one `Report` per poll, each request's progress as a `Delta`
that mirrors `RequestOutput` without the `Request` object, which stays on its side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from runtime.outputs import RequestOutput
from runtime.request import Request
from runtime.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One engine request as the front built it; `arrival_wall` is its arrival on `time.time()`
    (clocks of different processes only agree on wall time; on several machines up to NTP)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    prompt: str | None
    arrival_wall: float

    @classmethod
    def of(cls, req: Request) -> RequestSpec:
        age = max(0.0, time.monotonic() - req.arrival_time)
        return cls(req.request_id, tuple(req.prompt_token_ids), req.params, req.prompt,
                   time.time() - age)

    def arrival_monotonic(self) -> float:
        """The arrival on this process's monotonic clock (what the engine's metrics use)."""
        return time.monotonic() - max(0.0, time.time() - self.arrival_wall)


@dataclass(frozen=True, slots=True)
class Delta:
    """A request's progress since the previous delta: tokens, text, and whether it ended."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[dict, ...] = ()
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, out: RequestOutput, first: int) -> Delta:
        """From an engine output whose new tokens start at output index `first`."""
        req, n = out.request, len(out.new_token_ids)
        logprobs = tuple(req.output_logprobs[first : first + n]) if req.output_logprobs else ()
        reason = out.finish_reason.value if out.finish_reason is not None else None
        return cls(out.request_id, tuple(out.new_token_ids), out.text_delta, logprobs,
                   out.finished, reason, out.error)


@dataclass(frozen=True, slots=True)
class Load:
    """A replica's load as its engine last saw it (the router weighs these)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0


@dataclass(frozen=True, slots=True)
class Report:
    """One poll's answer: deltas from `cursor` on, the next cursor, and the replica's load.

    `incarnation` changes when Ray restarts the actor, so the front can tell a restart apart
    from a quiet replica; `dead` is set when the engine loop died (the actor then exits).
    """

    incarnation: str
    cursor: int
    deltas: tuple[Delta, ...]
    load: Load
    dead: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """What the front needs to know about a started replica."""

    incarnation: str
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    scheduler: str
    accepts_prefilled: bool
    node: str
    pid: int
