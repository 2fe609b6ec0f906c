"""Per-token bookkeeping after sampling: timestamps, detokenization, and every stop rule.

Whether a request ends after a token is decided here, in one place: stop token ids, EOS and
lengths (`check_stop_token`), and stop strings (matched in `runtime.stop`).
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.request import FinishReason, Request
from runtime.stop import StopChecker


class TokenProcessor:
    """Appends sampled tokens to requests and decides when they stop.

    Text is streamed incrementally; the StopChecker holds back a tail that could still grow
    into a stop string, so a client never sees part of one. `req.output_text` is set when the
    request finishes (`flush`): joining the text at every token would be quadratic.
    """

    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def start(self, req: Request) -> None:
        if self.tokenizer is not None:
            from runtime.detokenizer import IncrementalDetokenizer

            req.detokenizer = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids)
            req.stop_checker = StopChecker(req.params.stop)

    def append(self, req: Request, token: int, logprob: dict | None,
               now: float) -> tuple[FinishReason | None, str]:
        """Record `token`; return (finish reason or None, text newly safe to emit)."""
        req.output_token_ids.append(token)
        if logprob is not None:
            req.output_logprobs.append(logprob)
        if req.first_token_time is None:
            req.first_token_time = now
        req.last_token_time = now
        req.token_times.append(now)
        reason = check_stop_token(req, token, self.eos_token_ids, self.max_model_len)
        if req.detokenizer is None:
            return reason, ""
        if reason is FinishReason.STOP:
            return reason, ""  # an EOS or stop token id is not part of the text (as in vLLM)
        checker: StopChecker = req.stop_checker
        delta = checker.append(req.detokenizer.add_tokens([token]))
        if checker.stopped:
            reason = FinishReason.STOP
        return reason, delta

    def flush(self, req: Request) -> str:
        """Everything held back, emitted when the request ends."""
        checker = req.stop_checker
        if checker is None:
            return ""
        tail = req.detokenizer.flush()  # a final incomplete character, as U+FFFD
        delta = checker.append(tail) + checker.flush()
        req.output_text = checker.text
        return delta


def check_stop_token(
    request: Request,
    token_id: int,
    eos_token_ids: Sequence[int] = (),
    max_model_len: int | None = None,
) -> FinishReason | None:
    """Why the request ends after `token_id`, or None. Call after appending the token.

    EOS stops unless `ignore_eos` (`params.eos_token_ids` when set, else the model's
    `eos_token_ids`); `stop_token_ids` always stop; reaching `max_tokens` (or the context
    length `max_model_len`) means LENGTH.
    """
    params = request.params
    if token_id in params.stop_token_ids:
        return FinishReason.STOP
    if not params.ignore_eos and token_id in (params.eos_token_ids or eos_token_ids):
        return FinishReason.STOP
    if request.num_output_tokens >= params.max_tokens:
        return FinishReason.LENGTH
    if max_model_len is not None and request.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None
