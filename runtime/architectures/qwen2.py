"""Qwen2: the Llama network with a bias on q/k/v (never on o_proj).

The bias comes from `ModelConfig.qkv_bias`, which the config parser always sets for Qwen2, so
no module differs from Llama's.
"""

from __future__ import annotations

from runtime.architectures.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v bias (config.qkv_bias=True, config.o_bias=False)."""
