"""BATON's layout pieces on their own: policies, buckets, rows, window shifts, and K/V
inserted from a prefill worker."""

from __future__ import annotations

import pytest
import torch

from baton_plugin import BatonScheduler
from baton_plugin.attention import prefill_kv
from baton_plugin.buckets import NEW_BUCKET, Bucket, Placement, added_padding, choose_bucket
from baton_plugin.cache import BatonCache, buffer_shape
from baton_plugin.masks import decode_mask, padding_mask
from baton_plugin.policy import peak_padded_footprint
from baton_plugin.rows import RowSpace
from runtime.engine import Engine, EngineLimits
from runtime.kv_cache import CacheLimits, ModelShape, kv_elements_per_token
from runtime.request import Request
from runtime.sampling_params import SamplingParams
from runtime.testing import Arrival, make_engine, run_alone, run_mix, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL_SEED = 7


def request(name: str) -> Request:
    return Request(name, [1], SamplingParams())


def test_peak_padded_footprint_by_hand() -> None:
    assert peak_padded_footprint([]) == 0
    assert peak_padded_footprint([(5, 0)]) == 5
    # (2, 10) alone for steps 1..10 is 12 wide; both rows at t=0 make 2 x 20.
    assert peak_padded_footprint([(20, 0), (2, 10)]) == 40
    # both alive until t=4: 2 x (10 + 4) = 28 beats 1 x (3 + 9) = 12.
    assert peak_padded_footprint([(10, 4), (3, 9)]) == 28


def bucket(first: int, lengths: list[int], start: int = 0) -> Bucket:
    rows = [request(f"r{first}-{i}") for i in range(len(lengths))]
    return Bucket(first, start, start + max(lengths), rows, list(lengths))


def test_newcomers_join_the_bucket_they_pad_least() -> None:
    short, long = bucket(0, [10, 9]), bucket(4, [100, 98])
    assert added_padding(short, 8) == 2 and added_padding(short, 12) == 2 * 2
    assert added_padding(long, 97) == 3 and added_padding(long, 104) == 2 * 4
    assert choose_bucket([], 5, 4, 0.15) == Placement(NEW_BUCKET, 0)
    assert choose_bucket([short, long], 11, 4, 0.15) == Placement(0, 2)
    assert choose_bucket([short, long], 96, 4, 0.15) == Placement(1, 4)
    # 50 pads the long bucket by 50 (short: 2 x 40), more than 15% of its 248 real keys...
    assert choose_bucket([short, long], 50, 4, 0.15).index == NEW_BUCKET
    # ...so a new bucket, unless the limit is reached: then the cheapest anyway
    assert choose_bucket([short, long], 50, 2, 0.15) == Placement(1, 50)
    assert choose_bucket([short, long], 50, 4, 0.25) == Placement(1, 50)


def test_row_space_keeps_each_bucket_contiguous() -> None:
    moves: list[tuple[int, int]] = []

    def move(_bucket, src, dst) -> None:
        moves.append((src, dst))

    space = RowSpace(6)
    a, b = Bucket(), Bucket()
    a.first = space.open(a)
    assert a.first == 3  # the middle of the free rows: room on both sides
    a.rows, a.lengths = [request("a0")], [1]
    b.first = space.open(b)
    assert b.first == 1
    b.rows, b.lengths = [request("b0")], [1]
    assert space.grow(a, move) == 4  # after itself: no move
    a.rows.append(request("a1"))
    a.lengths.append(2)
    assert space.grow(b, move) == 2
    b.rows.append(request("b1"))
    b.lengths.append(2)
    # rows: 0 free, 1-2 b, 3-4 a, 5 free. b grows again: into its free front row
    assert space.grow(b, move) == 0 and b.first == 0
    b.rows.insert(0, request("b2"))
    b.lengths.insert(0, 3)
    # rows: 0-2 b, 3-4 a, 5 free. b grows once more: a moves its first row to row 5
    assert space.grow(b, move) == 3
    assert moves == [(3, 5)] and a.first == 4 and [r.request_id for r in a.rows] == ["a1", "a0"]
    assert space.num_free == 0
    space.release(5)
    assert space.num_free == 1


def test_padding_mask_is_right_aligned() -> None:
    lengths = torch.tensor([3, 1, 4])
    assert padding_mask(lengths, 4).tolist() == [
        [False, True, True, True],
        [False, False, False, True],
        [True, True, True, True],
    ]
    mask = decode_mask([3, 1, 4], 4, torch.float32, torch.device("cpu"))
    assert mask.shape == (3, 1, 1, 4)
    assert mask[1, 0, 0, 0] == torch.finfo(torch.float32).min and mask[1, 0, 0, 3] == 0
    assert decode_mask([4, 4], 4, torch.float32, torch.device("cpu")) is None  # no padding


def test_sliding_windows_shift_inside_the_buffer_and_keep_tokens() -> None:
    """A stream of requests in a short context: windows reach the buffer's edge and shift back
    (the buffer is allocated once, never reallocated), with the tokens unchanged."""
    small = tiny_model(seed=7, max_position_embeddings=24).init_weights(7, std=0.3)
    small = small.to(torch.float64)
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    arrivals = [Arrival(2 * i, (i + 1, i + 2, i + 3), params) for i in range(36)]
    mixed, engine = run_mix(small, lambda: BatonScheduler(max_buckets=1), arrivals,
                            max_num_seqs=4)
    copies = engine.kv_cache.copies
    assert copies.shifts >= 1 and copies.reallocations == 0
    assert engine.kv_cache.is_empty()
    # Reference: the per-request default layout, everything at once (rows never interact).
    at_once = [Arrival(0, a.prompt_token_ids, params) for a in arrivals]
    reference, _ = run_mix(small, lambda: None, at_once, max_num_seqs=len(arrivals))
    assert mixed.tokens == reference.tokens


def test_insert_kv_from_a_prefill_worker(model) -> None:
    """The insert path takes K/V as data: prefill elsewhere, embed, decode in one pass."""
    cfg = model.config
    shape = ModelShape(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                       cfg.head_dim, cfg.vocab_size, 256)
    cache = BatonCache(shape, CacheLimits(4, 256, 1024), torch.device("cpu"), torch.float64,
                       max_buckets=1)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3]]
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=4)) for i, p in enumerate(prompts)]
    for prompt, req in zip(prompts, reqs, strict=True):  # two workers, one request each
        kv, logits = prefill_kv(model, [prompt])
        req.output_token_ids.append(int(logits.argmax()))
        req.num_computed_tokens = len(prompt)
        cache.insert_prefilled([req], kv)
    (only,) = cache.buckets
    assert cache.width == 6 and cache.padding_mask(only).tolist()[0] == [False] * 3 + [True] * 3
    for _ in range(2):
        (batch,) = list(cache.forward_batches(reqs))
        with torch.inference_mode():
            hidden = model(
                batch.input_ids, batch.positions, cache.attention(batch), batch.mask
            )
            logits = model.compute_logits(hidden.index_select(0, batch.sample_indices))
        cache.commit(batch)
        for req, row in zip(batch.sampled_requests, logits, strict=True):
            _, full = prefill_kv(model, [req.all_token_ids()])  # recompute from scratch
            torch.testing.assert_close(row, full[0], rtol=1e-9, atol=1e-9)
            req.output_token_ids.append(int(row.argmax()))
            req.num_computed_tokens += 1
    for req in reqs:
        cache.free(req)
    assert cache.is_empty() and cache.width == 0


def test_prefill_worker_packs_several_prompts_like_one_each(model) -> None:
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3], [1]]
    kv, logits = prefill_kv(model, prompts)
    assert kv.lengths == (3, 6, 1) and kv.width == 6
    for i, prompt in enumerate(prompts):
        one, one_logits = prefill_kv(model, [prompt])
        torch.testing.assert_close(logits[i], one_logits[0], rtol=1e-12, atol=1e-12)
        n = len(prompt)
        torch.testing.assert_close(kv.k[:, i, :, 6 - n :], one.k[:, 0], rtol=1e-12, atol=1e-12)
        assert (kv.k[:, i, :, : 6 - n] == 0).all()  # pad columns are finite zeros


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda() -> None:
    model = tiny_model(seed=7).init_weights(7, std=0.3).to("cuda", torch.float64)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    arrivals = [
        Arrival(i, tuple(range(1, 3 + 4 * i)), params, 5 if i == 2 else None) for i in range(5)
    ]
    for options in ({}, {"newcomer_pass": "separate", "max_buckets": 1}):
        mixed, engine = run_mix(model, lambda o=options: BatonScheduler(**o), arrivals,
                                max_num_seqs=3)
        assert engine.kv_cache.k.device.type == "cuda" and engine.kv_cache.is_empty()
        for i, arr in enumerate(arrivals):
            solo = run_alone(model, lambda: None, arr)
            assert mixed.tokens[i] == solo[: len(mixed.tokens[i])]
    engine = make_engine(model, BatonScheduler(), "baton")
    engine.add_request([1, 2, 3], params)
    engine.step()
    assert engine.last_step.memory.allocated_elements > 0


@pytest.mark.parametrize(("lo", "hi", "new_lo"), [(10, 14, 2), (10, 14, 8), (3, 9, 5), (0, 6, 6)])
def test_window_shift_is_exact_with_and_without_overlap(lo, hi, new_lo) -> None:
    from baton_plugin.embed import shift_window

    cache = torch.arange(2 * 5 * 2 * 16 * 3, dtype=torch.float64).view(2, 5, 2, 16, 3)
    expected = cache[:, 1:4, :, lo:hi].clone()
    scratch = torch.empty(5, 2, 16, 3, dtype=torch.float64)
    shift_window(cache, scratch, slice(1, 4), lo, hi, new_lo)
    assert torch.equal(cache[:, 1:4, :, new_lo : new_lo + hi - lo], expected)


@pytest.mark.parametrize(
    ("limits", "rows", "columns"),
    [(CacheLimits(64, 1024, 65536), 64, 1280),  # kv_cache_tokens given: slack on top
     (CacheLimits(64, 100, 6400), 64, 132),
     (CacheLimits(64, 1024, 65536, None, 10**6), 64, 1280),  # memory has room for the slack
     (CacheLimits(64, 1024, 65536, None, 70000), 64, 1075),  # the slack shrinks first
     (CacheLimits(64, 1024, 46603, None, 46603), 43, 1066)],  # then a row goes
)
def test_buffer_shape_stays_within_the_memory_budget(limits, rows, columns) -> None:
    layers = 30
    assert buffer_shape(limits, 64, layers) == (rows, columns)
    if limits.kv_memory_tokens is not None:  # keys, values and one layer of scratch
        assert rows * columns * (2 * layers + 1) <= limits.kv_memory_tokens * 2 * layers
        assert columns >= limits.max_model_len + 32


def test_engine_keeps_batons_buffer_within_kv_cache_memory() -> None:
    """A memory budget bounds what BATON allocates (slack columns and scratch included), and
    the requests it then runs with fewer rows get their solo tokens."""
    model = tiny_model(MODEL_SEED)
    per_token_bytes = kv_elements_per_token(Engine(model).shape) * 8  # float64
    budget = 3 * 72 * per_token_bytes
    engine = Engine(model, None, BatonScheduler(), "baton",
                    EngineLimits(max_num_seqs=8, max_model_len=64, kv_cache_memory=f"{budget}B"))
    cache = engine.kv_cache
    assert cache.max_rows == 2 and cache.columns >= 64 + 8
    allocated = cache.k.nbytes + cache.v.nbytes + cache.scratch.nbytes
    assert allocated <= budget
    assert cache.memory_stats().allocated_elements * 8 == allocated
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    reqs = [engine.add_request([(7 * i + j) % 50 + 1 for j in range(5 + 9 * i)], params)
            for i in range(4)]
    while engine.has_unfinished():
        engine.step()
    for req in reqs:
        solo = make_engine(model, BatonScheduler(), "baton")
        alone = solo.add_request(list(req.prompt_token_ids), params)
        while solo.has_unfinished():
            solo.step()
        assert req.output_token_ids == alone.output_token_ids
