"""Logits parity with Hugging Face transformers on random tiny models of every architecture.

Reference: `AutoModelForCausalLM` run on each sequence alone (no padding). Ours: the same
sequences as a left-padded (B, T) batch with a key-padding mask, and packed as (N,) with
segment ids. Bounds: float32 max abs error 1e-4 (measured ~5e-6 on logits of magnitude ~5),
float64 1e-10 (measured <= 1e-14). For float64 the reference's RMSNorm is patched to compute in
float64: transformers always computes it in float32, which caps its float64 accuracy at ~1e-6.
"""

from __future__ import annotations

import json

import pytest
import torch

from runtime.architectures import ARCHITECTURES, CausalSelfAttention, build_model
from runtime.architectures.attention_ref import StaticCacheAttention
from runtime.loader import load_model, load_model_config, save_model
from runtime.model_config import ModelConfig
from tests.model_factory import ARCH_ALIASES, edit_config, make_hf_model_dir, strip_gpt2_prefix

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ARCHS = list(ARCH_ALIASES)
BOUNDS = {torch.float32: 1e-4, torch.float64: 1e-10}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


@pytest.fixture(autouse=True)
def _hf_rmsnorm_in_input_dtype(monkeypatch):
    """Make the reference's RMSNorm exact in float64 (unchanged for float32 inputs)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    def forward(self, h):
        if h.dtype != torch.float64:
            h = h.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(self.weight.dtype)

    for cls in (
        modeling_llama.LlamaRMSNorm,
        modeling_mistral.MistralRMSNorm,
        modeling_qwen2.Qwen2RMSNorm,
        modeling_qwen3.Qwen3RMSNorm,
    ):
        monkeypatch.setattr(cls, "forward", forward)


def hf_reference(path, dtype):
    # eager for float32 (an implementation independent of ours); sdpa for float64 because eager
    # takes the softmax in float32
    impl = "eager" if dtype == torch.float32 else "sdpa"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=impl
    )
    return model.eval()


def random_seqs(lengths, vocab=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


@torch.no_grad()
def assert_parity(path, dtype, lengths=(7, 12, 3), bound=None):
    """Our padded and packed logits match the reference run on each sequence alone."""
    bound = BOUNDS[dtype] if bound is None else bound
    ref, ours = hf_reference(path, dtype), load_model(path, dtype=dtype)
    assert ours.dtype == dtype
    seqs = random_seqs(lengths)
    expected = [ref(input_ids=s[None]).logits[0] for s in seqs]  # (T_i, vocab) each

    B, T = len(seqs), max(lengths)
    ids = torch.zeros(B, T, dtype=torch.long)
    real = torch.zeros(B, T, dtype=torch.bool)
    positions = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(seqs):  # left padding: true positions start at 0 after the pad
        ids[b, T - len(s) :], real[b, T - len(s) :] = s, True
        positions[b, T - len(s) :] = torch.arange(len(s))
    hidden = ours(ids, positions, CausalSelfAttention(), real)  # (B, T, hidden)
    padded = ours.compute_logits(hidden[real])  # (sum T_i, vocab)

    packed_ids = torch.cat(seqs)  # (N,)
    packed_pos = torch.cat([torch.arange(len(s)) for s in seqs])
    segments = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])
    packed = ours.compute_logits(ours(packed_ids, packed_pos, CausalSelfAttention(), segments))

    want = torch.cat(expected)
    errors = {
        "padded": (padded - want).abs().max().item(),
        "packed": (packed - want).abs().max().item(),
    }
    print(f"parity {path.name}: {errors}")  # shown with pytest -s
    assert max(errors.values()) <= bound, f"{path.name}: max abs error {errors} > {bound}"
    assert want.abs().max() > 1.0  # the logits are not trivially near zero
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("arch", ARCHS)
def test_parity(tmp_path, arch, dtype):
    model = assert_parity(make_hf_model_dir(tmp_path, arch, dtype=dtype, seed=3), dtype)
    assert type(model) is ARCHITECTURES[ARCH_ALIASES[arch]]


def test_parity_sharded(tmp_path):
    path = make_hf_model_dir(tmp_path, "qwen2", sharded=True)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2 and not (path / "model.safetensors").exists()
    assert_parity(path, torch.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_parity_tied_embeddings(tmp_path, arch):
    path = make_hf_model_dir(tmp_path, arch, dtype=torch.float64, tie=True, sharded=arch == "llama")
    files = [p.name for p in path.glob("*.safetensors")]
    assert files and "lm_head.weight" not in _all_tensor_names(path)
    model = assert_parity(path, torch.float64)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_parity_llama3_rope_scaling(tmp_path):
    path = make_hf_model_dir(tmp_path, "llama", dtype=torch.float64, rope_scaling=LLAMA3)
    config = load_model_config(path)
    assert config.rope.rope_type == "llama3" and config.rope.factor == 8.0
    assert_parity(path, torch.float64, lengths=(60, 45))  # beyond original_max_position 16
    # the scaling matters at these positions: without it the logits differ
    plain = load_model(edit_config(path, rope_parameters={"rope_type": "default"}))
    scaled = load_model(edit_config(path, rope_parameters=LLAMA3 | {"rope_theta": 10000.0}))
    ids, pos = random_seqs([60])[0], torch.arange(60)
    with torch.no_grad():
        diff = plain(ids, pos, CausalSelfAttention()) - scaled(ids, pos, CausalSelfAttention())
    assert diff.abs().max() > 1e-3


def test_parity_legacy_config_keys(tmp_path):
    """transformers 4.x spelling: torch_dtype, top-level rope_theta, rope_scaling with `type`."""
    path = make_hf_model_dir(
        tmp_path, "mistral", dtype=torch.float64, num_key_value_heads=4, rope_scaling=LLAMA3
    )
    ref = hf_reference(path, torch.float64)
    d = json.loads((path / "config.json").read_text())
    d.pop("rope_parameters")
    d.pop("num_key_value_heads")  # absent means one KV head per query head
    d["torch_dtype"] = d.pop("dtype")
    d["rope_theta"] = 10000.0
    d["rope_scaling"] = {k.replace("rope_type", "type"): v for k, v in LLAMA3.items()}
    (path / "config.json").write_text(json.dumps(d))
    config = load_model_config(path)
    assert (config.num_key_value_heads, config.rope.rope_type) == (4, "llama3")
    ours = load_model(path)
    assert ours.dtype == torch.float64  # "auto" follows torch_dtype
    ids = random_seqs([40])[0]
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(40), CausalSelfAttention()))
    assert (got - want).abs().max() <= BOUNDS[torch.float64]


def test_parity_gpt2_without_prefix_and_mask_buffers(tmp_path):
    path = strip_gpt2_prefix(make_hf_model_dir(tmp_path, "gpt2", dtype=torch.float64, tie=True))
    names = _all_tensor_names(path)
    assert "h.0.attn.c_attn.weight" in names and not any(
        n.startswith("transformer.") for n in names
    )
    _add_tensors(
        path,
        {"h.0.attn.bias": torch.ones(1, 1, 256, 256), "h.0.attn.masked_bias": torch.tensor(-1e4)},
    )
    assert_parity(path, torch.float64)


@torch.no_grad()
def test_cached_decode_matches_full_forward(tmp_path):
    """Prefill then one-token decode steps through a KV cache give the full-pass logits."""
    model = load_model(make_hf_model_dir(tmp_path, "qwen3", dtype=torch.float64))
    ids = random_seqs([20, 20], seed=1)
    ids = torch.stack(ids)  # (B=2, T=20)
    pos = torch.arange(20).expand(2, 20)
    full = model.compute_logits(model(ids, pos, CausalSelfAttention()))  # (2, 20, vocab)
    cfg = model.config
    cache = StaticCacheAttention(
        cfg.num_hidden_layers, 2, 32, cfg.num_key_value_heads, cfg.head_dim, torch.float64
    )
    steps = [model.compute_logits(model(ids[:, :12], pos[:, :12], cache))]
    for t in range(12, 20):
        steps.append(model.compute_logits(model(ids[:, t : t + 1], pos[:, t : t + 1], cache)))
    assert (torch.cat(steps, dim=1) - full).abs().max() <= BOUNDS[torch.float64]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
@torch.no_grad()
def test_load_on_cuda_matches_cpu(tmp_path, arch):
    path = make_hf_model_dir(tmp_path, arch, tie=arch == "gpt2")
    cpu, gpu = load_model(path), load_model(path, device="cuda")
    assert all(p.is_cuda for p in gpu.parameters())
    ids = torch.stack(random_seqs([16, 16]))
    pos = torch.arange(16).expand(2, 16)
    real = torch.ones(2, 16, dtype=torch.bool)
    real[1, :5] = False
    want = cpu.compute_logits(cpu(ids, pos, CausalSelfAttention(), real))
    got = gpu.compute_logits(gpu(ids.cuda(), pos.cuda(), CausalSelfAttention(), real.cuda()))
    assert (got.cpu() - want)[real].abs().max() <= 1e-3  # other kernels, other rounding


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_model_round_trip(tmp_path, arch):
    """save_model writes HF names and layouts: transformers and load_model both read it back."""
    path = make_hf_model_dir(tmp_path, arch, dtype=torch.float64, tie=arch == "gpt2")
    model = load_model(path)
    out = save_model(model, tmp_path / "saved", max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").exists()
    assert_parity(out, torch.float64)
    again = load_model(out)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_fresh_model_trains(arch):
    """A model built from a ModelConfig is differentiable end to end (demo-model training)."""
    config = ModelConfig(
        architecture=arch,
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2 if arch != "GPT2LMHeadModel" else None,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=arch == "Qwen3ForCausalLM",
    )
    model = build_model(config).init_weights(seed=0).train()
    ids = torch.randint(0, 50, (2, 9))
    hidden = model(ids[:, :-1], torch.arange(8).expand(2, 8), CausalSelfAttention())
    logits = model.compute_logits(hidden.reshape(-1, 32))
    loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert build_model(config).init_weights(seed=0).state_dict().keys() == model.state_dict().keys()


def test_config_contract_fields(tmp_path):
    for arch in ARCHS:
        cfg = load_model(make_hf_model_dir(tmp_path, arch, dtype=torch.float64)).config
        assert cfg.architecture == ARCH_ALIASES[arch] and cfg.torch_dtype == "float64"
        assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (300, 64, 2)
        assert cfg.head_dim == (32 if arch == "qwen3" else 16)
        assert cfg.num_key_value_heads == (4 if arch == "gpt2" else 2)
        assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
        assert cfg.max_position_embeddings == 256 and cfg.tie_word_embeddings is False


def _all_tensor_names(path):
    from safetensors import safe_open

    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names |= set(f.keys())
    return names


def _add_tensors(path, extra):
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    save_file(tensors | extra, file, metadata={"format": "pt"})
