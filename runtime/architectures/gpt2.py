"""GPT-2: learned absolute positions, LayerNorm, fused c_attn, GELU MLP, all with biases.

Checkpoints store Conv1D weights as (in, out); the loader transposes them into these
`nn.Linear`s (`transposed_weights`). Old checkpoints lack the `transformer.` prefix and carry
the causal-mask buffers `attn.bias` / `attn.masked_bias`, which are skipped.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from runtime.architectures.base import CausalLM
from runtime.architectures.layers import ACTIVATIONS, FusedLinear, Linear
from runtime.model_config import ModelConfig


class GPT2Attention(nn.Module):
    """c_attn is already one (q, k, v) GEMM in the checkpoint; no RoPE."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        hidden = config.hidden_size
        self.c_attn = FusedLinear(hidden, (hidden, hidden, hidden), bias=True)
        self.c_proj = Linear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor, attn: Any, mask: Any) -> torch.Tensor:
        tok = x.shape[:-1]
        q, k, v = self.c_attn(x).split(self.c_attn.output_sizes, dim=-1)
        q = q.view(*tok, self.num_heads, self.head_dim)  # (*tok, H, D)
        k = k.view(*tok, self.num_heads, self.head_dim)  # (*tok, H, D)
        v = v.view(*tok, self.num_heads, self.head_dim)  # (*tok, H, D)
        out = attn.attend(self.layer_idx, q, k, v, mask)  # (*tok, H, D)
        return self.c_proj(out.flatten(-2))  # (*tok, hidden)


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.c_proj = Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, attn: Any, mask: Any) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn, mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Any, mask: Any
    ) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)  # (*tok, hidden)
        for block in self.h:
            x = block(x, attn, mask)
        return self.ln_f(x)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 decoder (`self.transformer`) plus LM head (tied by default)."""

    ignored_checkpoint_tensors = re.compile(r"(.*\.)?h\.\d+\.attn\.(bias|masked_bias)$")
    transposed_weights = re.compile(
        r".*\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$"
    )

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self._init_head()

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.transformer.wte

    def checkpoint_name(self, name: str) -> str:
        if name.startswith(("transformer.", "lm_head.")):
            return name
        return "transformer." + name

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Any, mask: Any = None
    ) -> torch.Tensor:
        """input_ids, positions (*tok,) -> hidden states (*tok, hidden) after ln_f."""
        return self.transformer(input_ids, positions, attn, mask)
