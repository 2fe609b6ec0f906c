"""Checkpoint tensor names <-> our parameters: fusion, transposition and prefixes in one place.

The loader asks `checkpoint_targets(model)` where each checkpoint tensor goes; `save_model`
asks `checkpoint_tensors(model)` for the HF-named tensors to write. Both derive from
`layers.FUSED_PROJECTIONS` and the model class's `transposed_weights`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from runtime.architectures.base import CausalLM
from runtime.architectures.layers import FUSED_PROJECTIONS, FusedLinear


def _fused_sources() -> dict[str, tuple[str, ...]]:
    """Fused module name -> its checkpoint sources in shard order: qkv_proj -> (q, k, v)_proj."""
    out: dict[str, tuple[str, ...]] = {}
    for src, (dst, _) in sorted(FUSED_PROJECTIONS.items(), key=lambda kv: kv[1]):
        out[dst] = (*out.get(dst, ()), src)
    return out


_FUSED_SOURCES = _fused_sources()


@dataclass(frozen=True, slots=True)
class Target:
    """Where one checkpoint tensor goes: `param[rows]` (or `param`), transposed if needed."""

    param: str
    rows: tuple[int, int] | None
    shape: tuple[int, ...]  # the shape the checkpoint tensor must have
    transpose: bool


def _targets(model: CausalLM) -> Iterator[tuple[str, Target]]:
    for name, p in model.named_parameters():  # tied parameters appear once
        module_name, _, pname = name.rpartition(".")
        parent, _, short = module_name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, FusedLinear) and short in _FUSED_SOURCES:
            start = 0
            for src, size in zip(_FUSED_SOURCES[short], module.output_sizes, strict=True):
                shape = (size, *p.shape[1:])
                yield f"{parent}.{src}.{pname}", Target(name, (start, start + size), shape, False)
                start += size
        elif model.transposed_weights.fullmatch(name):
            yield name, Target(name, None, tuple(p.shape[::-1]), True)
        else:
            yield name, Target(name, None, tuple(p.shape), False)


def checkpoint_targets(model: CausalLM) -> dict[str, Target]:
    """Every tensor a checkpoint must provide, by (normalised) HF name."""
    return dict(_targets(model))


def checkpoint_tensors(model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under HF names and layouts (unfused, Conv1D transposed)."""
    params = dict(model.named_parameters())
    for name, target in _targets(model):
        t = params[target.param].detach()
        if target.rows is not None:
            t = t[target.rows[0] : target.rows[1]]
        yield name, (t.T if target.transpose else t).contiguous()
