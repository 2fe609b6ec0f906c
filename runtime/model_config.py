"""One frozen config for every architecture, parsed from (and written back to) HF config.json.

Each HF architecture spells the same facts differently (`n_embd` vs `hidden_size`, `rope_scaling`
vs `rope_parameters`, `torch_dtype` vs `dtype`); the model code reads only `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
SUPPORTED_DTYPES = ("float32", "float64", "bfloat16", "float16")


class ModelLoadError(ValueError):
    """A model folder or config cannot be loaded; the message names the file, key or tensor."""


def _unsupported(what: str, value: object, supported: object) -> ModelLoadError:
    return ModelLoadError(f"unsupported {what} {value!r}; supported: {', '.join(supported)}")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding parameters; `llama3` fields are ignored by the other types."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise _unsupported("rope type", self.rope_type, SUPPORTED_ROPE_TYPES)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything the model modules need; GPT-2 has `rope=None` (learned positions).

    `num_key_value_heads` and `head_dim` may be given as None and are then derived.
    `torch_dtype` is the checkpoint's dtype in config.json; a loaded model's config carries
    the dtype it was loaded in.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope: RopeConfig | None = RopeConfig()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None  # recorded for mask builders; the model never applies it

    def __post_init__(self) -> None:
        if self.architecture not in _PARSERS:
            raise _unsupported("architecture", self.architecture, sorted(_PARSERS))
        if self.architecture == "GPT2LMHeadModel":
            object.__setattr__(self, "rope", None)  # learned absolute positions instead
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ModelLoadError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise _unsupported("hidden_act", self.hidden_act, SUPPORTED_ACTIVATIONS)
        if self.torch_dtype not in SUPPORTED_DTYPES:
            raise _unsupported("torch_dtype", self.torch_dtype, SUPPORTED_DTYPES)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse a HF config.json dict; errors name `source` and the offending key."""
        archs = d.get("architectures") or []
        if not archs:
            raise ModelLoadError(
                f"{source}: no 'architectures' entry; supported: {', '.join(sorted(_PARSERS))}"
            )
        arch = archs[0]
        if arch not in _PARSERS:
            raise ModelLoadError(
                f"{source}: {_unsupported('architecture', arch, sorted(_PARSERS))}"
            )
        try:
            fields = _PARSERS[arch](_Keys(d, source))
            dtype = str(d.get("dtype") or d.get("torch_dtype") or "float32")
            return cls(
                architecture=arch,
                torch_dtype=dtype.removeprefix("torch."),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                **fields,
            )
        except ModelLoadError as e:
            msg = str(e)
            raise ModelLoadError(msg if msg.startswith(source) else f"{source}: {msg}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config.json dict that `from_hf_dict` reads back and transformers loads."""
        common = {
            "architectures": [self.architecture],
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.architecture == "GPT2LMHeadModel":
            return common | {
                "model_type": "gpt2",
                "n_embd": self.hidden_size,
                "n_layer": self.num_hidden_layers,
                "n_head": self.num_attention_heads,
                "n_inner": self.intermediate_size,
                "n_positions": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": self.hidden_act,
            }
        rope = self.rope or RopeConfig()
        out = common | {
            "model_type": _MODEL_TYPES[self.architecture],
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "hidden_act": self.hidden_act,
            "rope_theta": rope.theta,
            "rope_scaling": None,
            "attention_bias": self.qkv_bias and self.architecture != "Qwen2ForCausalLM",
            "mlp_bias": self.mlp_bias,
            "sliding_window": self.sliding_window,
        }
        if rope.rope_type != "default":
            scaling = {"rope_type": rope.rope_type, "factor": rope.factor}
            if rope.rope_type == "llama3":
                scaling |= {
                    "low_freq_factor": rope.low_freq_factor,
                    "high_freq_factor": rope.high_freq_factor,
                    "original_max_position_embeddings": rope.original_max_position_embeddings,
                }
            out["rope_scaling"] = scaling
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (the config is frozen)."""
        return dataclasses.replace(self, **changes)


class _Keys:
    """Reads config keys, raising ModelLoadError that names a missing key."""

    def __init__(self, d: dict[str, Any], source: str) -> None:
        self.d, self.source = d, source

    def req(self, key: str) -> Any:
        if self.d.get(key) is None:
            raise ModelLoadError(f"{self.source}: missing required key {key!r}")
        return self.d[key]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.d.get(key)
        return default if value is None else value


def _parse_rope(k: _Keys) -> RopeConfig:
    params = k.get("rope_parameters") or k.get("rope_scaling") or {}
    key = "rope_parameters" if k.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError(f"{k.source}: unsupported {key} layout {params!r}")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{k.source}: unsupported rope type {rope_type!r} in {key!r}; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = float(params.get("rope_theta") or k.get("rope_theta", 10000.0))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if "factor" not in params:
        raise ModelLoadError(f"{k.source}: {key} of type {rope_type!r} lacks 'factor'")
    if rope_type == "linear":
        return RopeConfig("linear", theta, factor=float(params["factor"]))
    for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if name not in params:
            raise ModelLoadError(f"{k.source}: {key} of type 'llama3' lacks {name!r}")
    return RopeConfig(
        "llama3",
        theta,
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _parse_llama_like(k: _Keys) -> dict[str, Any]:
    bias = bool(k.get("attention_bias", False))
    return {
        "vocab_size": k.req("vocab_size"),
        "hidden_size": k.req("hidden_size"),
        "num_hidden_layers": k.req("num_hidden_layers"),
        "num_attention_heads": k.req("num_attention_heads"),
        "intermediate_size": k.req("intermediate_size"),
        "num_key_value_heads": k.get("num_key_value_heads"),
        "head_dim": k.get("head_dim"),
        "max_position_embeddings": k.get("max_position_embeddings", 2048),
        "norm_eps": float(k.get("rms_norm_eps", 1e-6)),
        "hidden_act": k.get("hidden_act", "silu"),
        "rope": _parse_rope(k),
        "qkv_bias": bias,
        "o_bias": bias,
        "mlp_bias": bool(k.get("mlp_bias", False)),
        "tie_word_embeddings": bool(k.get("tie_word_embeddings", False)),
    }


def _parse_mistral(k: _Keys) -> dict[str, Any]:
    return _parse_llama_like(k) | {"sliding_window": k.get("sliding_window")}


def _parse_qwen(k: _Keys, *, qk_norm: bool) -> dict[str, Any]:
    if k.get("use_sliding_window", False):
        raise ModelLoadError(f"{k.source}: 'use_sliding_window': true is not supported")
    fields = _parse_llama_like(k) | {"qk_norm": qk_norm}
    if qk_norm:  # Qwen3: explicit head_dim (HF default 128), optional bias on q/k/v/o
        fields["head_dim"] = k.get("head_dim", 128)
    else:  # Qwen2: q/k/v always carry a bias, o_proj never does
        fields |= {"qkv_bias": True, "o_bias": False}
    return fields


def _parse_gpt2(k: _Keys) -> dict[str, Any]:
    if k.get("scale_attn_by_inverse_layer_idx", False) or not k.get("scale_attn_weights", True):
        raise ModelLoadError(
            f"{k.source}: only the standard 1/sqrt(head_dim) attention scale is supported "
            "(scale_attn_by_inverse_layer_idx / scale_attn_weights)"
        )
    hidden = k.req("n_embd")
    return {
        "vocab_size": k.req("vocab_size"),
        "hidden_size": hidden,
        "num_hidden_layers": k.req("n_layer"),
        "num_attention_heads": k.req("n_head"),
        "intermediate_size": k.get("n_inner", 4 * hidden),
        "max_position_embeddings": k.get("n_positions", 1024),
        "norm_eps": float(k.get("layer_norm_epsilon", 1e-5)),
        "hidden_act": k.get("activation_function", "gelu_new"),
        "rope": None,
        "qkv_bias": True,
        "o_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": bool(k.get("tie_word_embeddings", True)),
    }


_PARSERS: dict[str, Callable[[_Keys], dict[str, Any]]] = {
    "LlamaForCausalLM": _parse_llama_like,
    "MistralForCausalLM": _parse_mistral,
    "Qwen2ForCausalLM": lambda k: _parse_qwen(k, qk_norm=False),
    "Qwen3ForCausalLM": lambda k: _parse_qwen(k, qk_norm=True),
    "GPT2LMHeadModel": _parse_gpt2,
}
_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
