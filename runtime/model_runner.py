"""The model side of the engine: the shape and KV capacity a layout is sized by, and one pass.

The engine decides what runs (admission, the layout's passes, failures); the runner runs a
pass: the model forward with the pass's mask, the logits of the sampled rows only, the
layout's `commit`, then sampling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from runtime.attention_kernels import choose_attention_backend
from runtime.graph_packages import PackageCacheSpec
from runtime.kv_cache import CacheLimits, ForwardBatch, KVCache, ModelShape, kv_elements_per_token
from runtime.kv_sizing import kv_capacity
from runtime.linear_kernels import apply_linear_backend
from runtime.sampler import SampleResult, sample
from runtime.sdpa_backends import pass_sdpa_backends

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """Engine-wide limits; `None` context/capacity are derived from the model and memory.

    KV capacity: `kv_cache_tokens` when given, else `kv_cache_memory` (`runtime.kv_sizing`:
    `auto`, a fraction of available memory, or a size such as `4GiB`).
    """

    max_num_seqs: int = 64
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    kv_cache_memory: str | float | None = None
    kv_cache_dtype: str = "auto"


HALF_KV_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """`kv_cache_dtype`: `auto` stores K/V as the model's dtype; `bfloat16`/`float16` store
    them in 16 bits under a float32 or float64 model (half or a quarter of the KV memory; the
    keys and values rounded as they are written). A 16-bit model keeps its own dtype."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in HALF_KV_DTYPES:
        raise ValueError(f"kv_cache_dtype: expected auto, {', '.join(HALF_KV_DTYPES)}, "
                         f"got {kv_cache_dtype!r}")
    wanted = HALF_KV_DTYPES[kv_cache_dtype]
    if model_dtype.itemsize <= wanted.itemsize and model_dtype != wanted:
        raise ValueError(f"kv_cache_dtype: {kv_cache_dtype} under a "
                         f"{str(model_dtype).removeprefix('torch.')} model; a 16-bit model "
                         "stores K/V in its own dtype (use auto)")
    return wanted


class ModelRunner:
    """Owns the model: its GEMM kernels, the limits its KV layout gets, and running a pass."""

    def __init__(self, model: torch.nn.Module, limits: EngineLimits,
                 linear_backend: str = "auto", compile_model: bool | str = False,
                 attention_backend: str = "auto",
                 static_decode_rows: tuple[int, ...] = (),
                 static_graph_cache: PackageCacheSpec | None = None) -> None:
        """`compile_model`: False (eager), True (the compiled decoder, compiled at warm-up or
        by the first pass) or "background" (eager until `background_compile` has built it).
        `static_decode_rows`: with a compiled decoder, the row counts of fixed-shape graphs
        (`runtime.static_graphs`), kept on disk in `static_graph_cache` if given
        (`runtime.graph_packages`)."""
        self.model = model
        self.linear_kernels = apply_linear_backend(model, linear_backend)
        self.forward = model
        self.background_compile = None
        self.static_graphs = None
        if static_decode_rows and not compile_model:
            raise ValueError("static_decode_rows: needs compile (true or background)")
        if compile_model:  # after the kernels are chosen: the compiled graph calls them
            from runtime import compiled_forward

            compiled = compiled_forward.compile_decoder(model)
            if static_decode_rows:
                self.static_graphs = compiled_forward.static_decode_graphs(
                    model, static_decode_rows, lazy=compile_model is True,
                    packages=static_graph_cache)
                if self.static_graphs is not None:
                    self._dynamic_forward = compiled
                    compiled = self.static_graphs.wrap(compiled)
            if compile_model == "background":
                jobs = [self.static_graphs.build_all] if self.static_graphs else []
                self.background_compile = compiled_forward.BackgroundCompile(
                    model, compiled, compiled_forward.routed_eager_forward(model),
                    jobs=jobs).start()
                self.forward = self.background_compile.forward
            else:
                self.forward = compiled
                logger.info("forward: compiled decoder (compiled at warm-up or by the first pass)")
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.attention = choose_attention_backend(attention_backend, self.device, self.dtype)
        logger.info("decode attention: %s (%s)", self.attention.backend, self.attention.reason)
        cfg = model.config
        max_model_len = min(limits.max_model_len or cfg.max_position_embeddings,
                            cfg.max_position_embeddings)
        self.shape = ModelShape(cfg.num_hidden_layers, cfg.num_attention_heads,
                                cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size,
                                max_model_len)
        self.kv_dtype = resolve_kv_dtype(limits.kv_cache_dtype, self.dtype)
        element_size = self.kv_dtype.itemsize
        self.kv_capacity = kv_capacity(
            kv_elements_per_token(self.shape) * element_size, limits.max_num_seqs,
            max_model_len, limits.kv_cache_tokens, limits.kv_cache_memory, self.device)
        logger.info("KV cache capacity: %d tokens, %.2f GiB of %s (%s)", self.kv_capacity.tokens,
                    self.kv_capacity.gib, str(self.kv_dtype).removeprefix("torch."),
                    self.kv_capacity.reason)
        self.cache_limits = CacheLimits(limits.max_num_seqs, max_model_len,
                                        self.kv_capacity.tokens, self.kv_dtype,
                                        self.kv_capacity.memory_tokens)

    def build_static_graphs(self) -> None:
        """Build every fixed-shape graph now (`Engine.warm_up`), not in a first pass's time,
        and the dynamic graph's shapes, which the warm-up's small passes no longer reach."""
        if self.static_graphs is None or self.background_compile is not None:
            return
        from runtime import compiled_forward

        for shape in compiled_forward.PACKED_PASS_SHAPES:
            compiled_forward.build_graph(self._dynamic_forward, shape, self.device)
        self.static_graphs.build_all()

    def run(self, batch: ForwardBatch, kv_cache: KVCache, mask: object) -> SampleResult:
        """Forward `batch` over `kv_cache` with `mask`, let the layout commit, then sample."""
        with torch.inference_mode(), pass_sdpa_backends(self.device):
            hidden = self.forward(batch.input_ids, batch.positions, kv_cache.attention(batch),
                                  mask)
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.sample_indices)
            logits = None if self.static_graphs is None else self.static_graphs.logits(rows)
            if logits is None:
                logits = self.model.compute_logits(rows)
        kv_cache.commit(batch)
        return sample(logits, batch.sampled_requests)
