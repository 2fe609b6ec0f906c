"""`kv_cache_dtype`: keys and values stored in 16 bits under a float32 (or float64) model.

Every built-in layout stores K/V as the layout's `kv_dtype` and attends in the model's dtype
(SDPA over widened keys, or the decode kernel reading the 16-bit keys in place). The KV budget
then holds twice the tokens, each request still gets its solo tokens whatever the batch, and
the logits stay within bfloat16's rounding of the full-precision cache's.
"""

from __future__ import annotations

import pytest
import torch

from runtime.config import ConfigError, RuntimeConfig, build_config
from runtime.engine import Engine, EngineLimits
from runtime.model_runner import resolve_kv_dtype
from runtime.plugins import load_scheduler_class
from runtime.sampling_params import SamplingParams
from runtime.testing import check_scheduling_invariance, make_engine, random_arrivals, tiny_model

MODEL_SEED = 3
PROMPT = [5, 9, 17, 3, 44, 2, 8, 61, 30]


@pytest.mark.parametrize(("setting", "model_dtype", "want"), [
    ("auto", torch.float32, torch.float32),
    ("auto", torch.bfloat16, torch.bfloat16),
    ("bfloat16", torch.float32, torch.bfloat16),
    ("float16", torch.float32, torch.float16),
    ("bfloat16", torch.float64, torch.bfloat16),
    ("bfloat16", torch.bfloat16, torch.bfloat16),
])
def test_the_cache_dtype_resolves_against_the_models(setting, model_dtype, want) -> None:
    assert resolve_kv_dtype(setting, model_dtype) == want


def test_a_16_bit_model_cannot_store_another_16_bit_dtype() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype: float16 under a bfloat16 model"):
        resolve_kv_dtype("float16", torch.bfloat16)


def test_config_validates_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        RuntimeConfig(kv_cache_dtype="int8")
    path = tmp_path / "c.yaml"
    path.write_text("kv_cache_dtype: bfloat16\n")
    assert build_config(path).kv_cache_dtype == "bfloat16"
    assert build_config(path, {"kv_cache_dtype": "float16"}).kv_cache_dtype == "float16"


def test_a_memory_budget_holds_twice_the_tokens_in_16_bits() -> None:
    model = tiny_model(seed=MODEL_SEED, dtype=torch.float32)
    per_token = 2 * 2 * 2 * 8  # K and V x layers x KV heads x head_dim
    tokens = {}
    for setting in ("auto", "bfloat16"):
        engine = Engine(model, None, None, "default",
                        EngineLimits(max_num_seqs=64, kv_cache_memory="64KiB",
                                     kv_cache_dtype=setting))
        tokens[setting] = engine.limits.kv_cache_tokens
        assert engine.kv_cache.kv_dtype == (torch.float32 if setting == "auto" else torch.bfloat16)
    assert tokens["auto"] == 64 * 1024 // (per_token * 4)
    assert tokens["bfloat16"] == 2 * tokens["auto"]


def _factory(name: str | None, options: dict | None = None):
    if name is None:
        return lambda: None
    cls = load_scheduler_class(name)
    return lambda: cls(**(options or {}))


def _storage(engine: Engine) -> list[torch.Tensor]:
    """The tensors each built-in layout keeps keys and values in."""
    cache = engine.kv_cache
    for attr in ("pool", "k"):  # Orca's pool; BATON's and the static batch's buffers
        if getattr(cache, attr, None) is not None:
            return [getattr(cache, attr), *([cache.v] if attr == "k" else [])]
    return list(cache._slabs.values())  # the runtime default's per-request slabs


LAYOUTS = [
    pytest.param("baton", {}, id="baton"),
    pytest.param("orca", {"attention": "loop"}, id="orca-loop"),
    pytest.param("orca", {"attention": "fused"}, id="orca-fused"),
    pytest.param("static", {}, id="static"),
    pytest.param(None, {}, id="runtime-default"),
]


@pytest.mark.usefixtures("native_kernel")
@pytest.mark.parametrize("backend", ["native", "sdpa"])
@pytest.mark.parametrize(("name", "options"), LAYOUTS)
def test_every_layout_stores_16_bit_kv_and_keeps_solo_tokens(name, options, backend) -> None:
    """float64 model, bfloat16 cache: each request's greedy tokens under random arrivals and
    aborts equal its solo run's, and nothing leaks."""
    model = tiny_model(seed=MODEL_SEED)
    factory = _factory(name, options)
    engine = make_engine(model, factory(), kv_cache_dtype="bfloat16", attention_backend=backend)
    engine.add_request(PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    assert {t.dtype for t in _storage(engine)} == {torch.bfloat16}
    arrivals = random_arrivals(1, num_requests=9, vocab_size=128, prompt_len=(1, 24),
                               max_tokens=(1, 10), max_arrival_step=8, abort_fraction=0.2)
    check_scheduling_invariance(model, factory, arrivals, max_num_seqs=4,
                                kv_cache_dtype="bfloat16", attention_backend=backend)


def _logits_per_step(model: torch.nn.Module, name: str | None, kv_cache_dtype: str
                     ) -> tuple[list[int], list[torch.Tensor]]:
    """A solo request's greedy tokens and the logits each pass computed for it."""
    seen: list[torch.Tensor] = []
    compute = model.compute_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(compute(hidden).detach().clone())
        return seen[-1]

    model.compute_logits = recording
    try:
        engine = make_engine(model, _factory(name)(), kv_cache_dtype=kv_cache_dtype)
        req = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0,
                                                       ignore_eos=True))[0]
    finally:
        del model.compute_logits
    return req.output_token_ids, seen


@pytest.mark.parametrize("name", ["baton", "orca", None])
def test_16_bit_kv_logits_stay_within_its_rounding(name) -> None:
    """float32 model: while the tokens agree, every step's logits are within 3% (bfloat16,
    8 significant bits: 0.4% per stored value, compounded over the steps of this sharp model)
    or 0.5% (float16, 11 bits) of the largest logit from the float32 cache's, and float16 at
    least 4x closer than bfloat16 (measured: 2.1% and 0.16%; the 3 more bits give 8x)."""
    model = tiny_model(seed=MODEL_SEED, dtype=torch.float32)
    tokens, full = _logits_per_step(model, name, "auto")
    scale = max(step.abs().max().item() for step in full)
    errors = {}
    for setting in ("bfloat16", "float16"):
        got_tokens, got = _logits_per_step(model, name, setting)
        agree = next((i for i, (a, b) in enumerate(zip(tokens, got_tokens, strict=True))
                      if a != b), len(tokens))
        assert agree >= 2, f"{setting}: tokens {got_tokens} against {tokens}"
        errors[setting] = max((a - b).abs().max().item()
                              for a, b in zip(full[: agree + 1], got[: agree + 1], strict=True))
        bound = {"bfloat16": 0.03, "float16": 0.005}[setting] * scale
        assert errors[setting] <= bound, (setting, errors[setting], scale)
    assert errors["float16"] * 4 < errors["bfloat16"]
