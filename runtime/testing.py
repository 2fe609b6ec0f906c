"""Conformance kit for scheduler plugins: tiny seeded models, invariance runs, contract checks.

A third party tests its scheduler with the same functions our own schedulers are tested with:
every request must get the greedy tokens it gets when run alone, whatever the batch mix, and
the cache must hold nothing once every request has finished or been aborted. The pytest suite
built from them is `runtime.conformance.SchedulerConformance`.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from runtime.architectures import build_model
from runtime.contracts import check_decision, check_kv_cache
from runtime.engine import Engine, EngineLimits
from runtime.hookspecs import hookimpl
from runtime.model_config import ModelConfig
from runtime.request import FinishReason, Request, RequestStatus
from runtime.sampling_params import SamplingParams
from runtime.scheduling import SchedulerError

SchedulerFactory = Callable[[], object]


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64,
               architecture: str = "LlamaForCausalLM", **overrides) -> torch.nn.Module:
    """A seeded random model small enough for exhaustive scheduling tests (float64 default).

    Weights use std 0.3, not the usual 0.02: with tiny init, attention is nearly uniform and a
    layout that gets positions or padding wrong can still produce the right tokens.
    """
    fields = dict(architecture=architecture, vocab_size=128, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  max_position_embeddings=256, torch_dtype=str(dtype).removeprefix("torch."))
    fields.update(overrides)
    with torch.device("cpu"):
        model = build_model(ModelConfig(**fields)).init_weights(seed, std=0.3)
    return model.to(dtype).eval()


@dataclass(frozen=True, slots=True)
class Arrival:
    """A request that arrives before engine step `step` (0 = before the first step)."""

    step: int
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    abort_at_step: int | None = None


@dataclass(slots=True)
class MixResult:
    tokens: dict[int, list[int]] = field(default_factory=dict)
    reasons: dict[int, FinishReason | None] = field(default_factory=dict)
    errors: dict[int, str | None] = field(default_factory=dict)
    steps: int = 0


def random_arrivals(seed: int, num_requests: int, vocab_size: int, prompt_len: tuple[int, int],
                    max_tokens: tuple[int, int], max_arrival_step: int,
                    abort_fraction: float = 0.0, temperature: float = 0.0) -> list[Arrival]:
    """A seeded mix of prompt lengths, output lengths, arrival steps and aborts."""
    rng = random.Random(seed)
    out = []
    for i in range(num_requests):
        prompt = tuple(rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_len)))
        params = SamplingParams(max_tokens=rng.randint(*max_tokens), temperature=temperature,
                                seed=seed * 1000 + i if temperature else None, ignore_eos=True)
        step = rng.randint(0, max_arrival_step)
        abort = step + rng.randint(1, 4) if rng.random() < abort_fraction else None
        out.append(Arrival(step, prompt, params, abort))
    return out


def make_engine(model: torch.nn.Module, scheduler: object, name: str = "under-test",
                max_num_seqs: int = 8, kv_cache_tokens: int | None = None,
                observers: tuple[object, ...] = (), attention_backend: str = "auto",
                kv_cache_dtype: str = "auto") -> Engine:
    return Engine(model, None, scheduler, name,
                  EngineLimits(max_num_seqs=max_num_seqs, kv_cache_tokens=kv_cache_tokens,
                               kv_cache_dtype=kv_cache_dtype),
                  observers, attention_backend=attention_backend)


def run_alone(model: torch.nn.Module, factory: SchedulerFactory, arrival: Arrival,
              **engine_kwargs) -> list[int]:
    """The tokens a request gets with the engine to itself."""
    engine = make_engine(model, factory(), **engine_kwargs)
    req = engine.add_request(list(arrival.prompt_token_ids), arrival.params)
    while engine.has_unfinished():
        engine.step()
    assert engine.kv_cache.is_empty(), "cache not empty after the only request finished"
    return req.output_token_ids


def run_mix(model: torch.nn.Module, factory: SchedulerFactory, arrivals: Sequence[Arrival],
            max_steps: int = 10_000, **engine_kwargs) -> tuple[MixResult, Engine]:
    """Replay arrivals and aborts against engine steps; return every request's tokens."""
    engine = make_engine(model, factory(), **engine_kwargs)
    reqs: dict[int, Request] = {}
    result = MixResult()
    step = 0
    while step < max_steps:
        for i, arr in enumerate(arrivals):
            if arr.step == step:
                reqs[i] = engine.add_request(list(arr.prompt_token_ids), arr.params)
            if arr.abort_at_step == step and i in reqs:
                engine.abort(reqs[i].request_id)
        pending = any(arr.step > step for arr in arrivals)
        if not engine.has_unfinished() and not pending:
            break
        engine.step()
        step += 1
    else:
        raise AssertionError(f"requests still unfinished after {max_steps} steps")
    for i, req in reqs.items():
        result.tokens[i] = req.output_token_ids
        result.reasons[i] = req.finish_reason
        result.errors[i] = req.error
    result.steps = step
    return result, engine


def check_scheduling_invariance(model: torch.nn.Module, factory: SchedulerFactory,
                                arrivals: Sequence[Arrival], **engine_kwargs) -> MixResult:
    """Assert every non-aborted request's tokens equal its solo tokens, and nothing leaks.

    Aborted requests must have a prefix of their solo tokens. Returns the mixed run's result.
    """
    mixed, engine = run_mix(model, factory, arrivals, **engine_kwargs)
    assert engine.kv_cache.is_empty(), f"cache leak: {engine.kv_cache.memory_stats()}"
    assert not engine.running and not engine.waiting
    for i, arr in enumerate(arrivals):
        solo = run_alone(model, factory, arr, **engine_kwargs)
        got = mixed.tokens[i]
        if mixed.reasons[i] is FinishReason.ABORT:
            assert got == solo[: len(got)], f"request {i} (aborted): {got} vs solo {solo}"
        else:
            assert mixed.reasons[i] is FinishReason.LENGTH, \
                f"request {i} finished with {mixed.reasons[i]}: {mixed.errors[i]}"
            assert got == solo, f"request {i}: batched {got} != solo {solo}"
    return mixed


GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def greedy(max_tokens: int) -> SamplingParams:
    """Greedy sampling of exactly `max_tokens` tokens (EOS ignored), as invariance runs compare."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def drain(engine: Engine, max_steps: int = 1000) -> None:
    """Step until every request has left the engine; fail after `max_steps` steps."""
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return
        engine.step()
    raise AssertionError(f"requests still unfinished after {max_steps} steps: {engine.running}")


def check_no_leak(engine: Engine) -> None:
    """Once every request has finished or been aborted, nothing is queued, running or cached."""
    assert not engine.has_unfinished(), f"unfinished: {engine.running} {engine.waiting}"
    stats = engine.kv_cache.memory_stats()
    assert engine.kv_cache.is_empty(), f"cache leak after every request left: {stats}"
    free, capacity = engine.kv_cache.kv_free_tokens(), engine.kv_cache.kv_cache_tokens
    assert free == capacity, f"cache leak: {free} of {capacity} KV slots free"


class ContractChecker:
    """An observer plugin that records every broken hook contract (see `check_hook_contracts`)."""

    def __init__(self, name: str = "under-test") -> None:
        self.name = name
        self.violations: list[str] = []
        self.calls: collections.Counter[str] = collections.Counter()
        self.finished: collections.Counter[Request] = collections.Counter()

    def _record(self, check: Callable, *args) -> None:
        try:
            check(*args)
        except SchedulerError as exc:
            self.violations.append(f"scheduler {self.name!r}: {exc}")

    @hookimpl(wrapper=True)
    def make_kv_cache(self):
        cache = yield
        self.calls["make_kv_cache"] += 1
        self._record(check_kv_cache, cache)
        return cache

    @hookimpl(wrapper=True)
    def admit_requests(self, waiting, running, budget):
        decision = yield
        self.calls["admit_requests"] += 1
        self._record(check_decision, decision, waiting, running, budget.max_num_seqs)
        return decision

    @hookimpl
    def on_step_end(self, stats) -> None:
        self.calls["on_step_end"] += 1
        bad = [
            p
            for p in stats.passes
            if not (
                0 <= p.useful_tokens <= p.computed_tokens
                and 0 <= p.useful_attention_pairs <= p.computed_attention_pairs
            )
        ]
        if bad:
            self.violations.append(f"step {stats.step}: useful work exceeds computed: {bad}")
        mem = stats.memory
        if not 0 <= mem.used_elements <= mem.allocated_elements:
            self.violations.append(f"step {stats.step}: used KV exceeds allocated: {mem}")

    @hookimpl
    def on_request_finished(self, request) -> None:
        self.finished[request] += 1
        if self.finished[request] > 1:
            self.violations.append(f"{request.request_id} reported finished twice")
        if not request.status.done or request.finish_reason is None:
            self.violations.append(f"{request.request_id} reported finished while {request}")


def check_hook_contracts(
    model: torch.nn.Module, factory: SchedulerFactory, seed: int = 0, **engine_kwargs
) -> ContractChecker:
    """Run a random mix under a `ContractChecker`; fail on any broken contract or failed request.

    Contracts: `make_kv_cache` returns a `KVCache`; every `admit_requests` decision admits
    waiting requests once, preempts running ones and fits `max_num_seqs`; step stats never count
    more useful than computed work, nor more used than allocated KV memory; every request is
    reported finished exactly once. Broken passes (`ForwardBatch` contracts) fail their requests
    in the engine, which shows up here as an `error` finish.
    """
    checker = ContractChecker()
    arrivals = random_arrivals(
        seed,
        num_requests=8,
        vocab_size=model.config.vocab_size,
        prompt_len=(1, 20),
        max_tokens=(1, 8),
        max_arrival_step=6,
        abort_fraction=0.25,
    )
    mixed, engine = run_mix(model, factory, arrivals, observers=(checker,), **engine_kwargs)
    assert not checker.violations, "hook contracts broken:\n" + "\n".join(checker.violations)
    errors = {i: e for i, e in mixed.errors.items() if mixed.reasons[i] is FinishReason.ERROR}
    assert not errors, f"requests failed: {errors}"
    assert checker.calls["make_kv_cache"] == 1 and checker.calls["admit_requests"] == mixed.steps
    assert len(checker.finished) == len(arrivals), "a request was never reported finished"
    check_no_leak(engine)
    return checker


def _step_until(engine: Engine, done: Callable[[], bool], max_steps: int = 100) -> list:
    outputs = []
    for _ in range(max_steps):
        if done():
            return outputs
        outputs += engine.step()
    raise AssertionError(f"condition not reached in {max_steps} steps")


def check_abort_handling(
    model: torch.nn.Module, factory: SchedulerFactory, **engine_kwargs
) -> None:
    """Abort while waiting, while running, twice, unknown and finished ids, then everything."""
    engine = make_engine(model, factory(), **engine_kwargs)
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    queued = engine.add_request([1, 2, 3, 4], GREEDY)
    running = engine.add_request([9, 8, 7], long)
    kept = [engine.add_request(p, GREEDY) for p in ([5, 6, 7], [8, 9])]
    engine.abort(queued.request_id)  # before any step: it leaves from the waiting queue
    engine.abort("no-such-request")  # unknown ids are ignored
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == queued.request_id]
    assert aborted and aborted[0].finished and aborted[0].finish_reason is FinishReason.ABORT
    assert queued.status is RequestStatus.ABORTED and queued.output_token_ids == []
    _step_until(
        engine, lambda: running.status is RequestStatus.RUNNING and running.num_output_tokens > 0
    )
    engine.abort(running.request_id)
    engine.abort(running.request_id)  # twice: the second is ignored
    outs = engine.step()
    assert [o.finish_reason for o in outs if o.request_id == running.request_id] == [
        FinishReason.ABORT
    ], "the running request's abort was not reported in the next step"
    _step_until(engine, lambda: not engine.has_unfinished())
    engine.abort(kept[0].request_id)  # already finished: ignored
    engine.step()
    assert kept[0].finish_reason is FinishReason.LENGTH
    for req in kept:
        solo = run_alone(
            model, factory, Arrival(0, tuple(req.prompt_token_ids), GREEDY), **engine_kwargs
        )
        assert req.output_token_ids == solo, f"{req.output_token_ids} != solo {solo}"
    check_no_leak(engine)
    batch = [engine.add_request([i + 1] * (i + 2), long) for i in range(5)]
    engine.step()
    engine.step()
    for req in batch:
        engine.abort(req.request_id)
    outs = engine.step()
    assert {o.request_id for o in outs if o.finish_reason is FinishReason.ABORT} == {
        r.request_id for r in batch
    }
    check_no_leak(engine)
