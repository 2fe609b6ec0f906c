"""Every installed scheduler passes the conformance suite a third-party plugin runs.

`TestInstalledSchedulers` is `runtime.conformance.SchedulerConformance` parametrised over the
`baton_runtime.schedulers` entry points (ours, the template's, anyone's installed next to them)
plus the runtime's built-in defaults. The tests below it check that the suite catches broken
schedulers.
"""

from __future__ import annotations

import pytest
import torch
from static_plugin import StaticScheduler

from runtime import hookimpl
from runtime.conformance import SchedulerConformance
from runtime.default_cache import PerRequestKVCache
from runtime.plugins import installed_schedulers
from runtime.scheduling import AdmissionDecision
from runtime.testing import (
    Arrival,
    check_abort_handling,
    check_hook_contracts,
    check_no_leak,
    check_scheduling_invariance,
    random_arrivals,
    run_mix,
)

NAMES = [info.name for info in installed_schedulers()]


class TestInstalledSchedulers(SchedulerConformance):
    @pytest.fixture(params=[*NAMES, pytest.param(None, id="runtime-default")])
    def conformance_name(self, request) -> str | None:
        return request.param


MODEL_SEED = 3


class _UnmaskedStatic(StaticScheduler):
    """A broken scheduler: padded keys are not hidden."""

    @hookimpl
    def build_attention_mask(self, batch, kv_cache):
        return torch.zeros_like(batch.mask)


def test_invariance_check_catches_a_broken_mask(model) -> None:
    arrivals = [Arrival(0, tuple(range(1, 20)), arr.params) for arr in
                random_arrivals(5, 1, 128, (1, 1), (6, 6), 0)]
    arrivals.append(Arrival(0, (7, 8), arrivals[0].params))
    with pytest.raises(AssertionError, match="batched"):
        check_scheduling_invariance(model, _UnmaskedStatic, arrivals)


class _LeakyCache(PerRequestKVCache):
    def free(self, request) -> None:
        if request.num_output_tokens == request.params.max_tokens:  # keeps aborted rows
            super().free(request)


class _Leaky:
    @hookimpl
    def make_kv_cache(self, shape, limits, device, dtype):
        return _LeakyCache(shape, limits, device, dtype)


def test_no_leak_check_catches_a_cache_that_keeps_aborted_rows(model) -> None:
    arrivals = random_arrivals(2, 6, 128, (2, 8), (20, 20), 0, abort_fraction=1.0)
    _, engine = run_mix(model, _Leaky, arrivals)
    with pytest.raises(AssertionError, match="cache leak"):
        check_no_leak(engine)
    with pytest.raises(AssertionError, match="cache leak"):
        check_abort_handling(model, _Leaky)


class _OverBudget:
    @hookimpl
    def admit_requests(self, waiting, running, budget):
        return AdmissionDecision(admit=tuple(waiting))  # ignores max_num_seqs


def test_contract_check_names_the_broken_rule(model) -> None:
    with pytest.raises(AssertionError, match="(?s)hook contracts broken.*exceeds max_num_seqs=2"):
        check_hook_contracts(model, _OverBudget, max_num_seqs=2)
