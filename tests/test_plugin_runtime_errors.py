"""A plugin that misbehaves at run time fails the affected requests, never the engine.

Invalid admission decisions are in test_hooks.py; here: wrong return types, raising hooks,
and KV layouts that yield inconsistent forward passes or raise.
"""

from __future__ import annotations

import dataclasses

import pytest

from runtime import hookimpl
from runtime.default_cache import PerRequestKVCache
from runtime.engine import Engine, EngineLimits
from runtime.request import FinishReason
from runtime.scheduling import AdmissionDecision, SchedulerError
from runtime.testing import drain, greedy

MODEL_SEED = 2
GREEDY = greedy(4)


def with_layout(cache_cls: type) -> object:
    class Layout:
        @hookimpl
        def make_kv_cache(self, shape, limits, device, dtype):
            return cache_cls(shape, limits, device, dtype)

    return Layout()


def test_make_kv_cache_returning_a_non_cache_is_an_error(model) -> None:
    class NotACache:
        @hookimpl
        def make_kv_cache(self, shape, limits, device, dtype):
            return {"k": [], "v": []}

    with pytest.raises(
        SchedulerError,
        match=r"scheduler 'odd' \(class tests.test_plugin_runtime_errors.NotACache\): "
        "make_kv_cache returned dict, expected a runtime.api.KVCache",
    ):
        Engine(model, scheduler=NotACache(), scheduler_name="odd")


def test_make_kv_cache_raising_names_the_scheduler(model) -> None:
    class Raises:
        @hookimpl
        def make_kv_cache(self, shape, limits, device, dtype):
            raise MemoryError("cannot preallocate 80 GB")

    with pytest.raises(
        SchedulerError,
        match=r"scheduler 'big' \(class tests.test_plugin_runtime_errors.Raises\): "
        "make_kv_cache failed: MemoryError: cannot preallocate 80 GB",
    ) as err:
        Engine(model, scheduler=Raises(), scheduler_name="big")
    assert isinstance(err.value.__cause__, MemoryError)


def test_admit_requests_raising_fails_the_waiting_requests_only(model) -> None:
    class RaisesOnSecondCall:
        calls = 0

        @hookimpl
        def admit_requests(self, waiting, running, budget):
            self.calls += 1
            if self.calls == 2:
                raise ZeroDivisionError("division by zero")
            return AdmissionDecision(admit=tuple(waiting[:1]))

    engine = Engine(model, scheduler=RaisesOnSecondCall(), scheduler_name="flaky")
    first = engine.add_request([1, 2, 3], GREEDY)
    engine.step()
    second = engine.add_request([4, 5], GREEDY)
    outs = engine.step()
    assert second.finish_reason is FinishReason.ERROR
    assert (
        second.error == "scheduler 'flaky' (class tests.test_plugin_runtime_errors."
        "RaisesOnSecondCall): admission failed: ZeroDivisionError: division by zero"
    )
    assert any(o.request_id == second.request_id and o.finished for o in outs)
    drain(engine, 50)
    solo = Engine(model).generate([[1, 2, 3]], GREEDY)[0]
    assert first.finish_reason is FinishReason.LENGTH
    assert first.output_token_ids == solo.output_token_ids
    assert engine.kv_cache.is_empty()


def test_admit_requests_returning_a_list_fails_the_waiting_requests(model) -> None:
    class ReturnsList:
        @hookimpl
        def admit_requests(self, waiting, running, budget):
            return list(waiting)

    engine = Engine(model, scheduler=ReturnsList(), scheduler_name="listy")
    reqs = [engine.add_request([1, 2], GREEDY) for _ in range(2)]
    engine.step()
    assert all(r.finish_reason is FinishReason.ERROR for r in reqs)
    assert reqs[0].error == (
        "scheduler 'listy' (class tests.test_plugin_runtime_errors.ReturnsList): "
        "admit_requests returned list, expected AdmissionDecision"
    )
    assert not engine.has_unfinished()


class _MismatchedSamples(PerRequestKVCache):
    """Samples one row fewer than it says it samples."""

    def forward_batches(self, running):
        for batch in super().forward_batches(running):
            yield dataclasses.replace(batch, sample_indices=batch.sample_indices[:-1])


def test_forward_batch_with_mismatched_sample_indices_fails_the_step(model) -> None:
    engine = Engine(model, scheduler=with_layout(_MismatchedSamples), scheduler_name="skewed")
    reqs = [engine.add_request(p, GREEDY) for p in ([1, 2, 3], [4, 5])]
    outs = engine.step()
    assert all(r.finish_reason is FinishReason.ERROR for r in reqs)
    assert reqs[0].error == (
        "scheduler 'skewed' (class tests.test_plugin_runtime_errors.Layout): the KV cache "
        "yielded a ForwardBatch whose "
        "sample_indices (1,) do not match its 2 sampled_requests"
    )
    assert all(r.output_token_ids == [] and r.num_computed_tokens == 0 for r in reqs)
    assert {o.request_id for o in outs if o.finished} == {r.request_id for r in reqs}
    assert engine.kv_cache.is_empty() and not engine.has_unfinished()


class _FeedsStrangers(PerRequestKVCache):
    """Keeps feeding the first request it ever saw, even after it finished."""

    first = None

    def forward_batches(self, running):
        self.first = self.first or running[0]
        for batch in super().forward_batches(running):
            if self.first in batch.requests:
                yield batch
            else:
                yield dataclasses.replace(batch, requests=(self.first, *batch.requests[1:]))


def test_forward_batch_feeding_a_finished_request_fails_the_step(model) -> None:
    engine = Engine(
        model,
        scheduler=with_layout(_FeedsStrangers),
        scheduler_name="ghost",
        limits=EngineLimits(max_num_seqs=1),
    )
    done = engine.add_request([1, 2, 3], GREEDY)
    late = engine.add_request([4, 5], GREEDY)
    drain(engine, 50)
    assert done.finish_reason is FinishReason.LENGTH
    assert late.finish_reason is FinishReason.ERROR
    assert late.error == (
        "scheduler 'ghost' (class tests.test_plugin_runtime_errors.Layout): the KV cache "
        "yielded a ForwardBatch with a request that is not running"
    )
    assert done.num_output_tokens == 4  # the finished request was not touched again


class _RaisingLayout(PerRequestKVCache):
    def forward_batches(self, running):
        if any(r.num_output_tokens == 2 for r in running):
            raise IndexError("row map out of sync")
        yield from super().forward_batches(running)


def test_layout_raising_mid_run_fails_the_running_requests(model) -> None:
    engine = Engine(model, scheduler=with_layout(_RaisingLayout), scheduler_name="fragile")
    req = engine.add_request([1, 2, 3], GREEDY)
    drain(engine, 50)
    assert req.finish_reason is FinishReason.ERROR and req.num_output_tokens == 2
    assert req.error == ("scheduler 'fragile' (class tests.test_plugin_runtime_errors.Layout): "
                         "step failed: IndexError: row map out of sync")
    assert engine.kv_cache.is_empty()


class _FullAfterOne(PerRequestKVCache):
    def add(self, request):
        if self.memory_stats().num_rows:
            raise RuntimeError("no free row")
        super().add(request)


def test_cache_add_raising_fails_that_request_only(model) -> None:
    engine = Engine(model, scheduler=with_layout(_FullAfterOne), scheduler_name="narrow")
    ok, refused = (engine.add_request(p, GREEDY) for p in ([1, 2, 3], [4, 5]))
    drain(engine, 50)
    assert ok.finish_reason is FinishReason.LENGTH
    assert refused.finish_reason is FinishReason.ERROR
    assert refused.error == (
        "scheduler 'narrow' (class tests.test_plugin_runtime_errors.Layout): the KV cache "
        "failed to add the request: RuntimeError: no free row"
    )
    assert engine.kv_cache.is_empty()


def test_raising_observer_is_logged_not_fatal(model, caplog) -> None:
    class Crashes:
        @hookimpl
        def on_request_finished(self, request):
            raise KeyError("metrics backend gone")

        @hookimpl
        def on_step_end(self, stats):
            raise KeyError("metrics backend gone")

    engine = Engine(model, observers=(Crashes(),))
    req = engine.add_request([1, 2, 3], GREEDY)
    drain(engine, 50)
    assert req.finish_reason is FinishReason.LENGTH and req.num_output_tokens == 4
    assert "observer hook on_request_finished raised" in caplog.text
    assert "observer hook on_step_end raised" in caplog.text
