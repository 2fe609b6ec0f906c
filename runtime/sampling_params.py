"""Per-request sampling parameters, validated once at the edge (server, CLI, engine)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class InvalidParameterError(ValueError):
    """A request parameter is out of range; `param` names the offending field (OpenAI `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops (OpenAI/vLLM field names)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax, as in the OpenAI API."""
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise InvalidParameterError naming the field for any out-of-range value."""
        _check_int("max_tokens", self.max_tokens, minimum=1)
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise InvalidParameterError("temperature must be a finite number", "temperature")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidParameterError(
                f"temperature must be in [0, 2], got {self.temperature}", "temperature"
            )
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidParameterError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        _check_int("top_k", self.top_k, minimum=-1)
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidParameterError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=None)
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise InvalidParameterError("stop strings must be non-empty strings", "stop")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, minimum=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > 20:
                raise InvalidParameterError("logprobs must be at most 20", "logprobs")


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}", name)
    if minimum is not None and value < minimum:
        raise InvalidParameterError(f"{name} must be >= {minimum}, got {value}", name)


def prompt_token_ids(tokenizer: Any, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
    """(text, token ids) of a prompt given as text (tokenized) or as ids; the engine and the
    scale-out front end share it so both reject the same prompts the same way."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidParameterError("text prompts need a tokenizer", "prompt")
        return prompt, tokenizer.encode(prompt)
    return None, [int(t) for t in prompt]


def check_prompt(token_ids: list[int], max_tokens: int, vocab_size: int,
                 max_model_len: int) -> None:
    """The prompt fits the model: known token ids, and room for `max_tokens` in the context.

    Raises InvalidParameterError with vLLM's overflow wording, which client libraries match.
    """
    n = len(token_ids)
    if n == 0:
        raise InvalidParameterError("the prompt is empty", "prompt")
    if any(t < 0 or t >= vocab_size for t in token_ids):
        raise InvalidParameterError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
    if n >= max_model_len:
        raise InvalidParameterError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {n} input tokens. Please reduce the length of the input.", "prompt")
    if n + max_tokens > max_model_len:
        raise InvalidParameterError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {n + max_tokens} tokens ({n} in the input, {max_tokens} in the "
            "completion). Please reduce the length of the input or completion.", "max_tokens")
