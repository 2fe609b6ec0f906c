"""Incremental detokenization for streaming: text deltas that never split a UTF-8 character.

Decoding one token at a time is wrong for both tokenizer families we serve: byte-level BPE
(GPT-2, Qwen, Llama 3) splits a multi-byte character over several tokens, and sentencepiece
style (Metaspace, byte fallback: Llama 2, Mistral) drops the leading space of whatever token a
decode call starts with. So we decode a small window twice, as TGI and vLLM do:

    prefix_text = decode(ids[prefix_offset:read_offset])   # already emitted, used as context
    new_text    = decode(ids[prefix_offset:])              # context + the unread tokens

and emit `new_text[len(prefix_text):]` once it is longer and does not end in U+FFFD (an
incomplete character: wait for the next token). Both decodes start at the same token, so
whatever the decoder does to a leading token cancels out.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["INITIAL_CONTEXT_TOKENS", "IncrementalDetokenizer"]

# Prompt tokens decoded as context before the first output token (vLLM/TGI use 5).
INITIAL_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Per-request streaming decoder; `add_tokens` returns only the new, complete text."""

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        # Offsets index self._ids; only the prompt's tail is kept as decoding context.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._num_context = len(self._ids)
        self._text_parts: list[str] = []

    @property
    def text(self) -> str:
        """All output text emitted so far (the concatenation of the returned deltas)."""
        return "".join(self._text_parts)

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens read but not yet turned into text (an unfinished character)."""
        return len(self._ids) - self._read_offset

    def add_tokens(self, new_ids: list[int]) -> str:
        """Append sampled tokens; return the text they complete (may be "")."""
        delta = []
        for token_id in new_ids:
            self._ids.append(int(token_id))
            delta.append(self._step(final=False))
        return "".join(delta)

    def flush(self) -> str:
        """At the end of the request, emit any held text even if it ends in U+FFFD."""
        return self._step(final=True) if self.num_pending_tokens else ""

    def _step(self, final: bool) -> str:
        window = self._ids[self._prefix_offset :]
        split = self._read_offset - self._prefix_offset
        prefix_text = self._decode(window[:split])
        new_text = self._decode(window)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            if final:  # nothing printable; drop the pending tokens
                self._read_offset = len(self._ids)
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text_parts.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""
