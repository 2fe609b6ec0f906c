"""Conformance kit for scheduler plugins: tiny seeded models and scheduling-invariance runs.

A third party tests its scheduler with the same functions our own schedulers are tested with:
every request must get the greedy tokens it gets when run alone, whatever the batch mix, and
the cache must hold nothing once every request has finished or been aborted.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from runtime.architectures import build_model
from runtime.engine import Engine, EngineLimits
from runtime.model_config import ModelConfig
from runtime.request import FinishReason, Request
from runtime.sampling_params import SamplingParams

SchedulerFactory = Callable[[], object]


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64,
               architecture: str = "LlamaForCausalLM", **overrides) -> torch.nn.Module:
    """A seeded random model small enough for exhaustive scheduling tests (float64 default)."""
    fields = dict(architecture=architecture, vocab_size=128, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  max_position_embeddings=256, torch_dtype=str(dtype).removeprefix("torch."))
    fields.update(overrides)
    with torch.device("cpu"):
        model = build_model(ModelConfig(**fields)).init_weights(seed)
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
                observers: tuple[object, ...] = ()) -> Engine:
    return Engine(model, None, scheduler, name,
                  EngineLimits(max_num_seqs=max_num_seqs, kv_cache_tokens=kv_cache_tokens),
                  observers)


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
