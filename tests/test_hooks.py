"""One test per hook (test_hook_<name>), plus the meta-test that keeps it that way."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

from runtime import hookimpl, hookspecs
from runtime.api import CAUSAL
from runtime.default_cache import PerRequestKVCache
from runtime.engine import Engine, EngineLimits
from runtime.request import FinishReason
from runtime.sampling_params import SamplingParams
from runtime.scheduling import AdmissionDecision
from runtime.testing import drain, greedy

MODEL_SEED = 1
GREEDY = greedy(4)


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "baton_runtime_spec")]


def test_every_hook_has_a_test() -> None:
    tests = {name for name, _ in inspect.getmembers(sys.modules[__name__], inspect.isfunction)}
    missing = [h for h in hook_names() if f"test_hook_{h}" not in tests]
    assert not missing, f"hooks without a test_hook_<name>: {missing}"


def test_every_hook_signature_is_documented() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "plugin-hooks.md").read_text()
    for name in hook_names():
        sig = f"{name}{inspect.signature(getattr(hookspecs, name))}".replace("'", "")
        assert sig in doc, f"docs/plugin-hooks.md lacks the exact signature: {sig}"


def test_hook_admit_requests(model) -> None:
    calls = []

    class OneAtATime:
        @hookimpl
        def admit_requests(self, waiting, running, budget):
            calls.append((len(waiting), len(running), budget.max_num_seqs))
            return AdmissionDecision(admit=tuple(waiting[:1]) if not running else ())

    engine = Engine(model, scheduler=OneAtATime(), limits=EngineLimits(max_num_seqs=5))
    reqs = [engine.add_request([1, 2, 3], GREEDY) for _ in range(3)]
    engine.step()
    assert calls[0] == (3, 0, 5)
    assert len(engine.running) == 1 and len(engine.waiting) == 2
    drain(engine)
    assert all(r.finish_reason is FinishReason.LENGTH for r in reqs)
    assert max(n_running for _, n_running, _ in calls) == 1


def test_hook_admit_requests_invalid_decision_fails_requests(model) -> None:
    class Greedy:
        @hookimpl
        def admit_requests(self, waiting, running, budget):
            return AdmissionDecision(admit=tuple(waiting))  # ignores max_num_seqs

    engine = Engine(model, scheduler=Greedy(), scheduler_name="greedy",
                    limits=EngineLimits(max_num_seqs=2))
    reqs = [engine.add_request([1, 2], GREEDY) for _ in range(3)]
    outs = engine.step()
    assert all(r.finish_reason is FinishReason.ERROR for r in reqs)
    assert reqs[0].error == (
        "scheduler 'greedy' (class tests.test_hooks.Greedy): batch of 3 exceeds max_num_seqs=2")
    assert {o.request_id for o in outs if o.finished} == {r.request_id for r in reqs}
    assert engine.kv_cache.is_empty() and not engine.has_unfinished()


@pytest.mark.parametrize(("decide", "message"), [
    (lambda w, r: AdmissionDecision(admit=(w[0], w[0])), "admitted req-1 twice in one decision"),
    (lambda w, r: AdmissionDecision(admit=tuple(r)), "admitted req-0, which is already running"),
    (lambda w, r: AdmissionDecision(preempt=tuple(w)), "preempted req-1, which is not in this "
                                                       "engine's running queue"),
])
def test_hook_admit_requests_invalid_decision_says_what_happened(model, decide,
                                                                 message: str) -> None:
    class Wrong:
        @hookimpl
        def admit_requests(self, waiting, running, budget):
            return decide(waiting, running) if running else None

    engine = Engine(model, scheduler=Wrong(), scheduler_name="wrong")
    first = engine.add_request([1, 2], GREEDY)
    engine.step()
    second = engine.add_request([3, 4], GREEDY)
    engine.step()
    named = second if "req-1" in message else first
    assert named.error == f"scheduler 'wrong' (class tests.test_hooks.Wrong): {message}"


def test_hook_admit_requests_preemption_recomputes(model) -> None:
    class PreemptOnce:
        done = False

        @hookimpl
        def admit_requests(self, waiting, running, budget):
            if running and not self.done and running[0].num_output_tokens == 2:
                self.done = True
                return AdmissionDecision(preempt=(running[0],))
            return None

    solo = Engine(model).generate([[5, 6, 7]], GREEDY)[0].output_token_ids
    engine = Engine(model, scheduler=PreemptOnce())
    req = engine.add_request([5, 6, 7], GREEDY)
    drain(engine)
    assert req.num_preemptions == 1 and req.output_token_ids == solo


def test_hook_make_kv_cache(model) -> None:
    made = []

    class Layout:
        @hookimpl
        def make_kv_cache(self, shape, limits, device, dtype):
            made.append((shape.num_layers, shape.num_kv_heads, limits.max_num_seqs, dtype))
            return PerRequestKVCache(shape, limits, device, dtype)

    engine = Engine(model, scheduler=Layout(), limits=EngineLimits(max_num_seqs=3))
    assert made == [(2, 2, 3, torch.float64)]
    assert isinstance(engine.kv_cache, PerRequestKVCache)


def test_hook_build_attention_mask(model) -> None:
    seen = []

    class Watcher:
        @hookimpl
        def build_attention_mask(self, batch, kv_cache):
            seen.append((batch.phase.value, batch.mask))
            return None  # keep the mask the layout built

    req = Engine(model, scheduler=Watcher()).generate([[1, 2, 3]], GREEDY)[0]
    assert [phase for phase, _ in seen] == ["prefill", "decode", "decode", "decode"]
    assert seen[0][1] == (CAUSAL,) and seen[1][1] == (None,)  # the default layout's masks
    assert req.output_token_ids == Engine(model).generate([[1, 2, 3]], GREEDY)[0].output_token_ids


def test_hook_build_attention_mask_result_reaches_attention(model) -> None:
    class BrokenMask:
        @hookimpl
        def build_attention_mask(self, batch, kv_cache):
            return "not a mask"

    engine = Engine(model, scheduler=BrokenMask())
    good = engine.add_request([1, 2, 3], GREEDY)
    outs = engine.step()
    assert good.finish_reason is FinishReason.ERROR and "forward pass failed" in good.error
    assert outs[0].finished and engine.kv_cache.is_empty()


def test_hook_on_step_end(model) -> None:
    stats = []


    class Recorder:
        @hookimpl
        def on_step_end(self, stats):
            stats_list.append(stats)

    stats_list = stats
    engine = Engine(model, observers=(Recorder(),))
    engine.generate([[1, 2, 3], [4, 5]], GREEDY)
    first = stats[0]
    assert first.passes[0].phase.value == "prefill"
    assert first.passes[0].useful_tokens == 5 and first.num_running == 2
    assert first.memory.num_rows == 2 and len(first.pass_seconds) == 1
    assert stats[-1].num_finished == 2


def test_hook_on_request_finished(model) -> None:
    finished = []

    class Recorder:
        @hookimpl
        def on_request_finished(self, request):
            finished.append((request.request_id, request.finish_reason))

    engine = Engine(model, observers=(Recorder(),))
    a = engine.add_request([1, 2, 3], GREEDY)
    b = engine.add_request([1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    engine.abort(b.request_id)
    drain(engine)
    assert sorted(finished) == sorted([(a.request_id, FinishReason.LENGTH),
                                       (b.request_id, FinishReason.ABORT)])
