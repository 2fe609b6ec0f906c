"""Shortest-prompt-first admission with an aging guard, on the runtime's default KV cache.

Only public API is used (`runtime.api`). The plugin implements one hook, `admit_requests`;
`make_kv_cache` falls through to the built-in per-request layout, which reserves
`kv_reservation(request)` tokens (`prompt + max_tokens`, capped at the context length) at
admission and runs every step as one packed pass.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.api import AdmissionDecision, Request, SchedulingBudget, hookimpl, kv_reservation


def _check_option(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"sjf: scheduler_options.{name} must be an integer >= {minimum}, got {value!r}"
        )


class ShortestPromptFirst:
    """Admit the shortest waiting prompts first; a request that waited too long goes first.

    Prompt length is the job size known at arrival, so admitting short prompts first lowers the
    mean time to first token under load (shortest job first). Pure SJF starves long prompts
    while short ones keep arriving; the aging guard bounds that: a request that has waited
    `max_wait_steps` admission rounds is *aged*. Aged requests go before all others, oldest
    first, and when the oldest does not fit nothing younger is admitted past it, so the rows and
    KV slots it needs free up as running requests finish.

    Options (YAML `scheduler_options`):
      max_wait_steps: admission rounds (engine steps) before a waiting request is aged
        (default 32; 0 makes every request aged, i.e. plain first come first served).
      max_prefill_tokens: cap on the prompt tokens admitted in one step, so a burst of
        admissions does not stall the running requests' decoding for long (default: no cap;
        the first request of a step is always allowed, so long prompts are never locked out).
    """

    def __init__(self, max_wait_steps: int = 32, max_prefill_tokens: int | None = None) -> None:
        _check_option("max_wait_steps", max_wait_steps, 0)
        if max_prefill_tokens is not None:
            _check_option("max_prefill_tokens", max_prefill_tokens, 1)
        self.max_wait_steps = max_wait_steps
        self.max_prefill_tokens = max_prefill_tokens
        self._round = 0
        self._first_seen: dict[Request, int] = {}

    def waited(self, request: Request) -> int:
        """Admission rounds `request` has spent waiting so far (0 in the round it arrived)."""
        return self._round - self._first_seen.get(request, self._round)

    def order(self, waiting: Sequence[Request]) -> tuple[list[Request], list[Request]]:
        """(aged in arrival order, the rest shortest first); ties keep arrival order."""
        aged = [r for r in waiting if self.waited(r) >= self.max_wait_steps]
        rest = set(waiting).difference(aged)
        fresh = sorted((r for r in waiting if r in rest), key=lambda r: r.num_tokens)
        return aged, fresh

    @hookimpl
    def admit_requests(
        self, waiting: Sequence[Request], running: Sequence[Request], budget: SchedulingBudget
    ) -> AdmissionDecision:
        self._round += 1
        # Forget requests that left the queue; remember when each waiting one was first seen.
        self._first_seen = {r: self._first_seen.get(r, self._round) for r in waiting}
        aged, fresh = self.order(waiting)
        room = budget.max_num_seqs - len(running)
        free = budget.kv_free_tokens
        prefill = 0
        admit: list[Request] = []
        for req in aged + fresh:
            if room <= 0:
                break
            need = kv_reservation(req, budget.max_model_len)  # what the default layout holds
            over_cap = (
                self.max_prefill_tokens is not None
                and bool(admit)
                and prefill + req.num_tokens > self.max_prefill_tokens
            )
            if need > free or over_cap:
                if self.waited(req) >= self.max_wait_steps:
                    break  # the aging guard: nobody overtakes a request that waited too long
                continue
            admit.append(req)
            room -= 1
            free -= need
            prefill += req.num_tokens
        return AdmissionDecision(admit=tuple(admit))
