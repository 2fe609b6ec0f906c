"""Model specs: seeded random Hugging Face model folders of a named shape, so no download.

Benchmarks measure scheduling, which depends on the model's shape, not on its weights, so a
random model of SmolLM2-135M's shape costs what the real one costs per token. Folders are
written once under the cache dir (config.json from our `ModelConfig.to_hf_dict()`,
safetensors, a word-level tokenizer) and reused; `transformers` and vLLM load them too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from runtime.config import DEMO_MODEL_DIR
from runtime.model_config import ModelConfig, RopeConfig

SPECS: dict[str, ModelConfig] = {
    # The shape of the trained demo model in models/kjv-llama-tiny (context 2048 instead of 512,
    # so Orca's trace fits; positions cost nothing). "demo" is that trained model when present.
    "demo-shape": ModelConfig(
        "LlamaForCausalLM",
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
        max_position_embeddings=2048,
        norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # HuggingFaceTB/SmolLM2-135M's shape (context cut to 2048: positions cost nothing here).
    "smollm2-135m-shape": ModelConfig(
        "LlamaForCausalLM",
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        max_position_embeddings=2048,
        norm_eps=1e-5,
        tie_word_embeddings=True,
        rope=RopeConfig(theta=100000.0),
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Tests and smoke runs: a few milliseconds per step.
    "tiny": ModelConfig(
        "LlamaForCausalLM",
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def default_cache_dir() -> Path:
    """`$BATON_RUNTIME_CACHE`, else `$XDG_CACHE_HOME/baton-runtime`, else ~/.cache/baton-runtime."""
    if env := os.environ.get("BATON_RUNTIME_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "baton-runtime"


def write_tokenizer(path: Path, vocab_size: int, max_len: int) -> None:
    """A word-level tokenizer with exactly `vocab_size` tokens (`t<id>`), BOS 1, EOS 2.

    Benchmarks send token ids; a tokenizer is there so servers that insist on one start.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab |= {f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": max_len,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_model_dir(config: ModelConfig, path: Path, seed: int = 0) -> Path:
    """Write a seeded random model folder for `config` at `path` (atomically, via a temp dir)."""
    from runtime.architectures import build_model
    from runtime.loader import save_model

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device("cpu"):
        model = build_model(config.replace(torch_dtype="float32")).init_weights(seed)
    save_model(model, tmp)
    gen = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": 0,
    }
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_tokenizer(tmp, config.vocab_size, config.max_position_embeddings)
    del model
    try:
        tmp.rename(path)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(
    spec: str | None = None,
    model_dir: str | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> Path:
    """The model folder to benchmark: `model_dir` as given, else the spec's cached folder.

    The "demo" spec is the trained demo model when models/ has it, so its numbers match what
    users run; otherwise a random model of the same shape.
    """
    if model_dir:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model_dir}: no config.json in that folder")
        return path
    name = spec or "demo"
    if (
        name == "demo"
        and (DEMO_MODEL_DIR / "config.json").is_file()
        and any(DEMO_MODEL_DIR.glob("*.safetensors"))
    ):
        return DEMO_MODEL_DIR
    name = "demo-shape" if name == "demo" else name
    if name not in SPECS:
        raise ValueError(f"unknown model spec {name!r}; known: demo, {', '.join(SPECS)}")
    path = (cache_dir or default_cache_dir()) / "model-specs" / f"{name}-seed{seed}"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_model_dir(SPECS[name], path, seed)
    return path
