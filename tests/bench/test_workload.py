"""The workload generator: seeded, within its bounds, Poisson arrivals, forced lengths."""

from __future__ import annotations

import statistics

import pytest

from runtime.bench.offline import forced_params
from runtime.bench.workload import (
    FIRST_TOKEN_ID,
    WorkloadError,
    generate_requests,
    load_workload,
    named_workloads,
    parse_workload,
)

ORCA = {
    "name": "orca",
    "seed": 3,
    "num_requests": 400,
    "arrival": {"poisson": 5.0},
    "prompt_len": [32, 512],
    "output_len": [1, 128],
}


def test_same_seed_same_requests_other_seed_differs():
    spec = parse_workload(ORCA)
    assert generate_requests(spec, 1000) == generate_requests(spec, 1000)
    other = parse_workload(ORCA | {"seed": 4})
    assert generate_requests(other, 1000) != generate_requests(spec, 1000)


def test_lengths_and_token_ids_within_bounds():
    reqs = generate_requests(parse_workload(ORCA), 1000)
    assert len(reqs) == 400
    assert all(32 <= r.prompt_len <= 512 and 1 <= r.output_len <= 128 for r in reqs)
    assert all(FIRST_TOKEN_ID <= t < 1000 for r in reqs for t in r.prompt_token_ids)
    # uniform: both halves of each range are hit
    assert min(r.prompt_len for r in reqs) < 100 and max(r.prompt_len for r in reqs) > 450
    assert min(r.output_len for r in reqs) < 20 and max(r.output_len for r in reqs) > 110


def test_poisson_interarrival_mean_is_about_one_over_rate():
    reqs = generate_requests(parse_workload(ORCA | {"num_requests": 2000}), 1000)
    gaps = [b.arrival - a.arrival for a, b in zip(reqs, reqs[1:], strict=False)]
    assert reqs[0].arrival == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 5.0, rel=0.15)


def test_all_at_once_and_overrides():
    spec = parse_workload(ORCA | {"arrival": "all-at-once"})
    assert spec.rate is None
    assert all(r.arrival == 0.0 for r in generate_requests(spec, 1000))
    scaled = parse_workload(ORCA).with_overrides(num_requests=5, all_at_once=True)
    assert scaled.num_requests == 5 and scaled.rate is None
    assert parse_workload(ORCA).with_overrides(rate=2.0).rate == 2.0


def test_mix_classes_both_present_with_their_weights():
    raw = {
        "num_requests": 400,
        "classes": [
            {"weight": 3, "prompt_len": [8, 16], "output_len": [4, 8]},
            {"weight": 1, "prompt_len": [300, 400], "output_len": [50, 60]},
        ],
    }
    reqs = generate_requests(parse_workload(raw), 500)
    short = [r for r in reqs if r.prompt_len <= 16]
    long_ = [r for r in reqs if r.prompt_len >= 300]
    assert len(short) + len(long_) == 400
    assert all(4 <= r.output_len <= 8 for r in short) and all(
        50 <= r.output_len <= 60 for r in long_
    )
    assert 0.65 < len(short) / 400 < 0.85


def test_prompts_cut_to_fit_the_context():
    reqs = generate_requests(parse_workload(ORCA), 1000, max_model_len=200)
    assert all(r.prompt_len + r.output_len <= 200 for r in reqs)


def test_outputs_are_forced_to_their_length():
    params = forced_params(17)
    assert params.max_tokens == 17 and params.ignore_eos and params.temperature == 0.0


@pytest.mark.parametrize(
    "raw, message",
    [
        (ORCA | {"num_requets": 3}, "did you mean 'num_requests'"),
        (ORCA | {"prompt_len": [10, 5]}, "low <= high"),
        (ORCA | {"arrival": {"poisson": 0}}, "arrival"),
        (ORCA | {"num_requests": 0}, "num_requests"),
    ],
)
def test_invalid_workloads_name_the_key(raw, message):
    with pytest.raises(WorkloadError, match=message):
        parse_workload(raw)


def test_named_workloads_load():
    names = named_workloads()
    assert {"smoke", "orca-trace", "short-long-mix"} <= set(names)
    for name in names:
        assert load_workload(name).num_requests >= 1
    orca = load_workload("orca-trace")
    assert (orca.classes[0].prompt_len.low, orca.classes[0].prompt_len.high) == (32, 512)
    assert (orca.classes[0].output_len.low, orca.classes[0].output_len.high) == (1, 128)
    with pytest.raises(WorkloadError, match="unknown workload"):
        load_workload("no-such-workload")
