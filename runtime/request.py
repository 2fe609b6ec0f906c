"""The request object the engine, the schedulers and the KV caches share."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"

    @property
    def done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ABORTED)


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, stop token id or stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # client disconnect, shutdown or engine.abort()
    ERROR = "error"  # this request failed (forward error, invalid scheduler decision)

    @property
    def status(self) -> RequestStatus:
        """The status a request that ends for this reason has: aborted or failed ones ABORTED."""
        return RequestStatus.ABORTED if self in (FinishReason.ABORT, FinishReason.ERROR) \
            else RequestStatus.FINISHED


@dataclass(eq=False, slots=True)
class Request:
    """One generation request and its progress; identity-hashed so it can key dicts.

    `num_computed_tokens` counts the tokens whose keys and values are in the KV cache;
    the tokens a forward pass must feed for this request are `pending_token_ids()`.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict] = field(default_factory=list)
    num_computed_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    output_text: str = ""
    detokenizer: object | None = None
    stop_checker: object | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: the sequence length once all are cached."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """KV slots the request can ever need: prompt_len + max_tokens (Orca's reservation)."""
        return len(self.prompt_token_ids) + self.params.max_tokens

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def pending_token_ids(self) -> list[int]:
        """Tokens not yet in the KV cache: the whole prompt at first, then the last sample."""
        done = self.num_computed_tokens - len(self.prompt_token_ids)
        if done >= 0:  # decoding: no need to copy the prompt
            return self.output_token_ids[done:]
        return self.prompt_token_ids[self.num_computed_tokens :] + self.output_token_ids

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, prompt_len={self.prompt_len}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, "
            f"{self.status.value})"
        )
