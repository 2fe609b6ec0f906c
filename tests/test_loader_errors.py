"""Every way a model folder can be broken gives a ModelLoadError that names the problem."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.loader import ModelLoadError, load_model, load_model_config, save_model
from tests.model_factory import edit_config, make_hf_model_dir

pytest.importorskip("transformers").logging.set_verbosity_error()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_hf_model_dir(tmp_path_factory.mktemp("models"), "llama")


@pytest.fixture
def model_dir(tmp_path, llama_dir):
    """A private copy of a tiny llama folder that a test may break."""
    dest = tmp_path / "model"
    dest.mkdir()
    for file in llama_dir.iterdir():
        (dest / file.name).write_bytes(file.read_bytes())
    return dest


def rewrite(file, edit):
    """Apply `edit(tensors) -> tensors` to one safetensors file."""
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    save_file(edit(tensors), file, metadata={"format": "pt"})


def without(name):
    return lambda tensors: {k: v for k, v in tensors.items() if k != name}


def raises(path, *fragments, **kwargs):
    with pytest.raises(ModelLoadError) as info:
        load_model(path, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    return str(info.value)


def test_error_is_a_value_error():
    assert issubclass(ModelLoadError, ValueError)


def test_missing_folder(tmp_path):
    raises(tmp_path / "nope", "model folder not found", "nope")


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    raises(model_dir, "no config.json", str(model_dir))


def test_invalid_config_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    raises(model_dir, "cannot read", "config.json")


def test_unknown_architecture_lists_supported(model_dir):
    edit_config(model_dir, architectures=["FalconForCausalLM"])
    msg = raises(model_dir, "unsupported architecture 'FalconForCausalLM'", "config.json")
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"):
        assert name in msg


def test_missing_architectures_key(model_dir):
    edit_config(model_dir, architectures=None)
    raises(model_dir, "no 'architectures' entry", "LlamaForCausalLM")


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_unknown_rope_type(model_dir, key):
    edit_config(model_dir, rope_parameters=None)
    edit_config(model_dir, **{key: {"rope_type": "yarn", "factor": 4.0}})
    raises(model_dir, "unsupported rope type 'yarn'", "llama3", "config.json")


def test_legacy_rope_type_key(model_dir):
    edit_config(model_dir, rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0})
    raises(model_dir, "unsupported rope type 'dynamic'")


def test_llama3_rope_lacking_a_field(model_dir):
    edit_config(model_dir, rope_parameters={"rope_type": "llama3", "factor": 8.0})
    raises(model_dir, "'low_freq_factor'")


def test_missing_config_key(model_dir):
    edit_config(model_dir, hidden_size=None)
    raises(model_dir, "missing required key 'hidden_size'", "config.json")


def test_gpt2_nonstandard_attention_scale(tmp_path):
    path = make_hf_model_dir(tmp_path, "gpt2", scale_attn_by_inverse_layer_idx=True)
    raises(path, "scale_attn_by_inverse_layer_idx")


def test_missing_tensor(model_dir):
    rewrite(model_dir / "model.safetensors", without("model.layers.1.mlp.up_proj.weight"))
    raises(model_dir, "missing tensor", "'model.layers.1.mlp.up_proj.weight'")


def test_missing_lm_head_when_untied(model_dir):
    rewrite(model_dir / "model.safetensors", without("lm_head.weight"))
    raises(model_dir, "missing tensor", "'lm_head.weight'")


def test_unexpected_tensor(model_dir):
    rewrite(model_dir / "model.safetensors", lambda t: t | {"model.extra.weight": torch.ones(3)})
    raises(model_dir, "unexpected tensor 'model.extra.weight'", "model.safetensors")


def test_wrong_shape(model_dir):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
        return t

    rewrite(model_dir / "model.safetensors", edit)
    raises(
        model_dir,
        "'model.layers.0.self_attn.k_proj.weight'",
        "shape [16, 64], expected [32, 64]",
    )


def test_truncated_file_names_file_and_tensor(model_dir):
    file = model_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 5000])
    msg = raises(model_dir, "truncated", str(file))
    assert re.search(r"tensor '[\w.]+' extends past the end of the file", msg)


def test_corrupt_header(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    raises(model_dir, "corrupt", "model.safetensors")


def test_no_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    raises(model_dir, "no model.safetensors or model.safetensors.index.json")


@pytest.fixture
def sharded_dir(tmp_path):
    return make_hf_model_dir(tmp_path, "qwen2", sharded=True)


def test_shard_listed_in_index_missing(sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded_dir / shard).unlink()
    raises(sharded_dir, f"shard '{shard}'", "is missing", "model.safetensors.index.json")


def test_index_names_tensor_absent_from_its_shard(sharded_dir):
    file = sharded_dir / "model.safetensors.index.json"
    index = json.loads(file.read_text())
    index["weight_map"]["model.layers.0.mlp.ghost.weight"] = next(
        iter(index["weight_map"].values())
    )
    file.write_text(json.dumps(index))
    raises(sharded_dir, "'model.layers.0.mlp.ghost.weight' listed in the index is not in")


def test_unsupported_dtype_argument(llama_dir):
    raises(llama_dir, "unsupported dtype 'int8'", dtype="int8")


def test_dtype_conversion_and_auto(tmp_path, monkeypatch):
    from runtime.hardware import CpuInfo

    path = make_hf_model_dir(tmp_path, "llama", dtype=torch.bfloat16)
    assert load_model_config(path).torch_dtype == "bfloat16"
    # on a CPU without native bfloat16 matmul "auto" means float32 (whatever this machine has)
    monkeypatch.setattr("runtime.loader.cpu_info",
                        lambda: CpuInfo("AMD EPYC", frozenset({"avx2", "fma"}), 2))
    auto = load_model(path)
    assert auto.dtype == torch.float32 and auto.config.torch_dtype == "float32"
    assert load_model(path, dtype="bfloat16").dtype == torch.bfloat16
    assert load_model(path, dtype=torch.float16).dtype == torch.float16
    f64 = load_model(path, dtype="float64")
    assert all(p.dtype == torch.float64 and p.is_contiguous() for p in f64.parameters())
    assert not any(p.requires_grad for p in f64.parameters()) and not f64.training


def test_tied_checkpoint_that_still_has_lm_head(tmp_path):
    path = make_hf_model_dir(tmp_path, "llama", tie=True)
    model = load_model(path)
    out = save_model(model, tmp_path / "copy")
    rewrite(out / "model.safetensors", lambda t: t | {"lm_head.weight": torch.zeros(300, 64)})
    again = load_model(out)
    assert torch.equal(again.lm_head.weight, model.embed_tokens.weight)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(llama_dir):
    raises(llama_dir, "'cuda' requested but CUDA is not available", device="cuda")
