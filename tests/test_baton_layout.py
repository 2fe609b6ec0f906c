"""BATON's layout pieces on their own: policies, relayouts, and K/V inserted from a prefill worker."""

from __future__ import annotations

import pytest
import torch

from baton_plugin import BatonScheduler
from baton_plugin.attention import prefill_kv
from baton_plugin.cache import BatonCache
from baton_plugin.masks import decode_mask, padding_mask
from baton_plugin.policy import peak_padded_footprint, plan_placement, plan_prefill_groups
from runtime.kv_cache import CacheLimits, ModelShape
from runtime.request import Request
from runtime.sampling_params import SamplingParams
from runtime.testing import Arrival, make_engine, run_alone, run_mix, tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes: OpenMP threads only contend (SDPA 12 ms instead of 10 us on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(seed=7).init_weights(7, std=0.3).to(torch.float64)


def test_peak_padded_footprint_by_hand() -> None:
    assert peak_padded_footprint([]) == 0
    assert peak_padded_footprint([(5, 0)]) == 5
    # (2, 10) alone for steps 1..10 is 12 wide; both rows at t=0 make 2 x 20.
    assert peak_padded_footprint([(20, 0), (2, 10)]) == 40
    # both alive until t=4: 2 x (10 + 4) = 28 beats 1 x (3 + 9) = 12.
    assert peak_padded_footprint([(10, 4), (3, 9)]) == 28


def test_prefill_groups_bound_their_padding() -> None:
    assert plan_prefill_groups([4, 4, 4], 0.0) == [[0, 1, 2]]
    assert plan_prefill_groups([3, 8, 4], 0.0) == [[0], [2], [1]]
    assert plan_prefill_groups([3, 8, 4], 10.0) == [[0, 2, 1]]
    assert plan_prefill_groups([10, 12, 2], 0.25) == [[2], [0, 1]]  # 2x12=24 <= 1.25x22


def test_placement_shifts_before_it_grows() -> None:
    shift = plan_placement(rows=2, width=10, right=1, cap_rows=4, cap_cols=90, max_rows=8)
    assert not shift.reallocate and (shift.rows, shift.columns) == (4, 90)
    assert shift.end == 10 + 79 // 8  # an eighth of the spare on the left
    grow = plan_placement(rows=5, width=30, right=1, cap_rows=4, cap_cols=90, max_rows=6)
    assert grow.reallocate and grow.rows == 6 and grow.columns == 90  # never shrinks
    tight = plan_placement(rows=2, width=60, right=1, cap_rows=4, cap_cols=90, max_rows=8)
    assert tight.reallocate and tight.columns == 61 + 30 + 32  # 29 spare: grow, not shift


def test_padding_mask_is_right_aligned() -> None:
    lengths = torch.tensor([3, 1, 4])
    assert padding_mask(lengths, 4).tolist() == [
        [False, True, True, True],
        [False, False, False, True],
        [True, True, True, True],
    ]
    mask = decode_mask(lengths, 4, torch.float32)
    assert mask.shape == (3, 1, 1, 4)
    assert mask[1, 0, 0, 0] == torch.finfo(torch.float32).min and mask[1, 0, 0, 3] == 0


def test_sliding_window_relayouts_keep_tokens(model) -> None:
    """A stream of short requests: the window slides right, the buffer shifts it back."""
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    arrivals = [Arrival(2 * i, (i + 1, i + 2, i + 3), params) for i in range(36)]
    mixed, engine = run_mix(model, BatonScheduler, arrivals, max_num_seqs=4)
    copies = engine.kv_cache.copies
    assert copies.shifts >= 1 and copies.reallocations <= 2  # the window slid back in place
    assert engine.kv_cache.is_empty()
    # Reference: the per-request default layout, everything at once (rows never interact).
    at_once = [Arrival(0, a.prompt_token_ids, params) for a in arrivals]
    reference, _ = run_mix(model, lambda: None, at_once, max_num_seqs=len(arrivals))
    assert mixed.tokens == reference.tokens


def test_insert_kv_from_a_prefill_worker(model) -> None:
    """The insert path takes K/V as data: prefill elsewhere, embed, decode in one [B, 1] pass."""
    cfg = model.config
    shape = ModelShape(
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.vocab_size,
        256,
    )
    cache = BatonCache(shape, CacheLimits(4, 256, 1024), torch.device("cpu"), torch.float64)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3]]
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=4)) for i, p in enumerate(prompts)]
    for prompt, req in zip(prompts, reqs, strict=True):  # two workers, one request each
        kv, logits = prefill_kv(model, [prompt])
        req.output_token_ids.append(int(logits.argmax()))
        req.num_computed_tokens = len(prompt)
        cache.insert_prefilled([req], kv)
    assert cache.width == 6 and cache.padding_mask().tolist()[0] == [False] * 3 + [True] * 3
    for _ in range(2):
        (batch,) = list(cache.forward_batches(reqs))
        with torch.inference_mode():
            hidden = model(
                batch.input_ids, batch.positions, cache.attention(batch), cache.build_mask(batch)
            )
            logits = model.compute_logits(hidden[:, -1])
        cache.commit(batch)
        for req, row in zip(reqs, logits, strict=True):
            _, full = prefill_kv(model, [req.all_token_ids()])  # recompute from scratch
            torch.testing.assert_close(row, full[0], rtol=1e-9, atol=1e-9)
            req.output_token_ids.append(int(row.argmax()))
            req.num_computed_tokens += 1
    for req in reqs:
        cache.free(req)
    assert cache.is_empty() and cache.width == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda() -> None:
    model = tiny_model(seed=7).init_weights(7, std=0.3).to("cuda", torch.float64)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    arrivals = [
        Arrival(i, tuple(range(1, 3 + 4 * i)), params, 5 if i == 2 else None) for i in range(5)
    ]
    mixed, engine = run_mix(model, BatonScheduler, arrivals, max_num_seqs=3)
    assert engine.kv_cache.k.device.type == "cuda" and engine.kv_cache.is_empty()
    for i, arr in enumerate(arrivals):
        solo = run_alone(model, lambda: None, arr)
        assert mixed.tokens[i] == solo[: len(mixed.tokens[i])]
    engine = make_engine(model, BatonScheduler(), "baton")
    engine.add_request([1, 2, 3], params)
    engine.step()
    assert engine.last_step.memory.allocated_elements > 0
