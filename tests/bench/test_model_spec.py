"""Model specs: seeded random folders of a named shape that our loader and tokenizer read."""

from __future__ import annotations

import json

import pytest

from runtime.bench.model_spec import SPECS, resolve_model
from runtime.config import DEMO_MODEL_DIR
from runtime.loader import load_model_config
from runtime.tokenizer import Tokenizer


def test_spec_folder_is_built_once_and_loads(tmp_path):
    path = resolve_model("tiny", cache_dir=tmp_path)
    assert path == tmp_path / "model-specs" / "tiny-seed0"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny", cache_dir=tmp_path) == path  # cached, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    config = load_model_config(path)
    assert config.hidden_size == SPECS["tiny"].hidden_size and config.tie_word_embeddings
    tok = Tokenizer.from_dir(path)
    assert tok.vocab_size == config.vocab_size and tok.eos_token_ids == (2,)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_smollm2_shape_matches_the_real_model():
    c = SPECS["smollm2-135m-shape"]
    assert (
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
        c.tie_word_embeddings,
    ) == (576, 30, 9, 3, 1536, 49152, True)


def test_demo_is_the_trained_model_when_present(tmp_path):
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        pytest.skip("no trained demo model in models/")
    assert resolve_model("demo", cache_dir=tmp_path) == DEMO_MODEL_DIR
    trained = load_model_config(DEMO_MODEL_DIR)
    shape = SPECS["demo-shape"]
    assert (trained.hidden_size, trained.num_hidden_layers, trained.vocab_size) == (
        shape.hidden_size,
        shape.num_hidden_layers,
        shape.vocab_size,
    )


def test_unknown_spec_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model spec 'huge'"):
        resolve_model("huge", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(model_dir=str(tmp_path))
