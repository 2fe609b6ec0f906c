"""Stop strings: find them in the streamed text, truncate as OpenAI does, and hold back the
tail that could still grow into one so a client never sees half a stop string.

Matching is an Aho-Corasick automaton over all the stop strings of a request, fed each output
character once: its state is the longest suffix of the text that is a prefix of some stop string,
which is both the match test and the exact hold-back. The work is linear in the output, whatever
the number and length of the stop strings (checking each stop string against the whole text at
every token was quadratic and ran on the engine thread).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["StopAutomaton", "StopChecker", "compile_stops"]


@dataclass(frozen=True, slots=True)
class StopAutomaton:
    """Aho-Corasick over stop strings; state 0 is the empty prefix."""

    stops: tuple[str, ...]
    goto: dict[tuple[int, str], int]  # (state, char) -> state, the trie edges only
    fail: list[int]  # state -> state of its longest proper suffix that is in the trie
    depth: list[int]  # state -> length of the prefix it stands for
    match: list[int]  # state -> index of the longest stop string ending here, or -1

    def step(self, state: int, char: str) -> tuple[int, int]:
        """(next state, trie lookups made); lookups are amortised O(1) per character."""
        lookups = 1
        while (nxt := self.goto.get((state, char))) is None and state:
            state = self.fail[state]
            lookups += 1
        return (nxt if nxt is not None else 0), lookups


@functools.lru_cache(maxsize=8)
def compile_stops(stops: tuple[str, ...]) -> StopAutomaton:
    """Build the automaton once per distinct stop list (the `n` choices of a request share it)."""
    goto: dict[tuple[int, str], int] = {}
    depth, terminal = [0], [-1]
    children: list[list[tuple[str, int]]] = [[]]
    for index, stop in enumerate(stops):
        state = 0
        for char in stop:
            nxt = goto.get((state, char))
            if nxt is None:
                nxt = len(depth)
                goto[(state, char)] = nxt
                depth.append(depth[state] + 1)
                terminal.append(-1)
                children.append([])
                children[state].append((char, nxt))
            state = nxt
        if terminal[state] == -1:  # a repeated stop string keeps its first index
            terminal[state] = index
    fail, match = [0] * len(depth), list(terminal)
    queue = [child for _, child in children[0]]
    for state in queue:  # breadth first: a suffix's state is final before it is needed
        for char, child in children[state]:
            f = fail[state]
            while (state_f := goto.get((f, char))) is None and f:
                f = fail[f]
            fail[child] = state_f if state_f is not None else 0
            if match[child] == -1:
                match[child] = match[fail[child]]
            queue.append(child)
    return StopAutomaton(stops, goto, fail, depth, match)


class StopChecker:
    """Per-request stop-string state: feed text deltas, get the part that is safe to stream."""

    __slots__ = ("automaton", "stopped", "matched", "num_lookups", "_state", "_length",
                 "_emitted", "_pending", "_text")

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.automaton = compile_stops(tuple(stop)) if stop else None
        self.stopped = False
        self.matched: str | None = None
        self.num_lookups = 0  # trie lookups so far: the matching work, for tests and metrics
        self._state = 0
        self._length = 0  # characters of output text so far
        self._emitted: list[str] = []  # text already returned to the caller
        self._pending = ""  # text held back, then the newest delta
        self._text: str | None = None

    @property
    def text(self) -> str:
        """Output text so far, truncated before the stop string once matched."""
        if self._text is None:
            self._text = "".join(self._emitted) + self._pending
        return self._text

    def append(self, delta: str) -> str:
        """Add a detokenized delta; return the new text the client may see now."""
        if self.stopped or not delta:
            return ""
        self._text = None
        start = self._length
        self._length += len(delta)
        self._pending += delta
        if self.automaton is None:
            return self._release(len(self._pending))
        best = self._scan(delta, start)
        if best is not None:  # truncate at the earliest match; ties go to the first listed
            begin, index = best
            self.matched = self.automaton.stops[index]
            self.stopped = True
            self._length = begin
            cut = max(0, len(self._pending) - (start + len(delta) - begin))
            self._pending = self._pending[:cut]
            return self._release(len(self._pending))
        hold = self.automaton.depth[self._state]
        return self._release(len(self._pending) - hold)

    def flush(self) -> str:
        """The request finished for another reason: release the held-back tail."""
        return self._release(len(self._pending))

    def _scan(self, delta: str, start: int) -> tuple[int, int] | None:
        """Feed `delta` (its first char at text position `start`); the earliest match as
        (start position, stop index), among matches ending in `delta`."""
        auto, state, best = self.automaton, self._state, None
        for pos, char in enumerate(delta, start + 1):
            state, lookups = auto.step(state, char)
            self.num_lookups += lookups
            index = auto.match[state]
            if index >= 0:
                found = (pos - len(auto.stops[index]), index)
                best = found if best is None or found < best else best
        self._state = state
        return best

    def _release(self, upto: int) -> str:
        """Emit the first `upto` pending characters."""
        if upto <= 0:
            return ""
        out, self._pending = self._pending[:upto], self._pending[upto:]
        self._emitted.append(out)
        return out
