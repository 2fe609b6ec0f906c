"""The scheduler conformance suite: one pytest base class any plugin's tests can subclass.

    from runtime.conformance import SchedulerConformance

    class TestMyScheduler(SchedulerConformance):
        scheduler = "sjf"                          # the entry-point name, as in YAML
        scheduler_options = {"max_wait_steps": 4}  # the YAML `scheduler_options`

pytest then runs every `test_*` below against the installed plugin: selection by YAML name,
greedy tokens equal to solo runs under random arrivals and aborts, seeded sampling independent
of the batch, no leaks after finish and abort, abort handling, and the hook contracts. The
checks are plain functions too (`check_abort_handling`, `check_hook_contracts`,
`check_no_leak`), for use outside pytest. Needs pytest (the `test` extra).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import pytest
import torch
import yaml

from runtime.config import build_config
from runtime.contracts import check_decision, check_kv_cache
from runtime.engine import Engine
from runtime.hookspecs import hookimpl
from runtime.plugins import instantiate_scheduler, load_scheduler_class
from runtime.request import FinishReason, Request, RequestStatus
from runtime.sampling_params import SamplingParams
from runtime.scheduling import SchedulerError
from runtime.testing import (
    Arrival,
    SchedulerFactory,
    check_scheduling_invariance,
    make_engine,
    random_arrivals,
    run_alone,
    run_mix,
    tiny_model,
)

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def check_no_leak(engine: Engine) -> None:
    """Once every request has finished or been aborted, nothing is queued, running or cached."""
    assert not engine.has_unfinished(), f"unfinished: {engine.running} {engine.waiting}"
    stats = engine.kv_cache.memory_stats()
    assert engine.kv_cache.is_empty(), f"cache leak after every request left: {stats}"
    free, capacity = engine.kv_cache.num_free_tokens(), engine.kv_cache.capacity_tokens
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
            self.violations.append(str(exc))

    @hookimpl(wrapper=True)
    def make_kv_cache(self):
        cache = yield
        self.calls["make_kv_cache"] += 1
        self._record(check_kv_cache, cache, self.name)
        return cache

    @hookimpl(wrapper=True)
    def admit_requests(self, waiting, running, budget):
        decision = yield
        self.calls["admit_requests"] += 1
        self._record(check_decision, decision, waiting, running, budget.max_num_seqs, self.name)
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
        if len(stats.pass_seconds) != len(stats.passes):
            self.violations.append(f"step {stats.step}: pass_seconds do not match passes")

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


class SchedulerConformance:
    """Subclass in a test module and set `scheduler` (and `scheduler_options`); see the top."""

    scheduler: str | None = None
    scheduler_options: dict = {}  # read-only; mirrors the YAML key
    max_num_seqs: int = 4
    model_seed: int = 3

    @pytest.fixture(scope="class")
    @classmethod
    def conformance_model(cls) -> torch.nn.Module:
        return tiny_model(seed=cls.model_seed)

    @pytest.fixture
    def conformance_name(self) -> str | None:
        """The entry-point name under test; None tests the runtime's built-in defaults."""
        return self.scheduler

    @pytest.fixture
    def conformance_factory(self, conformance_name: str | None) -> SchedulerFactory:
        """A fresh scheduler per engine; override to test a class that is not installed yet."""
        if conformance_name is None:
            return lambda: None
        cls = load_scheduler_class(conformance_name)
        return lambda: cls(**self.scheduler_options)

    def test_selected_by_yaml_name(self, conformance_name, conformance_model, tmp_path) -> None:
        if conformance_name is None:
            pytest.skip("the built-in defaults have no entry point")
        path = tmp_path / "config.yaml"
        path.write_text(
            yaml.safe_dump(
                {"scheduler": conformance_name, "scheduler_options": dict(self.scheduler_options)}
            )
        )
        config = build_config(path)
        scheduler = instantiate_scheduler(config.scheduler, config.scheduler_options)
        assert type(scheduler) is load_scheduler_class(conformance_name)
        engine = make_engine(conformance_model, scheduler, name=config.scheduler)
        req = engine.generate([[1, 2, 3]], GREEDY)[0]
        assert req.finish_reason is FinishReason.LENGTH and len(req.output_token_ids) == 6

    @pytest.mark.parametrize("seed", [0, 1])
    def test_greedy_tokens_equal_solo_tokens(
        self, conformance_model, conformance_factory, seed: int
    ) -> None:
        arrivals = random_arrivals(
            seed,
            num_requests=9,
            vocab_size=128,
            prompt_len=(1, 24),
            max_tokens=(1, 10),
            max_arrival_step=8,
            abort_fraction=0.2,
        )
        check_scheduling_invariance(
            conformance_model, conformance_factory, arrivals, max_num_seqs=self.max_num_seqs
        )

    def test_more_requests_than_rows(self, conformance_model, conformance_factory) -> None:
        arrivals = random_arrivals(
            7,
            num_requests=7,
            vocab_size=128,
            prompt_len=(2, 16),
            max_tokens=(3, 3),
            max_arrival_step=0,
        )
        check_scheduling_invariance(
            conformance_model, conformance_factory, arrivals, max_num_seqs=3
        )

    def test_tight_kv_capacity(self, conformance_model, conformance_factory) -> None:
        arrivals = random_arrivals(
            13,
            num_requests=6,
            vocab_size=128,
            prompt_len=(2, 16),
            max_tokens=(2, 6),
            max_arrival_step=2,
        )
        check_scheduling_invariance(
            conformance_model,
            conformance_factory,
            arrivals,
            max_num_seqs=self.max_num_seqs,
            kv_cache_tokens=48,
        )

    def test_seeded_sampling_independent_of_batch(
        self, conformance_model, conformance_factory
    ) -> None:
        arrivals = random_arrivals(
            11,
            num_requests=6,
            vocab_size=128,
            prompt_len=(1, 12),
            max_tokens=(4, 8),
            max_arrival_step=4,
            temperature=1.0,
        )
        kwargs = {"max_num_seqs": self.max_num_seqs}
        mixed, _ = run_mix(conformance_model, conformance_factory, arrivals, **kwargs)
        for i, arr in enumerate(arrivals):
            solo = run_alone(conformance_model, conformance_factory, arr, **kwargs)
            assert mixed.tokens[i] == solo, f"request {i}: batched {mixed.tokens[i]} != {solo}"

    def test_no_leak_after_finish_and_abort(self, conformance_model, conformance_factory) -> None:
        arrivals = random_arrivals(
            17,
            num_requests=8,
            vocab_size=128,
            prompt_len=(1, 20),
            max_tokens=(1, 12),
            max_arrival_step=5,
            abort_fraction=0.5,
        )
        _, engine = run_mix(
            conformance_model, conformance_factory, arrivals, max_num_seqs=self.max_num_seqs
        )
        check_no_leak(engine)

    def test_abort_handling(self, conformance_model, conformance_factory) -> None:
        check_abort_handling(conformance_model, conformance_factory, max_num_seqs=self.max_num_seqs)

    def test_hook_contracts(self, conformance_model, conformance_factory) -> None:
        check_hook_contracts(conformance_model, conformance_factory, max_num_seqs=self.max_num_seqs)
