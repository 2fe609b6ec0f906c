"""What every `*ForCausalLM` shares: the LM head, weight tying, fresh init and loader hooks."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from runtime.architectures.layers import Linear, init_weights_
from runtime.model_config import ModelConfig


class CausalLM(nn.Module):
    """Decoder plus LM head. `forward` returns final hidden states; `compute_logits` the logits.

    Logits are computed separately so callers project only the rows they sample from.
    Subclasses build `self.<base>` (the decoder) before calling `_init_head()`.
    """

    # Checkpoint tensors that are buffers, not parameters, in some HF saves: skipped on load.
    ignored_checkpoint_tensors: re.Pattern[str] = re.compile(r"(?!)")  # matches nothing
    # Our parameter names whose checkpoint tensor is stored transposed (GPT-2's Conv1D).
    transposed_weights: re.Pattern[str] = re.compile(r"(?!)")

    config: ModelConfig
    lm_head: Linear

    def _init_head(self) -> None:
        self.lm_head = Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def embed_tokens(self) -> nn.Embedding:
        raise NotImplementedError

    def tie_weights(self) -> None:
        """Share the LM head with the input embedding when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self, seed: int = 0, std: float = 0.02) -> CausalLM:
        """Seeded fresh weights (training from scratch, benchmarks); returns self."""
        init_weights_(self, seed, std)
        return self

    def checkpoint_name(self, name: str) -> str:
        """A checkpoint tensor's name in our (pre-fusion) naming; GPT-2 restores its prefix."""
        return name

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Any, mask: Any = None
    ) -> torch.Tensor:
        """input_ids, positions (*tok,) -> hidden states (*tok, hidden) after the final norm."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, hidden) -> (M, vocab); pass only the rows that are sampled."""
        return self.lm_head(hidden)
