"""Qwen3: Llama plus a per-head RMSNorm on q and k before RoPE, and an explicit head_dim."""

from __future__ import annotations

import torch

from runtime.architectures.layers import RMSNorm, apply_rope
from runtime.architectures.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
)
from runtime.model_config import ModelConfig


class Qwen3Attention(LlamaAttention):
    """Normalises each head of q and k (over head_dim) so attention logits stay bounded."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def rotated_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q and k normalised per head (each with its own weights) before RoPE, then rotated."""
        q, k, v = self.project_qkv(x)  # (*tok, H, D), (*tok, H_kv, D), (*tok, H_kv, D)
        q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model
