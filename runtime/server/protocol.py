"""Request bodies of the OpenAI API, and their translation into `SamplingParams`.

Pydantic checks types (strictly: `"16"` is not a number) and ignores unknown fields, as the
OpenAI API does; value bounds are checked once, by `SamplingParams`, so the server, the CLI and
the engine agree on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from runtime.sampling_params import SamplingParams

MAX_N = 16  # choices per request; each is a separate engine request
INT64 = (-(2**63), 2**63 - 1)

Prompt = str | list[str] | list[int] | list[list[int]]


class _Body(BaseModel):
    """Strict types, unknown fields accepted and ignored (clients send `user`, `suffix`...)."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by completions and chat; `None` means "use the model's or our default"."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: Annotated[int, Field(ge=INT64[0], le=INT64[1])] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    max_tokens: int | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, choice: int, defaults: Mapping[str, Any]
    ) -> SamplingParams:
        """Params of choice `choice`: seeds are derived (seed + choice) so choices differ but
        a seeded request is reproducible. Raises InvalidParameterError naming the field."""

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(pick("temperature", 1.0)),
            top_p=float(pick("top_p", 1.0)),
            top_k=int(pick("top_k", -1)),
            min_p=float(pick("min_p", 0.0)),
            seed=None if self.seed is None else (self.seed + choice) % 2**63,
            stop=tuple(stops),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    logprobs: int | None = None
    echo: bool = False

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: Any, handler: Any) -> Prompt:
        """One clear message instead of one error per member of the union."""
        try:
            prompt = handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "prompt_type",
                "expected a string, a list of strings, a list of token ids or a "
                "list of token-id lists",
            ) from None
        empty = prompt in ("", []) or (
            isinstance(prompt, list) and any(p in ("", []) for p in prompt)
        )
        if empty:
            raise PydanticCustomError("prompt_empty", "the prompt is empty")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a batch: one entry per prompt, text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """A message; list content may only hold text parts (this server has no vision models)."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[TextPart] | None = None

    def template_dict(self) -> dict[str, Any]:
        """What the chat template sees: extra keys (name, tool_calls...) kept, content as text."""
        data = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            data["content"] = "".join(part.text for part in self.content)
        data.setdefault("content", "")
        return data


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True

    def engine_logprobs(self) -> int | None:
        """The engine's `logprobs` (top-k count) from the chat pair logprobs/top_logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None
