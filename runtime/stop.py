"""Stop strings: find them in the streamed text, truncate as OpenAI does, and hold back the
tail that could still grow into one so a client never sees half a stop string."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopChecker", "find_stop_string", "stop_holdback"]


def find_stop_string(text: str, new_chars: int, stop: Sequence[str]) -> tuple[int, str] | None:
    """Earliest (index, stop string) in `text` among matches that end in its last `new_chars`.

    Earlier text was checked before, so only matches touching the newest delta are new; a
    match may start in earlier deltas (a stop string spanning tokens). Ties go to the
    stop string listed first.
    """
    if not stop or new_chars <= 0:
        return None
    best: tuple[int, str] | None = None
    for s in stop:
        start = max(0, len(text) - new_chars - len(s) + 1)
        idx = text.find(s, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    return best


def stop_holdback(text: str, stop: Sequence[str]) -> int:
    """Number of trailing chars of `text` that are the start of some stop string.

    Streaming must withhold them: the next token may complete the stop string, which is then
    cut from the output. (vLLM holds back a fixed `max(len(stop)) - 1`; the exact prefix
    test holds back less and is just as safe.)
    """
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


class StopChecker:
    """Per-request stop-string state: feed text deltas, get the part that is safe to stream."""

    __slots__ = ("stop", "text", "stopped", "matched", "_emitted")

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop: tuple[str, ...] = tuple(stop)
        self.text = ""  # output text so far, truncated before the stop string once matched
        self.stopped = False
        self.matched: str | None = None
        self._emitted = 0

    def append(self, delta: str) -> str:
        """Add a detokenized delta; return the new text the client may see now."""
        if self.stopped or not delta:
            return ""
        self.text += delta
        match = find_stop_string(self.text, len(delta), self.stop)
        if match is not None:
            idx, self.matched = match
            self.text = self.text[:idx]
            self.stopped = True
            return self._emit(len(self.text))
        return self._emit(len(self.text) - stop_holdback(self.text, self.stop))

    def flush(self) -> str:
        """The request finished for another reason: release the held-back tail."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out = self.text[self._emitted : upto] if upto > self._emitted else ""
        self._emitted = max(self._emitted, upto)
        return out
