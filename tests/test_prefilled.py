"""Requests prefilled elsewhere (`Engine.add_prefilled`): same tokens, no prompt pass here."""

from __future__ import annotations

import random

import pytest
import torch

from baton_plugin import BatonScheduler
from orca_plugin import OrcaScheduler
from runtime import hookimpl
from runtime.kv_cache import Phase
from runtime.prefill import prefill_kv
from runtime.request import FinishReason
from runtime.sampling_params import SamplingParams
from runtime.scheduling import SchedulerError
from runtime.testing import check_no_leak, drain, greedy, make_engine

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL_SEED = 3


class PhaseCounter:
    """Counts the engine's forward passes by phase."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []

    @hookimpl
    def on_step_end(self, stats) -> None:
        self.phases.extend(p.phase for p in stats.passes)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(128) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def run(model, params: list[SamplingParams], items: list[list[int]], prefilled: bool,
        stagger: bool = True) -> tuple[list[list[int]], PhaseCounter]:
    """Each request joins one step after the previous (a running batch), locally or prefilled."""
    counter = PhaseCounter()
    engine = make_engine(model, BatonScheduler(), "baton", max_num_seqs=4,
                         observers=(counter,))
    reqs = []
    for prompt, sp in zip(items, params, strict=True):
        if prefilled:
            req = engine.make_request(prompt, sp)
            kv, logits = prefill_kv(model, [prompt])
            reqs.append(engine.add_prefilled(req, kv, logits))
        else:
            reqs.append(engine.add_request(prompt, sp))
        if stagger:
            engine.step()
    drain(engine)
    check_no_leak(engine)
    assert all(r.finish_reason is FinishReason.LENGTH for r in reqs), [r.error for r in reqs]
    return [r.output_token_ids for r in reqs], counter


def test_prefilled_greedy_tokens_equal_local_prefill(model) -> None:
    items = prompts(7)
    params = [greedy(random.Random(i).randint(1, 12)) for i in range(len(items))]
    local, local_phases = run(model, params, items, prefilled=False)
    remote, remote_phases = run(model, params, items, prefilled=True)
    assert remote == local
    assert any(p is not Phase.DECODE for p in local_phases.phases)
    assert remote_phases.phases and set(remote_phases.phases) == {Phase.DECODE}, \
        "a prefilled request must not run a prompt pass on the decode engine"


def test_prefilled_seeded_sampling_follows_the_request_seed(model) -> None:
    items = prompts(4, seed=1)
    params = [SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=40 + i,
                             ignore_eos=True) for i in range(len(items))]
    local, _ = run(model, params, items, prefilled=False)
    remote, _ = run(model, params, items, prefilled=True)
    assert remote == local


def test_one_token_request_finishes_at_insertion(model) -> None:
    engine = make_engine(model, BatonScheduler(), "baton")
    prompt = prompts(1, seed=2)[0]
    req = engine.make_request(prompt, greedy(1))
    engine.add_prefilled(req, *prefill_kv(model, [prompt]))
    drain(engine)
    check_no_leak(engine)
    assert req.finish_reason is FinishReason.LENGTH and len(req.output_token_ids) == 1


def test_aborted_while_waiting_drops_its_payload(model) -> None:
    engine = make_engine(model, BatonScheduler(), "baton", max_num_seqs=1)
    items = prompts(2, seed=3)
    first = engine.add_request(items[0], greedy(20))
    engine.step()  # the only row is taken: the prefilled one waits
    req = engine.make_request(items[1], greedy(5))
    engine.add_prefilled(req, *prefill_kv(model, [items[1]]))
    engine.step()
    engine.abort(req.request_id)
    drain(engine)
    check_no_leak(engine)
    assert req.finish_reason is FinishReason.ABORT and not engine._prefilled
    assert first.finish_reason is FinishReason.LENGTH


def test_a_layout_without_insert_prefilled_refuses_naming_the_scheduler(model) -> None:
    engine = make_engine(model, OrcaScheduler(), "orca")
    assert not engine.accepts_prefilled
    prompt = prompts(1)[0]
    req = engine.make_request(prompt, greedy(2))
    with pytest.raises(SchedulerError, match="scheduler 'orca' cannot take prefilled K/V"):
        engine.add_prefilled(req, *prefill_kv(model, [prompt]))


def test_a_payload_that_does_not_fit_the_prompt_is_refused(model) -> None:
    engine = make_engine(model, BatonScheduler(), "baton")
    items = prompts(2, seed=4)
    req = engine.make_request(items[0], greedy(2))
    with pytest.raises(ValueError, match="do not fit"):
        engine.add_prefilled(req, *prefill_kv(model, [items[1] + [1]]))


def test_prefill_kv_matches_the_baton_prefill_of_several_prompts(model) -> None:
    """Several prompts in one packed pass give each one's own K/V and logits."""
    items = prompts(3, seed=5)
    kv, logits = prefill_kv(model, items)
    for i, prompt in enumerate(items):
        one, one_logits = prefill_kv(model, [prompt])
        n = len(prompt)
        torch.testing.assert_close(kv.k[:, i, :, kv.width - n:], one.k[:, 0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(kv.v[:, i, :, kv.width - n:], one.v[:, 0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(logits[i], one_logits[0], rtol=1e-9, atol=1e-9)


def test_a_float32_prefill_worker_attends_through_the_engines_prompt_kernel() -> None:
    """Given the engine's kernels, `prefill_kv` attends float32 prompts through the prompt
    kernel, as the engine's own prompt pass does, and its K/V and logits stay within float32
    rounding of SDPA's."""
    from runtime.attention_kernels import NativeKernelUnavailable, load_native_kernel
    from runtime.testing import tiny_model

    try:
        kernel = load_native_kernel()
    except NativeKernelUnavailable as exc:
        pytest.skip(f"native kernels unavailable: {exc}")
    model = tiny_model(seed=MODEL_SEED, dtype=torch.float32, hidden_size=96,
                       num_attention_heads=6, intermediate_size=128)  # head size 16
    q = torch.empty(1, 6, 16)
    if not kernel.attends_prompts(q, q):
        pytest.skip("the prompt kernel needs AVX2 and FMA")
    items = prompts(3, seed=5)
    calls = []
    original = kernel.prompts
    kernel.prompts = lambda *a: calls.append(1) or original(*a)
    try:
        kv, logits = prefill_kv(model, items, kernel)
    finally:
        del kernel.prompts
    assert calls  # one call per prompt and layer
    sdpa_kv, sdpa_logits = prefill_kv(model, items)
    torch.testing.assert_close(kv.k, sdpa_kv.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, sdpa_logits, rtol=1e-4, atol=1e-4)
