"""Llama (and Mistral, and the base of Qwen2/Qwen3): pre-norm decoder, RoPE, GQA, SwiGLU.

Parameter names follow Hugging Face except the fused `qkv_proj` and `gate_up_proj`, which the
loader builds from q/k/v_proj and gate/up_proj through `layers.FUSED_PROJECTIONS`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from runtime.architectures.base import CausalLM
from runtime.architectures.layers import (
    ACTIVATIONS,
    FusedLinear,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rope,
)
from runtime.model_config import ModelConfig


class LlamaAttention(nn.Module):
    """Fused QKV projection, RoPE, then the attention handle (which owns the KV cache)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = FusedLinear(
            config.hidden_size, (q_size, kv_size, kv_size), bias=config.qkv_bias
        )
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_bias)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (*tok, H, D), k and v (*tok, H_kv, D) before RoPE (views of one GEMM output)."""
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1)
        tok = x.shape[:-1]
        q = q.view(*tok, self.num_heads, self.head_dim)  # (*tok, H, D)
        k = k.view(*tok, self.num_kv_heads, self.head_dim)  # (*tok, H_kv, D)
        v = v.view(*tok, self.num_kv_heads, self.head_dim)  # (*tok, H_kv, D)
        return q, k, v

    def rotated_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k after RoPE and v; q and k rotated in one pass over their adjacent heads."""
        tok = x.shape[:-1]
        heads = self.num_heads + self.num_kv_heads
        qk, v = self.qkv_proj(x).split((heads * self.head_dim, self.qkv_proj.output_sizes[2]), -1)
        qk = apply_rope(qk.view(*tok, heads, self.head_dim), cos, sin)  # (*tok, H + H_kv, D)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=-2)
        return q, k, v.view(*tok, self.num_kv_heads, self.head_dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Any, mask: Any
    ) -> torch.Tensor:
        q, k, v = self.rotated_qkv(x, cos, sin)
        out = attn.attend(self.layer_idx, q, k, v, mask)  # (*tok, H, D)
        return self.o_proj(out.flatten(-2))  # (*tok, H * D) -> (*tok, hidden)


class LlamaMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), gate and up as one GEMM."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = FusedLinear(config.hidden_size, (inter, inter), bias=config.mlp_bias)
        self.down_proj = Linear(inter, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.gated(x, self.act))  # (*tok, inter) between


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Any, mask: Any
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            self.layer_cls(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope, config.head_dim)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Any, mask: Any
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (*tok, hidden)
        cos, sin = self.rotary_emb(positions, x.dtype)  # (*tok, 1, D) each, for every layer
        for layer in self.layers:
            x = layer(x, cos, sin, attn, mask)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    """Llama decoder (`self.model`) plus LM head."""

    model_cls: type[LlamaModel] = LlamaModel
    ignored_checkpoint_tensors = re.compile(r".*rotary_emb\.inv_freq$")  # old HF saves

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_cls(config)
        self._init_head()

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Any, mask: Any = None
    ) -> torch.Tensor:
        """input_ids, positions (*tok,) -> hidden states (*tok, hidden) after the final norm."""
        return self.model(input_ids, positions, attn, mask)


class MistralForCausalLM(LlamaForCausalLM):
    """Same network as Llama; its sliding window is a mask concern (config.sliding_window)."""
