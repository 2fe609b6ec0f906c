"""Orca: tokens equal solo runs under mixed iterations and aborts, Algorithm 1's break, no leaks."""

from __future__ import annotations

import pytest
import torch

from orca_plugin import OrcaScheduler
from orca_plugin.attention import (
    FusedAttention,
    KernelAttention,
    LoopAttention,
    VariantChooser,
)
from orca_plugin.cache import split_iteration
from orca_plugin.groups import DecodeGroup, plan_groups
from orca_plugin.masks import build_orca_mask, decode_padding_mask
from orca_plugin.scheduler import select_batch
from orca_plugin.slots import SlotAllocator
from runtime import hookimpl
from runtime.api import CAUSAL, Segment
from runtime.bench.metrics import StepRecorder
from runtime.engine import Engine, EngineLimits
from runtime.kv_cache import Phase
from runtime.plugins import instantiate_scheduler
from runtime.request import FinishReason, Request
from runtime.scheduling import StepStats
from runtime.testing import (
    Arrival,
    check_scheduling_invariance,
    drain,
    greedy,
    random_arrivals,
    run_alone,
    tiny_model,
)
from tests.conftest import BACKENDS

MODES = ("fused", "loop")
ALL_MODES = ("auto", "fused", "loop")


MODEL_SEED = 5  # the tiny model: float64, 4 heads over 2 KV heads (GQA group 2)


def engine_for(model, scheduler: object, max_num_seqs: int = 4, observers=(),
               attention_backend: str = "auto") -> Engine:
    return Engine(
        model, None, scheduler, "orca", EngineLimits(max_num_seqs=max_num_seqs), observers=observers,
        attention_backend=attention_backend,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokens_equal_solo_under_mixed_iterations_and_aborts(model, native_kernel, mode: str,
                                                             seed: int, backend: str) -> None:
    recorder = StepRecorder()  # a single request alone never mixes: any mixed pass is batched
    arrivals = random_arrivals(
        seed,
        num_requests=10,
        vocab_size=128,
        prompt_len=(1, 20),
        max_tokens=(1, 9),
        max_arrival_step=8,
        abort_fraction=0.25,
    )
    check_scheduling_invariance(model, lambda: OrcaScheduler(attention=mode), arrivals,
                                max_num_seqs=5, observers=(recorder,), attention_backend=backend)
    assert any(p.phase == "mixed" for p in recorder.passes), "no iteration mixed both kinds"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokens_equal_solo_with_iterations_split_over_passes(model, native_kernel, seed: int,
                                                             backend: str) -> None:
    """`max_pass_tokens` cuts an iteration into several passes; each request's greedy tokens
    stay those of its solo run (float64), under random arrivals and aborts."""
    recorder = _Recorder()
    arrivals = random_arrivals(seed, num_requests=10, vocab_size=128, prompt_len=(1, 20),
                               max_tokens=(1, 9), max_arrival_step=8, abort_fraction=0.25)
    check_scheduling_invariance(model, lambda: OrcaScheduler(max_pass_tokens=12), arrivals,
                                max_num_seqs=5, observers=(recorder,), attention_backend=backend)
    assert max(len(step.passes) for step in recorder.steps) > 1, "no iteration was split"
    passes = [p for step in recorder.steps for p in step.passes]
    assert all(p.computed_tokens <= 12 or p.num_requests == 1 for p in passes)


class _Running:
    """A stand-in request with `n` pending tokens (split_iteration reads nothing else)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def pending_token_ids(self) -> list[int]:
        return [0] * self.n


def test_split_iteration_packs_initiations_behind_the_decode_rows() -> None:
    d1, d2, p5, p6, p9, p30 = (_Running(n) for n in (1, 1, 5, 6, 9, 30))
    running = [p5, d1, p6, d2, p9, p30]
    assert split_iteration(running, None) == [running]
    assert split_iteration(running, 12) == [[d1, d2, p5], [p6], [p9], [p30]]
    assert split_iteration(running, 13) == [[d1, d2, p5, p6], [p9], [p30]]
    assert split_iteration(running, 22) == [[d1, d2, p5, p6, p9], [p30]]
    assert split_iteration([p30, p5], 8) == [[p30], [p5]]  # no decode rows: no empty pass
    assert split_iteration([d1, d2], 1) == [[d1, d2]]  # decode rows always share one pass
    assert split_iteration([], 8) == []


def test_a_split_iteration_runs_every_request_once_and_accounts_every_pass(model) -> None:
    """Hand-built: two decode rows and prompts of 6 and 8 tokens under max_pass_tokens=9
    make one mixed pass (2 + 6 tokens) and one prefill pass (8); the Orca step info adds
    the second pass to the decode rows' wait."""
    recorder = _Recorder()
    engine = engine_for(model, OrcaScheduler(max_pass_tokens=9), observers=(recorder,))
    engine.add_request(list(range(1, 5)), greedy(10))
    engine.add_request(list(range(1, 4)), greedy(10))
    engine.step()
    assert [p.computed_tokens for p in recorder.steps[-1].passes] == [7]
    engine.add_request(list(range(1, 7)), greedy(4))
    engine.add_request(list(range(1, 9)), greedy(4))
    engine.step()
    step = recorder.steps[-1]
    assert [(p.phase, p.computed_tokens) for p in step.passes] == [
        (Phase.MIXED, 2 + 6), (Phase.PREFILL, 8)]
    info = step.extra["orca"]
    assert info["num_passes"] == 2 and info["num_tokens"] == 16
    assert info["num_initiation_tokens"] == 14 and info["num_decode_requests"] == 2
    assert info["num_initiation_requests"] == 2
    assert info["prompt_wait_s"] >= step.pass_seconds[1] > 0
    assert all(len(r.output_token_ids) == 1 for r in engine.running[2:])
    assert all(len(r.output_token_ids) == 2 for r in engine.running[:2])


def test_fused_groups_of_several_widths_keep_tokens(model, monkeypatch) -> None:
    """With a tiny per-group overhead the decode rows split into many padded groups."""
    sizes: list[int] = []

    def many_groups(lengths):
        groups = plan_groups(lengths, overhead=2)
        sizes.append(len(groups))
        return groups

    monkeypatch.setattr("orca_plugin.cache.plan_groups", many_groups)
    arrivals = random_arrivals(
        4,
        num_requests=8,
        vocab_size=128,
        prompt_len=(1, 30),
        max_tokens=(2, 8),
        max_arrival_step=3,
        abort_fraction=0.2,
    )
    check_scheduling_invariance(
        model, lambda: OrcaScheduler(attention="fused"), arrivals, max_num_seqs=6,
        attention_backend="sdpa",  # padded groups are SDPA's; the kernel reads rows in place
    )
    assert max(sizes) >= 3


def test_plan_groups_trades_padding_for_calls() -> None:
    lengths = [3, 4, 5, 40, 41, 42]
    assert plan_groups(lengths, overhead=1000) == (DecodeGroup(0, 6, 42),)
    assert plan_groups(lengths, overhead=10) == (DecodeGroup(0, 3, 5), DecodeGroup(3, 3, 42))
    assert sum(g.num_keys for g in plan_groups(lengths, overhead=0)) == sum(lengths)
    with pytest.raises(ValueError, match="sorted"):
        plan_groups([5, 3])


def test_solo_tokens_equal_the_runtime_default_layout(model) -> None:
    arrival = Arrival(0, tuple(range(3, 20)), greedy(8))
    reference = run_alone(model, lambda: None, arrival)
    for mode in MODES:
        assert run_alone(model, lambda m=mode: OrcaScheduler(attention=m), arrival) == reference


def drain_recording_handles(engine: Engine, cache) -> list[type]:
    """Run `engine` to the end, returning the type of every attention handle its passes used."""
    original, used = cache.attention, []

    def recording(batch):
        handle = original(batch)
        used.append(type(handle))
        return handle

    cache.attention = recording
    drain(engine)
    return used


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_one_decode_row_takes_the_kernel_unless_literal(model, native_kernel, mode: str,
                                                        backend: str) -> None:
    """A lone request's increments run in the decode kernel (one call a layer, its keys read
    in place) wherever the batched variants would, with the tokens of the default layout; the
    literal loop keeps its per-request call, and without the kernel one row is not gathered."""
    scheduler = OrcaScheduler(attention=mode)
    engine = engine_for(model, scheduler, attention_backend=backend)
    request = engine.add_request(list(range(3, 20)), greedy(8))
    engine.step()  # the initiation
    used = drain_recording_handles(engine, scheduler.cache)
    kernel = backend == "native" and mode != "loop"
    assert len(used) == 7 and set(used) == {KernelAttention if kernel else LoopAttention}
    arrival = Arrival(0, tuple(range(3, 20)), greedy(8))
    assert request.output_token_ids == run_alone(model, lambda: None, arrival)


class _UnmaskedFused(OrcaScheduler):
    """Broken on purpose: the fused decode group's padded keys are not hidden."""

    @hookimpl
    def build_attention_mask(self, batch, kv_cache):
        mask = batch.mask
        return type(mask)(mask.segments, tuple(torch.zeros_like(m) for m in mask.decode))


def test_invariance_check_catches_unmasked_decode_padding(model) -> None:
    arrivals = [Arrival(0, tuple(range(1, 30)), greedy(6)), Arrival(0, (7, 8), greedy(6))]
    with pytest.raises(AssertionError, match="batched"):
        check_scheduling_invariance(model, _UnmaskedFused, arrivals, attention_backend="sdpa")


def test_select_batch_breaks_at_the_first_misfit() -> None:
    big = Request("big", [1] * 20, greedy(10), arrival_time=1.0)  # reserves 30
    small = Request("small", [1] * 3, greedy(2), arrival_time=2.0)  # reserves 5
    first = Request("first", [1] * 5, greedy(5), arrival_time=0.0)  # reserves 10
    assert select_batch([big, small, first], 0, 8, 40, 256) == (first, big)
    assert select_batch([big, small], 1, 8, 29, 256) == ()  # break: small fits, but waits
    assert select_batch([big, small], 1, 2, 100, 256) == (big,)  # max_batch_size counts running
    assert select_batch([big, small], 0, 8, 10, 256) == (big,)  # larger than the budget: alone


def test_admission_waits_behind_a_misfit_and_slots_return(model) -> None:
    sched = OrcaScheduler(kv_cache_tokens=60)
    engine = engine_for(model, sched)
    a = engine.add_request(list(range(1, 21)), greedy(20))  # 40 slots
    b = engine.add_request(list(range(1, 21)), greedy(10))  # 30 slots: 70 > 60
    c = engine.add_request(list(range(1, 6)), greedy(5))  # 10 slots: would fit, must wait
    engine.step()
    assert engine.running == [a] and list(engine.waiting) == [b, c]
    assert engine.kv_cache.memory_stats().reserved_tokens == 40
    while a.finish_reason is None:
        assert list(engine.waiting) == [b, c]  # c fits, but waits behind b
        engine.step()
    engine.step()  # a's slots came back at its finish: b and c join together
    assert set(engine.running) == {b, c}
    assert engine.kv_cache.memory_stats().reserved_tokens == 40
    drain(engine)
    assert engine.kv_cache.is_empty()
    assert engine.kv_cache.kv_free_tokens() == 60


def test_abort_returns_slots_at_once(model) -> None:
    engine = engine_for(model, OrcaScheduler(kv_cache_tokens=60))
    a = engine.add_request(list(range(1, 21)), greedy(30))  # 50 slots
    b = engine.add_request(list(range(1, 11)), greedy(10))  # 20 slots: waits
    engine.step()
    engine.step()
    assert list(engine.waiting) == [b]
    engine.abort(a.request_id)
    engine.step()  # the abort frees a's 50 slots before admission
    assert a.finish_reason is FinishReason.ABORT and engine.running == [b]
    assert engine.kv_cache.memory_stats().reserved_tokens == 20
    drain(engine)
    assert engine.kv_cache.is_empty() and engine.kv_cache.pool_tokens == 60


@pytest.mark.parametrize("mode", MODES)
def test_fragmented_pool_compacts_and_keeps_tokens(model, mode: str) -> None:
    prompts = {
        "a": (list(range(1, 16)), 5),
        "b": (list(range(2, 12)), 2),
        "c": (list(range(3, 18)), 5),
        "d": (list(range(5, 19)), 6),
    }
    engine = engine_for(model, OrcaScheduler(kv_cache_tokens=64, attention=mode))
    reqs = {k: engine.add_request(p, greedy(n)) for k, (p, n) in list(prompts.items())[:3]}
    engine.step()  # a [0, 20), b [20, 32), c [32, 52): b finishes first and leaves a hole
    engine.step()
    assert reqs["b"].finish_reason is FinishReason.LENGTH
    reqs["d"] = engine.add_request(prompts["d"][0], greedy(prompts["d"][1]))  # 20 slots
    engine.step()  # 24 slots free, but in two holes of 12: the pool compacts, c moves down
    assert engine.kv_cache.slots.ranges[reqs["c"]].start == 20
    drain(engine)
    assert engine.kv_cache.is_empty()
    for key, (prompt, n) in prompts.items():
        solo = run_alone(
            model, lambda: OrcaScheduler(attention=mode), Arrival(0, tuple(prompt), greedy(n))
        )
        assert reqs[key].output_token_ids == solo, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_measures_the_loop_only_without_the_kernel(model, native_kernel,
                                                        backend: str) -> None:
    """With the decode kernel, `auto` runs every decode iteration in it and never probes the
    loop (the kernel reads the same slot ranges in fewer calls, and a probe costs a slow
    iteration); without it, `auto` still measures the gather against the loop."""
    scheduler = OrcaScheduler(attention="auto")
    engine = engine_for(model, scheduler, attention_backend=backend)
    requests = [engine.add_request(list(range(1, n)), greedy(24)) for n in (5, 9, 13)]
    engine.step()  # the initiations
    cache = scheduler.cache
    used = drain_recording_handles(engine, cache)
    if backend == "native":
        assert set(used) == {KernelAttention} and cache.chooser.num_choices == 0
        assert cache.chooser.samples["fused"]  # its times are still kept
    else:
        assert {FusedAttention, LoopAttention} <= set(used) and cache.chooser.num_choices > 0
    for request in requests:
        arrival = Arrival(0, tuple(request.prompt_token_ids), greedy(24))
        assert request.output_token_ids == run_alone(model, lambda: None, arrival)


def test_auto_tries_both_variants_then_keeps_the_faster() -> None:
    chooser = VariantChooser(probe_every=4, window=3, warmup=1, clear_margin=float("inf"))
    assert chooser.choose() == "fused"  # each variant is measured first
    chooser.record("fused", 0.010, 10)  # 1 ms per decode row
    assert chooser.choose() == "loop"
    chooser.record("loop", 0.030, 10)  # 3 ms per decode row
    picks = [chooser.choose() for _ in range(8)]  # choices 3 to 10
    assert picks == ["fused", "loop", "fused", "fused", "fused", "loop", "fused", "fused"]
    chooser.record("fused", 0.010, 10)
    chooser.record("fused", 0.500, 10)  # one stall does not move the median
    assert chooser.choose() == "fused"
    for _ in range(2):
        chooser.record("fused", 0.050, 10)  # the machine got busy: fused is now slower
    assert chooser.cost("fused") == 0.005 and chooser.choose() == "fused"  # choice 12: a probe
    assert chooser.choose() == "loop"


def test_auto_probes_a_clearly_slower_variant_less_and_less_often() -> None:
    """While the slower variant stays 1.5x the faster one, each probe doubles the wait for the
    next (up to the cap); once the two come close, probing is back to every `probe_every`."""
    chooser = VariantChooser(probe_every=4, window=3, warmup=1, max_probe_every=16)
    assert chooser.choose() == "fused"
    chooser.record("fused", 0.010, 10)
    assert chooser.choose() == "loop"
    chooser.record("loop", 0.030, 10)  # 3x the fused cost
    probes = [n for n in range(3, 61) if chooser.choose() == "loop"]
    assert probes == [4, 12, 28, 44, 60]
    for _ in range(3):
        chooser.record("loop", 0.012, 10)  # now 1.2x: no longer clearly slower
    probes = [n for n in range(61, 90) if chooser.choose() == "loop"]
    assert probes == [76, 80, 84, 88]


def test_slot_allocator_first_fit_and_compaction() -> None:
    slots = SlotAllocator(capacity=10)
    for key, size in (("a", 3), ("b", 3), ("c", 3)):
        slots.place(key, slots.find(size), size)
    slots.release("b")
    assert slots.find(3) == 3 and slots.find(4) is None
    moves = slots.compact()
    assert [(k, old.start, new.start) for k, old, new in moves] == [("c", 6, 3)]
    assert slots.find(4) == 6 and slots.reserved == 6
    assert slots.release("b") is None  # idempotent


class _Recorder:
    """An observer registered after the scheduler: it must already see Orca's extra."""

    def __init__(self) -> None:
        self.steps: list[StepStats] = []

    @hookimpl
    def on_step_end(self, stats: StepStats) -> None:
        self.steps.append(stats)
        assert "orca" in stats.extra


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_accounting_of_a_mixed_iteration(model, native_kernel, mode: str, backend: str) -> None:
    recorder = _Recorder()
    engine = engine_for(model, OrcaScheduler(attention=mode), observers=(recorder,),
                        attention_backend=backend)
    engine.add_request(list(range(1, 5)), greedy(10))  # 4-token prompt
    engine.add_request(list(range(1, 9)), greedy(10))  # 8-token prompt
    engine.step()
    engine.step()  # contexts now 5 and 9 after this iteration's writes
    engine.add_request(list(range(1, 4)), greedy(4))  # a 3-token initiation joins
    engine.step()
    stats = recorder.steps[-1].passes[0]
    assert stats.phase is Phase.MIXED
    assert stats.useful_tokens == stats.computed_tokens == 1 + 1 + 3
    assert stats.useful_attention_pairs == 6 + 10 + 6
    # fused SDPA pads both decode rows to 10 keys; the kernel and the loop read real keys only
    padded = 2 * 10 if (mode, backend) == ("fused", "sdpa") else 6 + 10
    assert stats.computed_attention_pairs == padded + 6
    info = recorder.steps[-1].extra["orca"]
    assert info["num_initiation_tokens"] == 3 and info["num_decode_tokens"] == 2
    assert info["num_decode_requests"] == 2 and info["prompt_wait_s"] > 0
    memory = recorder.steps[-1].memory
    assert memory.reserved_tokens == 14 + 18 + 7
    assert memory.used_tokens == 6 + 10 + 3
    assert memory.allocated_elements == memory.reserved_tokens * 2 * 2 * 2 * 8


def test_masks_causal_within_each_request() -> None:
    segments = [Segment(0, 1, 6), Segment(1, 4, 0), Segment(5, 2, 3)]
    mask = build_orca_mask(segments, None, 0, torch.float32, torch.device("cpu"))
    assert mask.segments[0] is None and mask.segments[1] is CAUSAL
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask.segments[2], expected)
    pad = decode_padding_mask(torch.tensor([2, 3]), 3, torch.float32)
    assert pad.shape == (2, 1, 1, 3)
    assert pad[0, 0, 0, 2] == torch.finfo(torch.float32).min and pad[1].eq(0).all()


def test_options_are_validated_and_selectable_by_name() -> None:
    with pytest.raises(ValueError, match="attention"):
        OrcaScheduler(attention="flash")
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        OrcaScheduler(kv_cache_tokens=0)
    with pytest.raises(ValueError, match="max_pass_tokens"):
        OrcaScheduler(max_pass_tokens=0)
    assert OrcaScheduler(max_pass_tokens=None).max_pass_tokens is None
    with pytest.warns(FutureWarning, match="'kv_slots' is now called 'kv_cache_tokens'"):
        assert OrcaScheduler(kv_slots=48).kv_cache_tokens == 48
    sched = instantiate_scheduler("orca", {"attention": "loop", "max_batch_size": 2})
    assert isinstance(sched, OrcaScheduler) and sched.attention == "loop"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_runs_on_cuda(mode: str) -> None:
    gpu_model = tiny_model(seed=5).to("cuda")
    arrivals = random_arrivals(
        3,
        num_requests=6,
        vocab_size=128,
        prompt_len=(1, 20),
        max_tokens=(1, 8),
        max_arrival_step=4,
        abort_fraction=0.2,
    )
    check_scheduling_invariance(
        gpu_model, lambda: OrcaScheduler(attention=mode), arrivals, max_num_seqs=4
    )


def test_worked_example_of_the_docs(model) -> None:
    """docs/orca.md section 2: D fits at iteration 2 but waits behind C; iteration 5 is mixed."""
    engine = engine_for(model, OrcaScheduler(kv_cache_tokens=32, max_batch_size=3), max_num_seqs=8)
    for name, (prompt_len, n) in {"A": (6, 4), "B": (12, 8), "C": (3, 3)}.items():
        engine.add_request(list(range(1, prompt_len + 1)), greedy(n), request_id=name)
    rows = []
    while engine.has_unfinished():
        if engine.num_steps == 1:
            engine.add_request([1, 2], greedy(2), request_id="D")
        engine.step()
        lay = engine.kv_cache.last_layout
        rows.append(
            (
                engine.last_step.passes[0].phase.value,
                [(s.length, s.past) for s in lay.segments],
                engine.last_step.memory.reserved_tokens,
                [r.request_id for r in engine.waiting],
            )
        )
    assert rows == [
        ("prefill", [(6, 0), (12, 0)], 30, ["C"]),
        ("decode", [(1, 6), (1, 12)], 30, ["C", "D"]),
        ("decode", [(1, 7), (1, 13)], 30, ["C", "D"]),
        ("decode", [(1, 8), (1, 14)], 20, ["C", "D"]),
        ("mixed", [(1, 15), (3, 0), (2, 0)], 30, []),
        ("decode", [(1, 2), (1, 3), (1, 16)], 26, []),
        ("decode", [(1, 4), (1, 17)], 20, []),
        ("decode", [(1, 18)], 0, []),
    ]
