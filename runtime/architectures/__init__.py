"""Model code: one module per architecture, Hugging Face parameter names, explicit inputs.

Every model: `hidden = model(input_ids, positions, attn, mask)` on any token layout, then
`logits = model.compute_logits(hidden_rows)`. The attention-handle protocol is
`runtime.kv_cache.AttentionHandle`; `attention_ref` has a cache-less reference handle.
"""

from __future__ import annotations

from runtime.architectures.attention_ref import CausalSelfAttention
from runtime.architectures.base import CausalLM
from runtime.architectures.gpt2 import GPT2LMHeadModel
from runtime.architectures.llama import LlamaForCausalLM, MistralForCausalLM
from runtime.architectures.qwen2 import Qwen2ForCausalLM
from runtime.architectures.qwen3 import Qwen3ForCausalLM
from runtime.model_config import ModelConfig

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}


def build_model(config: ModelConfig) -> CausalLM:
    """A model of `config.architecture` with torch's default init; `.init_weights(seed)` reseeds."""
    return ARCHITECTURES[config.architecture](config)


__all__ = [
    "ARCHITECTURES",
    "CausalLM",
    "CausalSelfAttention",
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "ModelConfig",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "build_model",
]
