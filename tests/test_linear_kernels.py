"""oneDNN prepacked linears: same tokens as `F.linear`, exact unpacking, float64 untouched."""

import pytest
import torch

from runtime.architectures import build_model
from runtime.engine import Engine
from runtime.linear_kernels import (
    apply_linear_backend,
    choose_linear_backend,
    model_linears,
    onednn_packing_supported,
    pack_linears,
    unpack_linears,
)
from runtime.model_config import ModelConfig
from runtime.sampling_params import SamplingParams
from runtime.testing import tiny_model

FP32_PACKING = onednn_packing_supported(torch.float32, torch.device("cpu"))
needs_onednn = pytest.mark.skipif(not FP32_PACKING, reason="oneDNN cannot pack float32 here")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def small_model(dtype=torch.float32, tied=True, architecture="LlamaForCausalLM", seed=0):
    cfg = ModelConfig(architecture, vocab_size=96, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                      max_position_embeddings=128, tie_word_embeddings=tied, qkv_bias=True)
    return build_model(cfg).init_weights(seed, std=0.3).to(dtype).eval().requires_grad_(False)


def prompts():
    return [[(5 * i + 3 * j) % 96 for j in range(3 + 4 * i)] for i in range(5)]


def test_float64_always_runs_plain() -> None:
    model = tiny_model()
    assert choose_linear_backend(model, "auto").backend == "torch"
    with pytest.raises(ValueError, match="cannot pack"):
        choose_linear_backend(model, "onednn")
    Engine(model)
    assert all(m.packed is None for m in model_linears(model))


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="linear_backend"):
        choose_linear_backend(small_model(), "mkl-magic")


@needs_onednn
@pytest.mark.parametrize("tied", [True, False])
def test_unpack_restores_the_exact_weights(tied: bool) -> None:
    model = small_model(tied=tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra = pack_linears(model)
    assert all(m.packed is not None for m in model_linears(model))
    assert pack_linears(model) == 0  # idempotent
    head = model.lm_head.weight
    assert extra == (head.numel() * 4 if tied else 0)  # only a shared weight costs memory
    assert model.model.layers[0].mlp.down_proj.weight.numel() == 0  # dense copy freed
    unpack_linears(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@needs_onednn
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_packed_logits_match_plain(architecture: str) -> None:
    model = small_model(architecture=architecture)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    from runtime.architectures import CausalSelfAttention

    with torch.inference_mode():
        plain = model.compute_logits(model(ids, torch.arange(6)[None], CausalSelfAttention()))
        pack_linears(model)
        packed = model.compute_logits(model(ids, torch.arange(6)[None], CausalSelfAttention()))
    assert (packed - plain).abs().max() <= 1e-4 * plain.abs().max()


@needs_onednn
@pytest.mark.parametrize("scheduler", ["baton", "orca", "static"])
def test_engine_tokens_equal_with_and_without_packing(scheduler: str) -> None:
    from runtime.plugins import instantiate_scheduler

    def run(backend: str) -> list[list[int]]:
        model = small_model(seed=3)
        engine = Engine(model, None, instantiate_scheduler(scheduler, {}), scheduler,
                        linear_backend=backend)
        assert engine.runner.linear_kernels.backend == backend
        return [r.output_token_ids for r in engine.generate(prompts(), GREEDY)]

    assert run("onednn") == run("torch")


@needs_onednn
def test_auto_logs_its_choice(caplog) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="runtime.linear_kernels"):
        choice = apply_linear_backend(small_model(), "auto")
    assert choice.backend in ("torch", "onednn") and "probe" in choice.reason
    assert "linear kernels" in caplog.text


def test_bfloat16_logits_within_tolerance_of_float32() -> None:
    """bf16 (packed where this CPU can, else plain) stays close to float32 logits."""
    ref_model = small_model(torch.float32)
    bf_model = small_model(torch.bfloat16)
    apply_linear_backend(bf_model, "auto")
    from runtime.architectures import CausalSelfAttention

    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    pos = torch.arange(6)[None]
    with torch.inference_mode():
        ref = ref_model.compute_logits(ref_model(ids, pos, CausalSelfAttention()))
        out = bf_model.compute_logits(bf_model(ids, pos, CausalSelfAttention())).float()
    # bf16 keeps 8 mantissa bits: logits within 5% of their range after two layers
    assert (out - ref).abs().max() <= 0.05 * (ref.max() - ref.min())
