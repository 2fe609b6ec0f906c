"""Per-token bookkeeping after sampling: timestamps, detokenization, stop conditions."""

from __future__ import annotations

from runtime.outputs import find_stop_string, stop_reason_for_token
from runtime.request import FinishReason, Request


class TokenProcessor:
    """Appends sampled tokens to requests and decides when they stop.

    Text is streamed incrementally; while a stop string could still be forming at the end
    of the text, that tail is held back so a client never sees part of a stop string.
    """

    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def start(self, req: Request) -> None:
        if self.tokenizer is not None:
            from runtime.tokenizer import IncrementalDetokenizer

            req.detokenizer = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids)

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
        reason = stop_reason_for_token(req, token, self.eos_token_ids, self.max_model_len)
        if req.detokenizer is None:
            return reason, ""
        hide_eos = reason is FinishReason.STOP and not req.params.ignore_eos
        if not (hide_eos and token in (req.params.eos_token_ids or self.eos_token_ids)):
            before = len(req.output_text)
            req.output_text += req.detokenizer.add_tokens([token])
            stops = req.params.stop
            if stops:
                cut = find_stop_string(req.output_text, stops, before)
                if cut is not None:
                    req.output_text = req.output_text[:cut]
                    reason = FinishReason.STOP
        return reason, self._emit(req, final=reason is not None)

    def _emit(self, req: Request, final: bool) -> str:
        """Text not yet emitted, minus a tail that could be the start of a stop string."""
        end = len(req.output_text)
        if not final and req.params.stop:
            hold = max(len(s) - 1 for s in req.params.stop)
            text = req.output_text
            for k in range(min(hold, end), 0, -1):
                if any(s.startswith(text[end - k:]) for s in req.params.stop):
                    end -= k
                    break
        delta = req.output_text[req.num_text_emitted:end]
        req.num_text_emitted = max(req.num_text_emitted, end)
        return delta

    def flush(self, req: Request) -> str:
        """Everything held back, emitted when the request ends."""
        return self._emit(req, final=True) if req.detokenizer is not None else ""
