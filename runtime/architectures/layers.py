"""Building blocks shared by the architectures: norms, rotary embeddings, fused linears.

Every function here works on any leading token layout `(*tok, ...)`: a padded `(B, T)` batch
and a packed `(N,)` one go through the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from runtime.model_config import RopeConfig

# The one mapping table from checkpoint projections to our fused ones: HF module name ->
# (fused module name, shard index). Shard i occupies rows sum(output_sizes[:i]) onward.
FUSED_PROJECTIONS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def native_op(packed: torch.Tensor, kind: str) -> Callable[..., torch.Tensor]:
    """The engine's own GEMM op of `kind` ("linear" or "swiglu") for a weight it packed:
    the bfloat16 GEMM's for a bfloat16 weight, the float32 sgemm's otherwise."""
    prefix = "bf16" if packed.dtype == torch.bfloat16 else "sgemm"
    return getattr(torch.ops.baton_kernels, f"{prefix}_{kind}")


class Linear(nn.Linear):
    """`nn.Linear` that can run on a prepacked weight (`runtime.linear_kernels.pack_linears`).

    `packed` is None for the plain `F.linear` path; when set, it is the weight laid out once
    for the kernel `packed_by` names (oneDNN's blocked layout, MKL's packed sgemm format, or
    the engine's own GEMMs' panels: 16 float32 features, or 32 bfloat16 ones in input pairs),
    so the GEMM skips re-laying the weight out on every call.
    """

    packed: torch.Tensor | None = None
    packed_by: str | None = None  # "onednn", "mkl" or "native" while `packed` is set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return self.packed_forward(x, self.packed, self.packed_by)

    def packed_forward(self, x: torch.Tensor, packed: torch.Tensor, packed_by: str
                       ) -> torch.Tensor:
        """This linear applied through `packed`, a copy of its weight packed for `packed_by`
        (the probe in `runtime.linear_kernels` times copies it has not installed yet)."""
        if packed_by == "mkl":
            return torch.ops.baton_kernels.mkl_linear(x, packed, self.out_features, self.bias)
        if packed_by == "native":
            return native_op(packed, "linear")(x, packed, self.out_features, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


class FusedLinear(Linear):
    """Several projections of the same input stacked into one GEMM; `output_sizes` splits it."""

    def __init__(self, in_features: int, output_sizes: tuple[int, ...], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = tuple(output_sizes)

    def gated(self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
        """`act(gate) * up` of a gate-and-up projection (its two halves): a gated MLP's input.

        On the engine's GEMMs with SiLU (SwiGLU) the product is fused into the GEMM
        (`baton_kernels::sgemm_swiglu`, `bf16_swiglu`): no `(*tok, 2 x inter)` tensor is
        written and read back. In float32 gate and up are the very values the plain linear
        gives; in bfloat16 the product is taken of their float32 sums and rounded once. The
        compiled decoder routes this through its slot op (`runtime.compiled_forward`)."""
        if self.fuses_swiglu(act):
            return native_op(self.packed, "swiglu")(x, self.packed, self.out_features // 2)
        return gated_product(self(x), act)

    def swiglu_fusable(self, act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Whether the fused SwiGLU op can take this projection: SiLU, no bias, and halves of
        whole panels, 16 features in float32 and 32 in bfloat16 (the compiled decoder's slot
        op checks the packing itself)."""
        panel = 32 if self.weight.dtype == torch.bfloat16 else 16
        return act is F.silu and self.bias is None and self.out_features % (2 * panel) == 0

    def fuses_swiglu(self, act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Whether `gated` runs as one fused op: fusable, on the engine's sgemm."""
        return self.packed_by == "native" and self.swiglu_fusable(act)


def sample_by_shape(linears: Iterable[Linear], per_shape: int
                    ) -> list[tuple[list[Linear], int]]:
    """Up to `per_shape` of `linears` per shape (features in and out, bias), each group with
    how many linears of that shape there are.

    Why: a pass's GEMM time is about the sum over shapes of count x time, so the startup
    probes (`runtime.linear_kernels`, `runtime.sgemm_prefetch`) time a few of each shape and
    scale them by the count, weighing the MLP's large linears and the small K/V ones as a
    pass does. Distinct linears, not one called again, so each weight comes from memory as in
    a pass rather than from the cache the previous call left it in.
    """
    by_shape: dict[tuple[int, int, bool], list[Linear]] = {}
    for linear in linears:
        key = (linear.out_features, linear.in_features, linear.bias is not None)
        by_shape.setdefault(key, []).append(linear)
    return [(group[:per_shape], len(group)) for group in by_shape.values()]


def gated_product(y: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`act(gate) * up` from a gate-and-up projection's output `y` (its two halves)."""
    gate, up = y.chunk(2, dim=-1)
    return act(gate) * up


class RMSNorm(nn.Module):
    """RMSNorm as HF computes it: statistics in float32 for half types, else in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16):  # fused kernel, same result
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)  # rounded to x.dtype before the scale, as HF does


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32, bit-identical to transformers' init."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponent)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / rope.low_freq_factor, old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for per-token positions; angles in float32 like the reference models.

    `inv_freq` is a plain attribute (not a buffer) so it survives meta-device construction,
    stays float32 under `model.to(dtype)`, and follows the positions' device lazily.
    """

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.inv_freq = rope_inv_freq(rope, head_dim)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """positions (*tok,) -> cos and signed sin (*tok, 1, D) for `apply_rope`."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return rope_tables(self.inv_freq, positions, dtype)


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`RotaryEmbedding.forward`'s tables for `inv_freq` (float32, on positions' device)."""
    freqs = positions[..., None, None].float() * inv_freq  # (*tok, 1, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (*tok, 1, D)
    sin = emb.sin()
    half = sin.shape[-1] // 2
    sin[..., :half].neg_()  # folds rotate-half's sign into the table, once per forward
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (*tok, H, D): x*cos + rotate_half(x)*sin, HF's convention, in fewer ops.

    rotate_half(x) = cat(-x2, x1) equals roll(x, D/2) times the sign already in `signed_sin`.

    Compiled, each half is rotated on its own instead: inductor reads a `roll` element by
    element (the index wraps modulo D, so it cannot prove a half contiguous): in a 1,280-token
    bfloat16 pass the rope kernel took 0.56 ms a layer, against 0.12 as halves (2-core Zen 4,
    docs/benchmarks.md). The arithmetic per element is the same, so the bits are too; eager
    keeps `roll`, which is the faster of the two there (one kernel per op instead of four).
    """
    half = x.shape[-1] // 2
    if torch.compiler.is_compiling():
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos[..., :half] + x2 * signed_sin[..., :half],
                          x2 * cos[..., half:] + x1 * signed_sin[..., half:]), dim=-1)
    return x * cos + x.roll(half, dims=-1) * signed_sin


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Fresh random weights for training from scratch: N(0, std) matrices, zero biases, unit norms."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            value = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
        elif name.endswith("bias"):
            value = torch.zeros(p.shape)
        else:
            value = torch.ones(p.shape)
        p.copy_(value)
