"""KV capacity from a memory budget (as vLLM sizes its cache), in tokens and GiB."""

import logging

import pytest
import torch

from runtime.engine import Engine, EngineLimits
from runtime.kv_cache import kv_elements_per_token
from runtime.kv_sizing import DEFAULT_FRACTION, kv_capacity, parse_kv_memory
from runtime.testing import tiny_model

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("text", "fraction", "num_bytes"),
    [("auto", DEFAULT_FRACTION, None), ("0.25", 0.25, None), (0.5, 0.5, None), ("1", 1.0, None),
     ("4GiB", None, 4 * 2**30), ("512MiB", None, 512 * 2**20), ("2gb", None, 2 * 10**9),
     ("1.5 GiB", None, int(1.5 * 2**30))],
)
def test_parse_budget(text, fraction, num_bytes) -> None:
    budget = parse_kv_memory(text)
    assert (budget.fraction, budget.num_bytes) == (fraction, num_bytes)


@pytest.mark.parametrize("bad", ["", "lots", "4", "0", "-1GiB", "3 parsecs", "1.2"])
def test_bad_budget_names_the_key(bad) -> None:
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_kv_memory(bad)


def test_capacity_is_budget_over_bytes_per_token() -> None:
    cap = kv_capacity(1000, max_num_seqs=64, max_model_len=10**6, tokens=None, memory="1MiB",
                      device=CPU, available=10**12)
    assert cap.tokens == 2**20 // 1000
    cap = kv_capacity(1000, 64, 10**6, None, "0.5", CPU, available=4_000_000)
    assert cap.tokens == 2000 and "50% of available memory" in cap.reason
    assert cap.gib == pytest.approx(2000 * 1000 / 2**30)


def test_capacity_is_capped_and_tokens_override() -> None:
    cap = kv_capacity(10, 4, 100, None, "1GiB", CPU, available=10**12)
    assert cap.tokens == 400 and "capped" in cap.reason
    assert kv_capacity(10, 4, 100, 123, "1GiB", CPU).tokens == 123


def test_budget_too_small_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="holds no token"):
        kv_capacity(10_000, 4, 100, None, "1KiB", CPU, available=10**9)


def test_engine_sizes_its_cache_from_memory_and_logs_it(caplog) -> None:
    model = tiny_model()
    per_token = kv_elements_per_token(Engine(model).shape) * 8  # float64
    with caplog.at_level(logging.INFO, logger="runtime.model_runner"):
        engine = Engine(model, limits=EngineLimits(max_num_seqs=1000, kv_cache_memory="64KiB"))
    assert engine.limits.kv_cache_tokens == 64 * 1024 // per_token
    assert engine.kv_cache.kv_cache_tokens == engine.limits.kv_cache_tokens
    assert "KV cache capacity" in caplog.text and "GiB" in caplog.text


def test_admission_is_bounded_by_kv_memory() -> None:
    """With room for about two requests' tokens, the default FCFS admits two of eight."""
    from runtime.sampling_params import SamplingParams

    model = tiny_model()
    per_token = kv_elements_per_token(Engine(model).shape) * 8
    engine = Engine(model, limits=EngineLimits(max_num_seqs=8,
                                               kv_cache_memory=f"{per_token * 50}B"))
    for _ in range(8):
        engine.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 6
    while engine.has_unfinished():
        engine.step()
    assert engine.kv_cache.is_empty()
