"""Every installed scheduler gives each request its solo tokens, and leaks nothing.

Parametrised over the `baton_runtime.schedulers` entry points, so a third-party plugin installed
next to ours is held to the same suite.
"""

from __future__ import annotations

import pytest
import torch
from static_plugin import StaticScheduler

from runtime import hookimpl
from runtime.plugins import installed_schedulers, load_scheduler_class
from runtime.testing import (
    Arrival,
    check_scheduling_invariance,
    random_arrivals,
    run_alone,
    run_mix,
    tiny_model,
)

SCHEDULERS = [info.name for info in installed_schedulers()] + ["runtime-default"]


def factory(name: str):
    if name == "runtime-default":
        return lambda: None
    cls = load_scheduler_class(name)
    return lambda: cls()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(seed=3)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_tokens_equal_solo_tokens(model, name: str, seed: int) -> None:
    arrivals = random_arrivals(seed, num_requests=9, vocab_size=128, prompt_len=(1, 24),
                               max_tokens=(1, 10), max_arrival_step=8, abort_fraction=0.2)
    check_scheduling_invariance(model, factory(name), arrivals, max_num_seqs=4)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_all_at_once_more_than_batch_size(model, name: str) -> None:
    arrivals = random_arrivals(7, num_requests=7, vocab_size=128, prompt_len=(2, 16),
                               max_tokens=(3, 3), max_arrival_step=0)
    check_scheduling_invariance(model, factory(name), arrivals, max_num_seqs=3)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_seeded_sampling_independent_of_batch(model, name: str) -> None:
    arrivals = random_arrivals(11, num_requests=6, vocab_size=128, prompt_len=(1, 12),
                               max_tokens=(4, 8), max_arrival_step=4, temperature=1.0)
    mixed, _ = run_mix(model, factory(name), arrivals, max_num_seqs=4)
    for i, arr in enumerate(arrivals):
        assert mixed.tokens[i] == run_alone(model, factory(name), arr, max_num_seqs=4)


class _UnmaskedStatic(StaticScheduler):
    """A broken scheduler: padded keys are not hidden."""

    @hookimpl
    def build_attention_mask(self, batch, kv_cache):
        return torch.zeros_like(kv_cache.build_mask(batch))


def test_invariance_check_catches_a_broken_mask(model) -> None:
    arrivals = [Arrival(0, tuple(range(1, 20)), arr.params) for arr in
                random_arrivals(5, 1, 128, (1, 1), (6, 6), 0)]
    arrivals.append(Arrival(0, (7, 8), arrivals[0].params))
    with pytest.raises(AssertionError, match="batched"):
        check_scheduling_invariance(model, _UnmaskedStatic, arrivals)
