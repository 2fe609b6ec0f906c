"""Tiny random Hugging Face model folders for tests, written by `transformers` itself.

Reuse from any test:

    from tests.model_factory import make_hf_model_dir
    path = make_hf_model_dir(tmp_path, "qwen3", dtype=torch.float64, seed=1)
    model = runtime.loader.load_model(path)

The folders hold config.json, generation_config.json and safetensors (no tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Short names accepted by `make_hf_model_dir`, and the HF architecture each stands for.
ARCH_ALIASES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}

TINY = {  # hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 300
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY_GPT2 = {
    "vocab_size": 300,
    "n_embd": 64,
    "n_inner": 128,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def hf_config(arch: str, *, tie: bool = False, **overrides: Any) -> Any:
    """A tiny transformers config for `arch` (short or HF name), `overrides` on top."""
    from transformers import (
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    arch = ARCH_ALIASES.get(arch, arch)
    classes = {
        "LlamaForCausalLM": (LlamaConfig, TINY),
        "MistralForCausalLM": (MistralConfig, TINY | {"sliding_window": None}),
        "Qwen2ForCausalLM": (Qwen2Config, TINY),
        "Qwen3ForCausalLM": (Qwen3Config, TINY | {"head_dim": 32}),  # head_dim != hidden/heads
        "GPT2LMHeadModel": (GPT2Config, TINY_GPT2),
    }
    if arch not in classes:
        raise ValueError(f"unknown architecture {arch!r}; use one of {sorted(ARCH_ALIASES)}")
    cls, base = classes[arch]
    config = cls(**(base | {"tie_word_embeddings": tie} | overrides))
    config.architectures = [arch]
    return config


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    """Weights large enough that logits spread out (HF's 0.02 init makes them near uniform)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.dim() >= 2:
            value = noise * std
        elif name.endswith("bias"):
            value = noise * 0.1
        else:  # norm scales
            value = 1.0 + 0.1 * noise
        p.copy_(value.to(p.dtype))


def make_hf_model(
    arch: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, tie: bool = False, **overrides
) -> Any:
    """A seeded random `transformers` model (eager attention), in `dtype`."""
    from transformers import AutoModelForCausalLM

    config = hf_config(arch, tie=tie, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.to(dtype)
    randomize_(model, seed)
    return model.eval()


def make_hf_model_dir(
    tmp_path: Path,
    arch: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tie: bool = False,
    sharded: bool = False,
    **overrides: Any,
) -> Path:
    """Save a seeded random tiny HF model with `save_pretrained`; return its folder.

    arch: "llama", "mistral", "qwen2", "qwen3", "gpt2" or the HF architecture name.
    dtype: the weights' dtype (and config.json's `dtype`). tie: tie_word_embeddings (no
    lm_head.weight in the file; also for GPT-2, whose HF default is tied). sharded: several
    safetensors shards plus model.safetensors.index.json. overrides: HF config keys on top of the
    tiny shape (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 300), e.g.
    `rope_scaling={"rope_type": "llama3", ...}` or `num_hidden_layers=3`.
    The folder is `tmp_path / f"{arch}-{seed}"` (plus suffixes), so several fit in one tmp_path.
    """
    model = make_hf_model(arch, dtype=dtype, seed=seed, tie=tie, **overrides)
    name = f"{arch}-{seed}-{str(dtype).removeprefix('torch.')}{'-tied' if tie else ''}"
    path = Path(tmp_path) / (name + ("-sharded" if sharded else ""))
    n = 1
    while path.exists():
        n += 1
        path = path.with_name(f"{path.name}-{n}")
    model.save_pretrained(path, max_shard_size="20KB" if sharded else "50GB")
    return path


def strip_gpt2_prefix(path: Path) -> Path:
    """Rewrite a single-file GPT-2 checkpoint without the `transformer.` prefix (original layout)."""
    file = Path(path) / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in list(f.keys())}
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def edit_config(path: Path, **changes: Any) -> Path:
    """Change keys of a folder's config.json in place (None deletes a key)."""
    file = Path(path) / "config.json"
    d = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    file.write_text(json.dumps(d, indent=2))
    return path
