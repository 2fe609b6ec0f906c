"""BATON: each request's tokens equal its solo tokens under dynamic re-batching, no leaks,
exact idle-computation counters, one batched attention call per layer per decode step."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from baton_plugin import BatonScheduler
from baton_plugin.cache import BatonCache
from runtime import hookimpl
from runtime.bench.metrics import StepRecorder
from runtime.engine import Engine
from runtime.kv_cache import PassStats, Phase
from runtime.request import FinishReason
from runtime.sampling_params import SamplingParams
from runtime.testing import (
    Arrival,
    drain,
    greedy,
    make_engine,
    random_arrivals,
    run_alone,
    run_mix,
)
from tests.conftest import BACKENDS

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL_SEED = 5


def solo(model, prompt, params) -> list[int]:
    """Reference tokens from the built-in per-request layout, run alone (independent code)."""
    engine = make_engine(model, None, "runtime-default")
    req = engine.add_request(list(prompt), params)
    while engine.has_unfinished():
        engine.step()
    return req.output_token_ids


def baton_engine(model, max_num_seqs: int = 4, attention_backend: str = "auto",
                 **options) -> Engine:
    return make_engine(model, BatonScheduler(**options), "baton", max_num_seqs=max_num_seqs,
                       attention_backend=attention_backend)


def assert_empty(engine: Engine) -> None:
    cache: BatonCache = engine.kv_cache
    assert cache.is_empty(), cache.memory_stats()
    assert cache.num_rows == 0 and cache.width == 0 and not cache.pending


OPTION_SETS = {
    "fused-buckets": {},
    "separate-buckets": {"newcomer_pass": "separate"},
    "fused-one-bucket": {"max_buckets": 1},
    "separate-one-bucket": {"newcomer_pass": "separate", "max_buckets": 1},
    "strict-buckets-small-prefill": {"max_buckets": 3, "bucket_pad_tolerance": 0.0,
                                     "max_prefill_tokens": 10},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize(("seed", "max_num_seqs"), [(0, 4), (1, 3), (2, 5), (3, 2), (4, 8)])
def test_random_mixes_match_solo(model, native_kernel, options: dict, seed: int,
                                 max_num_seqs: int, backend: str) -> None:
    arrivals = random_arrivals(
        seed,
        num_requests=12,
        vocab_size=128,
        prompt_len=(1, 20),
        max_tokens=(1, 9),
        max_arrival_step=10,
        abort_fraction=0.25,
    )
    mixed, engine = run_mix(
        model, lambda: BatonScheduler(**options), arrivals, max_num_seqs=max_num_seqs,
        attention_backend=backend,
    )
    assert_empty(engine)
    for i, arr in enumerate(arrivals):
        ref = solo(model, arr.prompt_token_ids, arr.params)
        got = mixed.tokens[i]
        if mixed.reasons[i] is FinishReason.ABORT:
            assert got == ref[: len(got)], f"request {i} (aborted)"
        else:
            assert got == ref, f"request {i}: {got} != solo {ref}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_pad_columns_never_read_uninitialised_memory(model, native_kernel, options: dict,
                                                     backend: str) -> None:
    """The buffer starts as NaN: a pad column the layout forgot to zero poisons the output."""

    class Poisoned(BatonScheduler):
        @hookimpl
        def make_kv_cache(self, shape, limits, device, dtype):
            cache = super().make_kv_cache(shape, limits, device, dtype)
            cache.k.fill_(float("nan"))
            cache.v.fill_(float("nan"))
            return cache

    arrivals = random_arrivals(11, num_requests=14, vocab_size=128, prompt_len=(1, 24),
                               max_tokens=(2, 10), max_arrival_step=12, abort_fraction=0.2)
    mixed, engine = run_mix(model, lambda: Poisoned(**options), arrivals, max_num_seqs=5,
                            attention_backend=backend)
    assert_empty(engine)
    for i, arr in enumerate(arrivals):
        ref = solo(model, arr.prompt_token_ids, arr.params)
        assert mixed.tokens[i] == ref[: len(mixed.tokens[i])], f"request {i}"


def test_insert_shorter_equal_and_longer_than_batch(model) -> None:
    engine = baton_engine(model, max_num_seqs=5, max_buckets=1)
    cache: BatonCache = engine.kv_cache
    first = engine.add_request(list(range(3, 9)), greedy(12))
    engine.step()
    engine.step()
    width = cache.width  # 6 prompt keys + 1 decoded (the fused pass decodes from step 2)
    assert width == 7
    prompts = [list(range(10, 10 + n)) for n in (width - 3, width + 1, width + 5)]
    reqs = [engine.add_request(p, greedy(5)) for p in prompts]
    engine.step()  # one fused pass: the first row decodes, the three newcomers prefill
    (bucket,) = cache.buckets
    assert sorted(bucket.lengths) == [4, 8, 8, 12]  # shorter, equal, longer than the batch
    assert cache.width == 12  # the longer one padded the batch on the left
    assert [p.phase for p in engine.last_step.passes] == [Phase.MIXED]
    drain(engine)
    assert_empty(engine)
    assert first.output_token_ids == solo(model, range(3, 9), greedy(12))
    for req, prompt in zip(reqs, prompts, strict=True):
        assert req.output_token_ids == solo(model, prompt, greedy(5))


def test_separate_pass_newcomers_decode_in_their_own_step(model) -> None:
    engine = baton_engine(model, newcomer_pass="separate")
    a = engine.add_request([5, 6, 7], greedy(6))
    engine.step()
    assert [p.phase for p in engine.last_step.passes] == [Phase.PREFILL, Phase.DECODE]
    assert len(a.output_token_ids) == 2  # first token from the prefill, second from the decode
    b = engine.add_request([9] * 7, greedy(6))
    engine.step()
    decode = engine.last_step.passes[1]
    assert decode.phase is Phase.DECODE and decode.num_requests == 2
    assert len(b.output_token_ids) == 2 and len(a.output_token_ids) == 3


def test_fused_pass_is_one_pass_per_step(model) -> None:
    engine = baton_engine(model)
    a = engine.add_request([5, 6, 7], greedy(6))
    engine.step()
    assert [p.phase for p in engine.last_step.passes] == [Phase.PREFILL]
    b = engine.add_request([9] * 7, greedy(6))
    engine.step()
    (mixed,) = engine.last_step.passes
    assert mixed.phase is Phase.MIXED and mixed.num_requests == 2
    assert mixed.useful_tokens == mixed.computed_tokens == 1 + 7  # packed: no pad token
    assert len(b.output_token_ids) == 1 and len(a.output_token_ids) == 2
    engine.step()
    assert [p.phase for p in engine.last_step.passes] == [Phase.DECODE]


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_finishing_in_prefill_and_batch_emptying_and_refilling(model, options) -> None:
    engine = baton_engine(model, **options)
    a = engine.add_request([1, 2, 3, 4], greedy(4))
    engine.step()
    one = engine.add_request([7] * 9, greedy(1))  # finishes in its own prefill
    engine.step()
    assert one.finish_reason is FinishReason.LENGTH and engine.kv_cache.num_rows == 1
    drain(engine)
    assert_empty(engine)
    c = engine.add_request([3, 1, 4, 1, 5], greedy(3))  # refill the emptied batch
    d = engine.add_request([2, 7], greedy(4))
    drain(engine)
    assert_empty(engine)
    for req in (a, one, c, d):
        assert req.output_token_ids == solo(model, req.prompt_token_ids, req.params)


def test_everything_finishing_in_the_same_step(model) -> None:
    engine = baton_engine(model)
    reqs = [engine.add_request(list(range(1, n)), greedy(4)) for n in (3, 9, 5)]
    for _ in range(4):
        engine.step()
    assert engine.last_step.num_finished == 3 and not engine.running
    assert_empty(engine)
    for req in reqs:
        assert req.output_token_ids == solo(model, req.prompt_token_ids, req.params)


def test_abort_of_the_longest_row_trims_its_padding(model) -> None:
    engine = baton_engine(model, max_buckets=1)
    long = engine.add_request(list(range(1, 21)), greedy(10))
    short = engine.add_request([4, 5, 6], greedy(8))
    engine.step()
    engine.step()
    assert engine.kv_cache.width == 21
    engine.abort(long.request_id)
    engine.step()
    assert long.finish_reason is FinishReason.ABORT
    cache: BatonCache = engine.kv_cache
    assert cache.width == 5  # 3 prompt keys + 2 decoded: the long padding is gone
    assert cache.padding_mask(cache.buckets[0]).all()
    drain(engine)
    assert_empty(engine)
    assert short.output_token_ids == solo(model, [4, 5, 6], greedy(8))


def test_buckets_bound_the_padding_of_mixed_lengths(model) -> None:
    """Short and long prompts land in separate dense buckets; one bucket pads the short ones."""
    prompts = [list(range(1, n + 1)) for n in (3, 40, 4, 42, 3, 41)]

    def idle_decode_pairs(**options) -> tuple[float, int]:
        engine = baton_engine(model, max_num_seqs=6, attention_backend="sdpa", **options)
        for p in prompts:
            engine.add_request(p, greedy(4))
        engine.step()
        engine.step()
        (decode,) = engine.last_step.passes
        buckets = len(engine.kv_cache.buckets)
        drain(engine)
        assert_empty(engine)
        idle = decode.computed_attention_pairs - decode.useful_attention_pairs
        return idle / decode.computed_attention_pairs, buckets

    one_idle, one_buckets = idle_decode_pairs(max_buckets=1)
    many_idle, many_buckets = idle_decode_pairs(max_buckets=4)
    assert one_buckets == 1 and one_idle > 0.4
    assert many_buckets == 2 and many_idle < 0.05


def test_seeded_sampling_is_independent_of_the_batch(model) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=1234, ignore_eos=True)
    prompt = [8, 3, 9, 1]
    alone = run_alone(model, BatonScheduler, Arrival(0, tuple(prompt), params))
    engine = baton_engine(model)
    others = [
        engine.add_request(
            [i + 1] * (3 * i + 2),
            SamplingParams(max_tokens=5, temperature=1.0, seed=i, ignore_eos=True),
        )
        for i in range(2)
    ]
    engine.step()
    req = engine.add_request(prompt, params)
    drain(engine)
    assert req.output_token_ids == alone
    assert all(len(o.output_token_ids) == 5 for o in others)


def test_idle_counters_match_a_hand_computed_case(model) -> None:
    """SDPA attends each bucket's whole window, pad columns included (masked)."""
    recorder = StepRecorder()
    engine = make_engine(model, BatonScheduler(), "baton", observers=(recorder,),
                         attention_backend="sdpa")
    engine.add_request([1, 2, 3], greedy(3))
    passes: list[PassStats] = []
    engine.step()
    passes += engine.last_step.passes
    engine.add_request([4, 5, 6, 7, 8], greedy(3))
    engine.step()
    passes += engine.last_step.passes
    mem = engine.last_step.memory
    engine.step()
    passes += engine.last_step.passes
    engine.step()
    passes += engine.last_step.passes
    P, M, D = Phase.PREFILL, Phase.MIXED, Phase.DECODE
    assert passes == [
        PassStats(P, 1, 3, 3, 6, 6),  # prompt of 3, causal: the kernel skips the upper triangle
        PassStats(M, 2, 6, 6, 4 + 15, 4 + 15),  # A decodes over its 4 keys; B's prompt of 5
        PassStats(D, 2, 2, 2, 5 + 6, 2 * 6),  # B joined A's bucket: A has one pad column
        PassStats(D, 1, 1, 1, 7, 7),  # A left and its pad column was trimmed
    ]
    per_token = 2 * 2 * 2 * 8  # k+v, 2 layers, 2 KV heads, head_dim 8
    assert (mem.used_tokens, mem.reserved_tokens, mem.num_rows) == (9, 10, 2)
    assert mem.used_elements == 9 * per_token and mem.allocated_elements >= mem.used_elements
    totals = [sum(getattr(p, key) for p in recorder.passes)
              for key in ("useful_tokens", "computed_tokens", "useful_pairs", "computed_pairs")]
    assert totals == [12, 12, 43, 44]  # what a benchmark's StepRecorder sums
    assert_empty(engine)


P_, M_, D_ = Phase.PREFILL, Phase.MIXED, Phase.DECODE
HAND_TRACES = {
    # fused, shared bucket: as the test above
    "fused": ({}, [(P_, 1, 3, 3, 6, 6), (M_, 2, 6, 6, 19, 19), (D_, 2, 2, 2, 11, 12),
                   (D_, 1, 1, 1, 7, 7)]),
    # separate: a prefill pass, then a decode pass that already includes the newcomer
    "separate": ({"newcomer_pass": "separate"},
                 [(P_, 1, 3, 3, 6, 6), (D_, 1, 1, 1, 4, 4), (P_, 1, 5, 5, 15, 15),
                  (D_, 2, 2, 2, 11, 12), (D_, 1, 1, 1, 7, 7)]),
    # no pad tolerated: B opens its own bucket, two SDPA calls, no pad column at all
    "strict buckets": ({"bucket_pad_tolerance": 0.0},
                       [(P_, 1, 3, 3, 6, 6), (M_, 2, 6, 6, 19, 19), (D_, 2, 2, 2, 11, 11),
                        (D_, 1, 1, 1, 7, 7)]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", HAND_TRACES.values(), ids=HAND_TRACES.keys())
def test_passes_and_pad_columns_of_each_option_on_a_hand_built_trace(model, native_kernel, case,
                                                                     backend: str) -> None:
    """The same passes under both backends; the native kernel reads no pad column (computed
    pairs = useful pairs), SDPA attends the padded window."""
    options, expected = case
    if backend == "native":
        expected = [(*p[:5], p[4]) for p in expected]
    engine = make_engine(model, BatonScheduler(**options), "baton", attention_backend=backend)
    a = engine.add_request([1, 2, 3], greedy(3))
    passes: list[PassStats] = []
    step = 0
    while engine.has_unfinished():
        step += 1
        if step == 2:
            engine.add_request([4, 5, 6, 7, 8], greedy(3))
        engine.step()
        passes += engine.last_step.passes
    assert passes == [PassStats(*p) for p in expected]
    assert a.output_token_ids == solo(model, [1, 2, 3], greedy(3))
    assert_empty(engine)


def test_newcomers_are_prefilled_packed_without_padding(model) -> None:
    engine = baton_engine(model)
    engine.add_request([1, 2], greedy(2))
    engine.add_request([3, 4, 5, 6], greedy(2))
    engine.step()
    engine.step()
    assert [p for s in (engine.last_step,) for p in s.passes] == [
        PassStats(Phase.DECODE, 2, 2, 2, 3 + 5, 3 + 5),  # two buckets: no pad column at all
    ]
    assert_empty(engine)


@pytest.mark.parametrize("max_buckets", [1, 4])
def test_decode_is_one_batched_attention_call_per_bucket_and_layer(model, monkeypatch,
                                                                   max_buckets) -> None:
    engine = baton_engine(model, max_buckets=max_buckets, attention_backend="sdpa")
    for n in (2, 6, 11):
        engine.add_request(list(range(1, n + 1)), greedy(5))
    engine.step()  # the prefill pass
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    engine.step()
    assert [p.phase for p in engine.last_step.passes] == [Phase.DECODE]
    layers = model.config.num_hidden_layers
    buckets = len(engine.kv_cache.buckets)
    assert len(calls) == layers * buckets  # no per-request loop
    if max_buckets == 1:
        assert all(q == (3, 4, 1, 8) and k == (3, 2, 12, 8) for q, k in calls)
    else:
        assert buckets == 3 and sum(q[0] for q, _ in calls) == 3 * layers


def test_admission_joins_a_running_batch_without_draining(model) -> None:
    engine = baton_engine(model, max_num_seqs=3)
    reqs = [engine.add_request([i + 1] * 4, greedy(3 if i == 0 else 8)) for i in range(4)]
    engine.step()
    assert len(engine.running) == 3 and len(engine.waiting) == 1
    engine.step()
    engine.step()  # the first request finishes (3 tokens)
    assert reqs[0].finish_reason is FinishReason.LENGTH and reqs[3] in engine.waiting
    engine.step()  # the fourth joins as soon as a row is free, while the others still decode
    assert reqs[3] in engine.running and len(reqs[1].output_token_ids) == 4
    drain(engine)
    assert_empty(engine)


def test_admission_counts_the_padded_footprint(model) -> None:
    # rows (keys cached after prefill, further keys): short (2, 3), long (18, 1). Real tokens
    # peak at 5 + 19 = 24, but the dense cache holds 2 x 19 = 38 token slots.
    engine = make_engine(model, BatonScheduler(kv_cache_tokens=30), "baton")
    short = engine.add_request([1, 2], greedy(4))
    long = engine.add_request(list(range(1, 19)), greedy(2))
    engine.step()
    assert engine.running == [short] and engine.waiting[0] is long
    drain(engine)
    assert long.output_token_ids == solo(model, long.prompt_token_ids, long.params)


def test_padded_footprint_never_exceeds_the_budget(model) -> None:
    budget = 60
    arrivals = random_arrivals(
        9,
        num_requests=12,
        vocab_size=128,
        prompt_len=(1, 16),
        max_tokens=(1, 8),
        max_arrival_step=6,
    )
    peaks = []

    class Recording(BatonScheduler):
        @hookimpl
        def make_kv_cache(self, shape, limits, device, dtype):
            cache = super().make_kv_cache(shape, limits, device, dtype)
            commit = cache.commit
            cache.commit = lambda b: (commit(b), peaks.append(cache.num_rows * cache.width))
            return cache

    mixed, _ = run_mix(model, lambda: Recording(kv_cache_tokens=budget), arrivals, max_num_seqs=6)
    assert peaks and max(peaks) <= budget
    assert all(r is FinishReason.LENGTH for r in mixed.reasons.values())


def test_a_failing_prefill_pass_fails_only_its_requests(model, monkeypatch) -> None:
    """Separate passes: a failing prefill fails the newcomers; the batch keeps decoding."""
    engine = baton_engine(model, newcomer_pass="separate")
    ok = engine.add_request([1, 2, 3], greedy(5))
    engine.step()
    bad = engine.add_request([4, 5, 6, 7], greedy(5))
    forward = model.forward

    def failing(input_ids, *args):
        if input_ids.numel() > 1:
            raise RuntimeError("boom")
        return forward(input_ids, *args)

    monkeypatch.setattr(model, "forward", failing)
    engine.step()
    monkeypatch.setattr(model, "forward", forward)
    assert bad.finish_reason is FinishReason.ERROR and not engine.kv_cache.pending
    drain(engine)
    assert_empty(engine)
    assert ok.output_token_ids == solo(model, [1, 2, 3], greedy(5))


def test_a_failing_fused_pass_fails_its_requests_and_the_engine_goes_on(model,
                                                                         monkeypatch) -> None:
    """Fused passes: the requests of a failing pass fail (as in Orca's packed iteration),
    nothing leaks, and the next requests run normally."""
    engine = baton_engine(model)
    first = engine.add_request([1, 2, 3], greedy(5))
    engine.step()
    newcomer = engine.add_request([4, 5, 6, 7], greedy(5))
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.step()
    monkeypatch.setattr(model, "forward", forward)
    assert first.finish_reason is newcomer.finish_reason is FinishReason.ERROR
    assert "boom" in first.error
    assert_empty(engine)
    after = engine.add_request([8, 9], greedy(4))
    drain(engine)
    assert after.output_token_ids == solo(model, [8, 9], greedy(4))


def test_aborts_in_the_middle_of_a_bucketed_batch_leak_nothing(model) -> None:
    engine = baton_engine(model, max_num_seqs=8, bucket_pad_tolerance=0.0)
    prompts = [[1] * 3, [2] * 3, [3] * 3, [4] * 12, [5] * 12, [6] * 12, [7] * 25, [8] * 25]
    reqs = [engine.add_request(p, greedy(8)) for p in prompts]
    engine.step()
    engine.step()
    cache: BatonCache = engine.kv_cache
    assert len(cache.buckets) == 3
    for victim in (reqs[1], reqs[4], reqs[6]):  # one row inside each bucket
        engine.abort(victim.request_id)
    engine.step()
    assert cache.num_rows == 5 and sum(b.num_rows for b in cache.buckets) == 5
    owned = [r for r, o in enumerate(cache.space.owner) if o is not None]
    assert len(owned) == 5
    drain(engine)
    assert_empty(engine)
    assert cache.space.num_free == cache.max_rows
    for req in reqs:
        ref = solo(model, req.prompt_token_ids, greedy(8))
        assert req.output_token_ids == ref[: len(req.output_token_ids)]


@pytest.mark.parametrize("max_buckets", [1, 4])
def test_native_decode_is_one_kernel_call_per_layer_over_real_keys(model, native_kernel,
                                                                   monkeypatch,
                                                                   max_buckets) -> None:
    """With the decode kernel, every bucket's rows go in ONE call per layer, each row reading
    exactly its real keys (the last `length` columns of its window), and no SDPA runs."""
    engine = baton_engine(model, max_buckets=max_buckets, attention_backend="native")
    for n in (2, 6, 11):
        engine.add_request(list(range(1, n + 1)), greedy(5))
    engine.step()  # the prefill pass
    kernel = engine.kv_cache.decode_kernel
    calls = []

    def counting(q, k, v, offsets, counts, *rest):
        calls.append((tuple(q.shape), counts.tolist()))
        return kernel(q, k, v, offsets, counts, *rest)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called for a decode step")

    engine.kv_cache.decode_kernel = counting
    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    engine.step()
    assert [p.phase for p in engine.last_step.passes] == [Phase.DECODE]
    layers = model.config.num_hidden_layers
    assert len(calls) == layers
    assert all(q == (3, 4, 8) and sorted(c) == [3, 7, 12] for q, c in calls)
    stats = engine.last_step.passes[0]
    assert stats.computed_attention_pairs == stats.useful_attention_pairs == 3 + 7 + 12
