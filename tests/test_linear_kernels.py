"""Prepacked linears (oneDNN, MKL, the engine's own sgemm): same tokens as `F.linear`, exact unpacking, float64
untouched, and the startup probe's choice."""

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
    packing_supported,
    unpack_linears,
)
from runtime.model_config import ModelConfig
from runtime.sampling_params import SamplingParams
from runtime.testing import tiny_model

CPU = torch.device("cpu")
FP32_PACKING = onednn_packing_supported(torch.float32, CPU)
needs_onednn = pytest.mark.skipif(not FP32_PACKING, reason="oneDNN cannot pack float32 here")
PACKED = [pytest.param(b, marks=pytest.mark.skipif(
    not packing_supported(b, torch.float32, CPU), reason=f"{b} cannot pack float32 here"))
    for b in ("onednn", "mkl", "native")]
needs_native = pytest.mark.skipif(not packing_supported("native", torch.float32, CPU),
                                  reason="the engine's sgemm needs AVX2 and FMA")
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
    for backend in ("onednn", "mkl", "native"):
        with pytest.raises(ValueError, match=f"linear_backend {backend}: .* cannot pack"):
            choose_linear_backend(model, backend)
    Engine(model)
    assert all(m.packed is None for m in model_linears(model))


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="linear_backend"):
        choose_linear_backend(small_model(), "mkl-magic")


@pytest.mark.parametrize("backend", PACKED)
@pytest.mark.parametrize("tied", [True, False])
def test_unpack_restores_the_exact_weights(tied: bool, backend: str) -> None:
    model = small_model(tied=tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra = pack_linears(model, backend)
    assert all(m.packed is not None and m.packed_by == backend for m in model_linears(model))
    assert pack_linears(model, backend) == 0  # idempotent
    head = model.lm_head.weight
    assert extra == (head.numel() * 4 if tied else 0)  # only a shared weight costs memory
    assert model.model.layers[0].mlp.down_proj.weight.numel() == 0  # dense copy freed
    unpack_linears(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("backend", PACKED)
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_packed_logits_match_plain(architecture: str, backend: str) -> None:
    model = small_model(architecture=architecture)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    from runtime.architectures import CausalSelfAttention

    with torch.inference_mode():
        plain = model.compute_logits(model(ids, torch.arange(6)[None], CausalSelfAttention()))
        pack_linears(model, backend)
        packed = model.compute_logits(model(ids, torch.arange(6)[None], CausalSelfAttention()))
    assert (packed - plain).abs().max() <= 1e-4 * plain.abs().max()


@pytest.mark.parametrize("backend", PACKED)
@pytest.mark.parametrize("scheduler", ["baton", "orca", "static"])
def test_engine_tokens_equal_with_and_without_packing(scheduler: str, backend: str) -> None:
    from runtime.plugins import instantiate_scheduler

    def run(backend: str) -> list[list[int]]:
        model = small_model(seed=3)
        engine = Engine(model, None, instantiate_scheduler(scheduler, {}), scheduler,
                        linear_backend=backend)
        assert engine.runner.linear_kernels.backend == backend
        return [r.output_token_ids for r in engine.generate(prompts(), GREEDY)]

    assert run(backend) == run("torch")


@pytest.mark.skipif(not all(packing_supported(b, torch.float32, CPU) for b in ("onednn", "mkl")),
                    reason="needs both packed kernels")
def test_repacking_for_the_other_kernel_goes_through_the_dense_weights() -> None:
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    from runtime.architectures import CausalSelfAttention

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return model.compute_logits(model(ids, torch.arange(6)[None], CausalSelfAttention()))

    plain = logits()
    pack_linears(model, "onednn")
    pack_linears(model, "mkl")
    assert {m.packed_by for m in model_linears(model)} == {"mkl"}
    assert (logits() - plain).abs().max() <= 1e-4 * plain.abs().max()
    if packing_supported("native", torch.float32, CPU):
        pack_linears(model, "native")
        assert {m.packed_by for m in model_linears(model)} == {"native"}
        assert (logits() - plain).abs().max() <= 1e-4 * plain.abs().max()
    unpack_linears(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auto_takes_the_fastest_measured_kernel(monkeypatch) -> None:
    """The probe's figures decide: the fastest packed kernel if it beats `F.linear` by 5%."""
    import runtime.linear_kernels as lk

    monkeypatch.setattr(lk, "packing_supported", lambda backend, dtype, device: True)
    monkeypatch.setattr(lk, "_PROBE_CACHE", {})
    for speedups, want in (({"onednn": 1.3, "mkl": 1.6}, "mkl"),
                           ({"onednn": 1.3, "mkl": 0.9}, "onednn"),
                           ({"onednn": 1.02, "mkl": 1.04}, "torch")):
        monkeypatch.setattr(lk, "probe_speedups", lambda model, backends, rounds=5, s=speedups: s)
        lk._PROBE_CACHE.clear()
        choice = choose_linear_backend(small_model(), "auto")
        assert choice.backend == want, (speedups, choice)
        assert "onednn" in choice.reason and "mkl" in choice.reason


def test_a_close_first_probe_is_measured_again_over_more_rounds(monkeypatch) -> None:
    """1.10x then 0.95x: the longer second probe decides (plain `F.linear`); 1.6x is clear."""
    import runtime.linear_kernels as lk

    monkeypatch.setattr(lk, "packing_supported", lambda backend, dtype, device: True)
    for first, second, want, probes in ((1.10, 0.95, "torch", 2), (1.6, None, "mkl", 1)):
        calls = []

        def probe(model, backends, rounds=lk.PROBE_ROUNDS, first=first, second=second,
                  calls=calls):
            calls.append(rounds)
            return {"onednn": 0.9, "mkl": first if len(calls) == 1 else second}

        monkeypatch.setattr(lk, "probe_speedups", probe)
        lk._PROBE_CACHE.clear()
        assert choose_linear_backend(small_model(), "auto").backend == want
        assert len(calls) == probes and calls[-1] == (3 if probes == 2 else 1) * lk.PROBE_ROUNDS


def test_probe_times_one_linear_per_shape_weighted_by_its_count() -> None:
    """The probe's sample stands for every linear of a pass: counts add up to the model's,
    one group per shape, distinct linears within a group."""
    import runtime.linear_kernels as lk
    from runtime.linear_kernels import _probe_sample, probe_speedups

    model = small_model(tied=False)
    sample = _probe_sample(model)
    assert sum(count for _, count in sample) == len(model_linears(model))
    assert len({tuple(group[0].weight.shape) for group, _ in sample}) == len(sample)
    assert all(len({id(m) for m in group}) == len(group) == min(count, lk.PROBE_CALLS)
               for group, count in sample)
    if FP32_PACKING:
        speedups = probe_speedups(model, ("onednn",), rounds=1)
        assert set(speedups) == {"onednn"} and speedups["onednn"] > 0


@needs_onednn
def test_auto_logs_its_choice(caplog) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="runtime.linear_kernels"):
        choice = apply_linear_backend(small_model(), "auto")
    assert choice.backend in ("torch", "onednn", "mkl", "native") and "probe" in choice.reason
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


def test_config_and_cli_offer_every_linear_backend():
    """The config's list (kept torch-free) names every backend the kernels module has."""
    from runtime import config, linear_kernels

    assert config.LINEAR_BACKENDS == linear_kernels.LINEAR_BACKENDS
    assert config.RuntimeConfig(linear_backend="mkl").linear_backend == "mkl"


@needs_native
@pytest.mark.parametrize("out_features,in_features", [(576, 576), (192, 576), (64, 1536),
                                                       (17, 5), (33, 300), (16, 1), (5, 0)])
def test_native_sgemm_matches_float64_and_is_row_invariant(out_features: int,
                                                           in_features: int) -> None:
    """Panel tails (features not a multiple of 16), depth blocks (K > 192), every tile height
    (rows split evenly into tiles of at most 6) and row blocks (> 192): within float32 rounding of a float64 product, and
    each row's values the same whatever rows share the call (one FMA chain per output)."""
    ops = torch.ops.baton_kernels
    gen = torch.Generator().manual_seed(out_features * 1000 + in_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    packed = ops.sgemm_pack(weight)
    assert torch.equal(ops.sgemm_unpack(packed, out_features), weight)
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 13, 32, 200, 400):
        x = torch.randn(rows, in_features, generator=gen)
        y = ops.sgemm_linear(x, packed, out_features, bias)
        want = x.double() @ weight.double().T + bias.double()
        assert (y.double() - want).abs().max() <= 1e-5 * max(1.0, in_features ** 0.5)
        for r in {0, rows // 2, rows - 1}:
            assert torch.equal(ops.sgemm_linear(x[r:r + 1], packed, out_features, bias)[0], y[r])
    batched = torch.randn(2, 3, in_features, generator=gen)
    assert ops.sgemm_linear(batched, packed, out_features, None).shape == (2, 3, out_features)
    with pytest.raises(RuntimeError, match="does not match"):
        ops.sgemm_linear(torch.randn(2, in_features + 1), packed, out_features, None)


@needs_native
@pytest.mark.parametrize("intermediate,in_features", [(1536, 576), (96, 64), (16, 500)])
def test_fused_swiglu_is_the_plain_linears_gate_times_up(intermediate: int,
                                                         in_features: int) -> None:
    """`sgemm_swiglu` over a packed `[gate; up]` weight: within float32 rounding of silu(gate) *
    up from the plain packed linear (its gate and up are the same values; only SiLU's exp
    differs from torch's), close to float64, row invariant, for every tile height (tiles of at
    most 3 rows), depth blocks (K > 192, a partial last one) and row blocks (> 192)."""
    import torch.nn.functional as F

    ops = torch.ops.baton_kernels
    gen = torch.Generator().manual_seed(intermediate + in_features)
    weight = torch.randn(2 * intermediate, in_features, generator=gen) / in_features ** 0.5
    packed = ops.sgemm_pack(weight)
    for rows in (1, 2, 3, 4, 5, 7, 32, 200, 400):
        x = torch.randn(rows, in_features, generator=gen) * 3
        y = ops.sgemm_swiglu(x, packed, intermediate)
        gate, up = ops.sgemm_linear(x, packed, 2 * intermediate, None).chunk(2, dim=-1)
        torch.testing.assert_close(y, F.silu(gate) * up, rtol=1e-6, atol=1e-6)
        gate64, up64 = (x.double() @ weight.double().T).chunk(2, dim=-1)
        torch.testing.assert_close(y.double(), F.silu(gate64) * up64, rtol=1e-4, atol=1e-4)
        for r in {0, rows // 2, rows - 1}:
            assert torch.equal(ops.sgemm_swiglu(x[r:r + 1], packed, intermediate)[0], y[r])
    assert ops.sgemm_swiglu(torch.randn(2, 3, in_features), packed, intermediate).shape == (
        2, 3, intermediate)
    with pytest.raises(RuntimeError, match="not a gate and up projection"):
        ops.sgemm_swiglu(torch.randn(2, in_features), packed, intermediate // 2)


@needs_native
def test_a_llama_mlp_fuses_swiglu_on_the_native_sgemm_only() -> None:
    """The MLP's gate-and-up linear takes the fused op when packed for the engine's sgemm with
    SiLU and no bias, and the plain linear and product otherwise (other backends, GELU), with
    the same outputs within float32 rounding."""
    import torch.nn.functional as F

    from runtime.architectures.layers import FusedLinear
    from runtime.linear_kernels import pack_linears, unpack_linears

    model = tiny_model(seed=1, dtype=torch.float32, hidden_size=64, intermediate_size=96)
    mlp = model.model.layers[0].mlp
    gate_up: FusedLinear = mlp.gate_up_proj
    x = torch.randn(5, 64)
    with torch.inference_mode():
        plain = mlp(x)
        pack_linears(model, "native")
        assert gate_up.fuses_swiglu(F.silu) and not gate_up.fuses_swiglu(F.gelu)
        torch.testing.assert_close(mlp(x), plain, rtol=1e-5, atol=1e-5)
        gelu_gate = gate_up.gated(x, F.gelu)
        unpack_linears(model)
        assert not gate_up.fuses_swiglu(F.silu)
        torch.testing.assert_close(gate_up.gated(x, F.gelu), gelu_gate, rtol=1e-5, atol=1e-5)


needs_native_bf16 = pytest.mark.skipif(
    not packing_supported("native", torch.bfloat16, CPU),
    reason="the engine's bfloat16 GEMM needs AVX-512 BF16")


def test_native_packs_bfloat16_only_where_the_cpu_has_avx512_bf16() -> None:
    from runtime.attention_kernels import load_native_kernel

    load_native_kernel()
    built = torch.ops.baton_kernels.bf16_gemm_available()
    assert packing_supported("native", torch.bfloat16, CPU) == built
    assert not packing_supported("native", torch.float16, CPU)
    if not built:
        with pytest.raises(ValueError, match="linear_backend native: .* cannot pack"):
            choose_linear_backend(small_model(torch.bfloat16), "native")


def bf16_close(y: torch.Tensor, want: torch.Tensor, depth: int) -> None:
    """`y` (bfloat16) is `want` (float64) rounded once to bfloat16, give or take the float32
    sums' rounding: half a bfloat16 step relative, plus float32 error growing with the depth."""
    err = (y.double() - want).abs()
    bound = want.abs() * 2.0 ** -8 + 1e-5 * max(1.0, depth ** 0.5)
    assert bool((err <= bound).all()), (err - bound).max()


@needs_native_bf16
@pytest.mark.parametrize("out_features,in_features", [(576, 576), (192, 1536), (64, 301),
                                                       (17, 5), (33, 300), (32, 1), (5, 0)])
def test_native_bf16_gemm_matches_float64_and_is_row_invariant(out_features: int,
                                                               in_features: int) -> None:
    """Panel tails (features not a multiple of 32), an odd K (a half last pair, in the last
    depth block), depth blocks (K > 192), every tile height and row blocks (> 192): each output
    the exact product rounded once to bfloat16 (within the float32 sums' rounding), bias
    added before that rounding, and a row's values the same whatever rows share the call."""
    ops = torch.ops.baton_kernels
    gen = torch.Generator().manual_seed(out_features * 1000 + in_features)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    bias = torch.randn(out_features, generator=gen).bfloat16()
    packed = ops.bf16_pack(weight)
    assert torch.equal(ops.bf16_unpack(packed, out_features, in_features), weight)
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 13, 32, 200, 400):
        x = torch.randn(rows, in_features, generator=gen).bfloat16()
        y = ops.bf16_linear(x, packed, out_features, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
        bf16_close(y, x.double() @ weight.double().T + bias.double(), in_features)
        for r in {0, rows // 2, rows - 1}:
            assert torch.equal(ops.bf16_linear(x[r:r + 1], packed, out_features, bias)[0], y[r])
    batched = torch.randn(2, 3, in_features, generator=gen).bfloat16()
    assert ops.bf16_linear(batched, packed, out_features, None).shape == (2, 3, out_features)
    with pytest.raises(RuntimeError, match="does not match"):
        ops.bf16_linear(torch.randn(2, in_features + 2).bfloat16(), packed, out_features, None)
    with pytest.raises(RuntimeError, match="x must be a bfloat16"):
        ops.bf16_linear(torch.randn(2, in_features), packed, out_features, None)


@needs_native_bf16
@pytest.mark.parametrize("intermediate,in_features", [(1536, 576), (96, 64), (32, 501)])
def test_native_bf16_swiglu_is_silu_gate_times_up_rounded_once(intermediate: int,
                                                                in_features: int) -> None:
    """`bf16_swiglu` over a packed `[gate; up]` weight: silu(gate) * up of the exact gate and
    up, rounded once (within float32 rounding), row invariant, every tile height and block."""
    import torch.nn.functional as F

    ops = torch.ops.baton_kernels
    gen = torch.Generator().manual_seed(intermediate + in_features)
    weight = (torch.randn(2 * intermediate, in_features, generator=gen)
              / in_features ** 0.5).bfloat16()
    packed = ops.bf16_pack(weight)
    for rows in (1, 2, 3, 5, 7, 32, 200, 400):
        x = (torch.randn(rows, in_features, generator=gen) * 3).bfloat16()
        y = ops.bf16_swiglu(x, packed, intermediate)
        gate, up = (x.double() @ weight.double().T).chunk(2, dim=-1)
        bf16_close(y, F.silu(gate) * up, in_features)
        for r in {0, rows // 2, rows - 1}:
            assert torch.equal(ops.bf16_swiglu(x[r:r + 1], packed, intermediate)[0], y[r])
    with pytest.raises(RuntimeError, match="not a multiple of 32"):
        ops.bf16_swiglu(torch.randn(2, in_features).bfloat16(),
                        ops.bf16_pack(torch.randn(96, in_features).bfloat16()), 48)


@needs_native_bf16
@pytest.mark.parametrize("tied", [True, False])
def test_a_bfloat16_model_on_the_native_gemm(tied: bool) -> None:
    """Packed for the bfloat16 GEMM: the logits stay within bfloat16 rounding of the plain
    bfloat16 model's, the weights come back exactly, and a Llama MLP fuses SwiGLU."""
    import torch.nn.functional as F

    from runtime.architectures import CausalSelfAttention

    model = small_model(torch.bfloat16, tied=tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, pos = torch.tensor([[3, 14, 15, 92, 65, 35]]), torch.arange(6)[None]
    with torch.inference_mode():
        plain = model.compute_logits(model(ids, pos, CausalSelfAttention())).float()
        extra = pack_linears(model, "native")
        assert extra == (model.lm_head.weight.numel() * 2 if tied else 0)
        packed = model.compute_logits(model(ids, pos, CausalSelfAttention())).float()
    assert (packed - plain).abs().max() <= 0.03 * (plain.max() - plain.min())
    unpack_linears(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    llama = tiny_model(seed=1, dtype=torch.bfloat16, hidden_size=64, intermediate_size=128)
    mlp = llama.model.layers[0].mlp
    x = torch.randn(5, 64).bfloat16()
    with torch.inference_mode():
        plain_mlp = mlp(x).float()
        pack_linears(llama, "native")
        assert mlp.gate_up_proj.fuses_swiglu(F.silu)
        fused = mlp(x).float()
    assert (fused - plain_mlp).abs().max() <= 0.02 * plain_mlp.abs().max()
