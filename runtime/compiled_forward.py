"""The compiled forward (`compile:`, docs/configuration.md): the decoder as one compiled graph.

In eager mode a decode step spends 15-25 ms on ~35 small ops per layer (norms, RoPE, SiLU,
residual adds, views) between the GEMMs. Compiling the whole decoder fuses them; two things
stay opaque custom ops so the graph neither breaks per layer nor loses the fast kernels:

- attention (`baton_runtime::attend`): it runs the pass's attention handle, which belongs to
  the scheduler's KV layout and changes every pass, so it cannot be traced;
- each linear: it runs the kernel `Linear.forward` runs (oneDNN or MKL prepacked weights,
  which inductor cannot trace, or `F.linear`). Where the engine's C++ kernels build
  (`runtime.attention_kernels`), the op is `baton_kernels::linear`, which looks the slot's
  weight up in a C++ table and calls the GEMM with no Python in between (the Python op,
  `baton_runtime::linear`, cost ~50 us per call: ~6 ms of a 55 ms one-row step here);
- the rotary tables (`baton_runtime::rope`): computed once per pass. Traced, inductor fused
  their `cos`/`sin` into every layer's RoPE kernel and recomputed them there (30 times per
  pass): 211 us per layer at 64 decode rows on a 2-core AVX2 host.

On CPU the graph is built with inductor's `cpp_wrapper`: the code that calls its kernels and
ops is C++ rather than Python (3-6% of a decode step at 1-32 rows on a 2-core AVX2 host, for
about 25 s more of the first, uncached compile).

The token count is a dynamic dimension, so one graph serves decode, prefill and mixed passes
of any size (one more for a one-token pass). Compiling both takes 35 s to two minutes for a
30-layer model on 2 cores, so it happens either at startup (`compile: true`, through
`Engine.warm_up`, before the server is ready) or in the background (`compile: background`,
`BackgroundCompile`: the engine serves with the eager forward at once and switches to the
compiled graph between two passes once both are built). Measured on a 2-core AVX2 CPU
(docs/benchmarks.md): batch-1 TPOT over HTTP 13-15% lower than eager, throughput at 32-64 rows
within 0-4%.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.library import Library

from runtime.architectures.layers import (
    FusedLinear,
    Linear,
    RotaryEmbedding,
    gated_product,
    rope_tables,
)
from runtime.attention_kernels import DecodePlan, NativeKernelUnavailable, load_native_kernel
from runtime.linear_kernels import packing_generation

logger = logging.getLogger(__name__)


class _PassState(threading.local):
    """The running pass's attention handle and mask, read by the attention op, and its real
    token count where a fixed-shape graph runs it padded (`runtime.static_graphs`).

    Where the C++ attention op is in use, a handle's `decode_plan()` (a decode-only pass) is
    handed to it for the pass (`kernels/attend_plan.cpp`), so the op runs the kernel without
    calling the handle back."""

    attn: Any = None
    mask: Any = None
    rows: int | None = None
    plan: DecodePlan | None = None

    def enter(self, attn: Any, mask: Any, rows: int | None = None,
              native_op: bool = False) -> None:
        """Set for one graph call; `native_op`: the graph calls the C++ attention op."""
        self.attn, self.mask, self.rows = attn, mask, rows
        offer = getattr(attn, "decode_plan", None) if native_op else None
        self.plan = offer() if offer is not None else None
        if self.plan is not None:
            p = self.plan
            torch.ops.baton_kernels.set_decode_plan(list(p.keys), list(p.values), p.offsets,
                                                    p.counts, p.key_stride, p.head_stride,
                                                    p.kv_heads)

    def leave(self) -> None:
        plan, self.plan = self.plan, None
        self.attn = self.mask = self.rows = None
        if plan is not None:
            seconds = torch.ops.baton_kernels.clear_decode_plan()
            if plan.on_done is not None:
                plan.on_done(seconds)


_PASS = _PassState()
_LINEARS: list[Linear] = []  # the linears of every compiled model, by slot
_ROTARIES: list[RotaryEmbedding] = []  # the rotary embeddings of every compiled model, by slot


# Declared with the low-level `Library` API rather than `torch.library.custom_op`: the latter
# adds autograd wrapping and an output-aliasing check to every call (~13 us each in a
# micro-benchmark; a 30-layer decoder makes ~150 calls per pass: about 0.6 ms of a 60 ms
# one-row step measured here, within this host's noise at 32 rows).
_LIB = Library("baton_runtime", "DEF")
_LIB.define("attend(int layer, Tensor q, Tensor k, Tensor v) -> Tensor")
_LIB.define("linear(int slot, Tensor x) -> Tensor")
_LIB.define("rope(int slot, Tensor positions, ScalarType dtype) -> (Tensor, Tensor)")
# The same tables from the inverse frequencies themselves, for graphs that outlive the process
# (`runtime.graph_packages`): a slot number means nothing in the next one.
_LIB.define("rope_tables(Tensor inv_freq, Tensor positions, ScalarType dtype) -> (Tensor, Tensor)")


def _attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    rows = _PASS.rows
    if rows is not None and rows < q.shape[0]:  # a padded fixed-shape pass: real rows only
        out = q.new_zeros(q.shape)
        out[:rows] = _PASS.attn.attend(layer, q[:rows], k[:rows], v[:rows], _PASS.mask)
        return out
    out = _PASS.attn.attend(layer, q, k, v, _PASS.mask).contiguous()
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    # The op's output may not alias its inputs; a layout may hand back a view of them.
    return out.clone() if out.untyped_storage().data_ptr() in inputs else out


def _linear(slot: int, x: torch.Tensor) -> torch.Tensor:
    return Linear.forward(_LINEARS[slot], x)


def _rope(slot: int, positions: torch.Tensor, dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding.forward(_ROTARIES[slot], positions, dtype)


def _fake_rope(slot: int, positions: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*positions.shape, 1, 2 * _ROTARIES[slot].inv_freq.numel())
    return (positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype))


def _fake_rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*positions.shape, 1, 2 * inv_freq.numel())
    return (positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype))


_LIB.impl("attend", _attend, "CompositeExplicitAutograd")
_LIB.impl("rope_tables", rope_tables, "CompositeExplicitAutograd")
torch.library.register_fake("baton_runtime::rope_tables", _fake_rope_tables, lib=_LIB)
_LIB.impl("linear", _linear, "CompositeExplicitAutograd")
_LIB.impl("rope", _rope, "CompositeExplicitAutograd")
torch.library.register_fake("baton_runtime::rope", _fake_rope, lib=_LIB)
torch.library.register_fake(
    "baton_runtime::attend", lambda layer, q, k, v: q.new_empty(q.shape), lib=_LIB)
torch.library.register_fake(
    "baton_runtime::linear",
    lambda slot, x: x.new_empty((*x.shape[:-1], _LINEARS[slot].out_features)), lib=_LIB)


class _OpaqueAttention:
    """Stands for the pass's handle inside the graph: `attend` becomes the custom op, the
    Python one or (`native`) the C++ one, which runs a decode plan itself and calls the Python
    op back for any other pass."""

    def __init__(self, native: bool = False) -> None:
        self.native = native

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Any) -> torch.Tensor:
        if self.native:
            return torch.ops.baton_kernels.attend(layer, q, k, v)
        return torch.ops.baton_runtime.attend(layer, q, k, v)


_OPAQUE = _OpaqueAttention()
_OPAQUE_NATIVE = _OpaqueAttention(native=True)


def _opaque_linear_forward(slot: int, native: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    if native:
        return lambda x: torch.ops.baton_kernels.linear(slot, x)
    return lambda x: torch.ops.baton_runtime.linear(slot, x)


def _opaque_gated_forward(slot: int, linear: FusedLinear, native: bool
                          ) -> Callable[[torch.Tensor, Callable], torch.Tensor]:
    """`FusedLinear.gated` through the slot ops, which look the packing up per call (the graph
    must not hold `linear.packed`: packing may change after the build and no guard would see
    it). With the C++ op, SwiGLU is one op (fused on the engine's sgemm, else the slot's linear
    and the product); otherwise, or for another activation, the linear op and the product."""
    def gated(x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if native and linear.swiglu_fusable(act):
            return torch.ops.baton_kernels.linear_swiglu(slot, x)
        return gated_product(linear(x), act)
    return gated


@functools.cache  # once per process, however many slot tables load the extension
def _register_native_fakes() -> None:
    torch.library.register_fake(
        "baton_kernels::attend", lambda layer, q, k, v: q.new_empty(q.shape))
    torch.library.register_fake(
        "baton_kernels::linear",
        lambda slot, x: x.new_empty((*x.shape[:-1], _LINEARS[slot].out_features)))
    torch.library.register_fake(
        "baton_kernels::linear_swiglu",
        lambda slot, x: x.new_empty((*x.shape[:-1], _LINEARS[slot].out_features // 2)))


_SLOT_KINDS = {None: 0, "onednn": 1, "mkl": 2, "native": 3}  # linear_slots.cpp's `Kind`


def compile_options(on_cpu: bool) -> dict[str, Any]:
    """Inductor options of every graph the engine compiles (the decoder, its static buckets).

    `cpp_wrapper` on CPU (module docstring). `guard_filter_fn` drops dynamo's guards on the
    model's modules, which it otherwise checks before every pass (parameters and module
    attributes: a 0.75 ms lookup; dropping them saved about 0.6 ms of a 23-25 ms one-row step
    on a 2-core AVX2 host, 2.5%). Nothing a graph reads from the modules changes after it is
    built: linears go through the slot ops (their packing is looked up per call), rotary
    tables through the rope op, and a model moved to another dtype or device is a new model
    with its own graphs. Guards on the pass's inputs (token count, dtype) stay.
    """
    options: dict[str, Any] = {"cpp_wrapper": on_cpu}
    skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if skip_module_guards is not None:  # torch >= 2.7
        options["guard_filter_fn"] = skip_module_guards
    return options


class _NativeSlots:
    """The C++ linear op's slot table, kept in step with `_LINEARS` and their packing."""

    def __init__(self) -> None:
        self.available: bool | None = None  # None: not tried yet
        self.state: tuple[int, int] = (-1, 0)  # (packing generation, slots) last registered

    def load(self) -> bool:
        """Build/load the kernels extension once; False (logged) where it cannot be built."""
        if self.available is None:
            try:
                load_native_kernel()
                _register_native_fakes()
                self.available = True
            except NativeKernelUnavailable as exc:
                logger.info("compiled linears: Python op (C++ kernels unavailable: %s)", exc)
                self.available = False
        return self.available

    def refresh(self) -> None:
        """Register every slot's current kernel tensor when packing or the slots changed."""
        state = (packing_generation(), len(_LINEARS))
        if state == self.state:
            return
        for slot, linear in enumerate(_LINEARS):
            kind = _SLOT_KINDS[linear.packed_by]  # None while `packed` is None
            torch.ops.baton_kernels.set_linear(
                slot, linear.weight if kind == 0 else linear.packed, linear.bias, kind,
                linear.out_features)
        self.state = state


_NATIVE_SLOTS = _NativeSlots()


def use_python_linear_op() -> None:
    """Decoders compiled from now on call `Linear.forward` through the Python op (which a
    benchmark can patch to replay the GEMMs) instead of the C++ one."""
    _NATIVE_SLOTS.available = False


def _opaque_rope_forward(slot: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return lambda positions, dtype: torch.ops.baton_runtime.rope(slot, positions, dtype)


def slot_free_rope_forward(rotary: RotaryEmbedding
                           ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`rotary`'s tables through the `rope_tables` op: eager's numbers, as the `rope` op
    gives, but with the frequencies in the graph rather than a process's slot number."""
    return lambda positions, dtype: torch.ops.baton_runtime.rope_tables(
        rotary.inv_freq.to(positions.device), positions, dtype)


def compile_decoder(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, Any, Any],
                                                   torch.Tensor]:
    """A drop-in for `model(input_ids, positions, attn, mask)` that runs the compiled graph.

    The decoder's linears are routed through the linear op (the LM head, outside the decoder,
    stays eager), its rotary embedding through the rope op. Call after the linear backend is
    applied: the op runs whatever kernel each `Linear` has then. One compiled graph per model:
    engines built over the same model (the bench's contenders) share it and its compiled
    shapes.
    """
    shared = getattr(model, "_compiled_decoder", None)
    if shared is not None:
        return shared
    on_cpu = next(model.parameters()).device.type == "cpu"
    native = on_cpu and _NATIVE_SLOTS.load()  # CUDA keeps the Python op (not measured there)
    for module in model.modules():
        if isinstance(module, Linear) and module is not getattr(model, "lm_head", None):
            slot = len(_LINEARS)
            _LINEARS.append(module)
            module.forward = _opaque_linear_forward(slot, native)
            if isinstance(module, FusedLinear):
                module.gated = _opaque_gated_forward(slot, module, native)
        elif isinstance(module, RotaryEmbedding):
            _ROTARIES.append(module)
            module.forward = _opaque_rope_forward(len(_ROTARIES) - 1)
    # Every model's decoder is this same lambda, one code object: without isolation dynamo
    # keeps one graph cache for all of them, and past `recompile_limit` (8 graphs, about four
    # models: a test run, a script comparing models) silently runs the rest eagerly.
    opaque = _OPAQUE_NATIVE if native else _OPAQUE
    compiled = torch.compile(lambda ids, pos: model(ids, pos, opaque, None), dynamic=True,
                             options=compile_options(on_cpu), isolate_recompiles=True)
    # The model's float attributes (the norms' `eps`) as constants of the graph. Why: with
    # `dynamic=True` dynamo makes a float that Python arithmetic reads an input, so each pass
    # of a 16-bit model turned its 61 norms' `eps` (30 layers) into 0-d float64 tensors in
    # Python and handed them to the norm kernels: the step 1.01-1.03x as long at 16-64 rows
    # (2-core Zen 4, in one process). None changes once the graph is built (`compile_options`
    # drops the module guards too), and the bucket graphs (`dynamic=False`) had them as
    # constants already. Dynamo reads the setting only while it traces, so every call enters
    # it (about 6 us): recompiles too.
    constant_floats = torch._dynamo.config.patch(specialize_float=True)

    def forward(input_ids: torch.Tensor, positions: torch.Tensor, attn: Any,
                mask: Any) -> torch.Tensor:
        if native:
            _NATIVE_SLOTS.refresh()
        _PASS.enter(attn, mask, native_op=native)
        try:
            with constant_floats:
                return compiled(input_ids, positions)
        finally:
            _PASS.leave()

    if native:  # before any pass: the engine may run the routed eager forward at once
        _NATIVE_SLOTS.refresh()
    model._compiled_decoder = forward
    return forward


def static_decode_graphs(model: nn.Module, rows: tuple[int, ...], lazy: bool,
                         packages: Any = None):
    """`runtime.static_graphs.StaticDecodeGraphs` for `model` (after `compile_decoder`), or
    None (logged) where they cannot serve it; logs what they cost in memory. Like the compiled
    decoder, one set per model and buckets: engines over the same model share the graphs.
    `packages`: where to keep them on disk (`runtime.graph_packages.PackageCacheSpec`)."""
    from runtime.static_graphs import StaticDecodeGraphs, static_rows_unsupported

    rows = tuple(sorted(set(rows)))
    key = (rows, lazy, packages)
    shared = getattr(model, "_static_decode_graphs", {})
    if key in shared:
        return shared[key]

    weight = next(model.parameters())
    why = static_rows_unsupported(weight.device, weight.dtype)
    if why is not None:
        logger.warning("static_decode_rows ignored: %s", why)
        return None
    linears = {id(m): m for m in model.modules() if isinstance(m, Linear)}.values()
    size = sum(m.in_features * m.out_features for m in linears) * weight.element_size()
    dense = sum(m.in_features * m.out_features for m in linears
                if m.packed is not None and not m.weight.numel()) * weight.element_size()
    logger.info("static_decode_rows %s: fixed-shape graphs with frozen GEMMs (%s); up to "
                "%.0f MiB more (a copy of the linear weights per bucket, one for all buckets "
                "whose packed layouts coincide when they come from packages; %.0f MiB of "
                "dense copies to freeze them from, released when every bucket comes from a "
                "package)", ", ".join(map(str, rows)),
                "built at warm-up or by the first pass" if lazy else "built in the background",
                (len(rows) * size + dense) / 2**20, dense / 2**20)
    native = bool(_NATIVE_SLOTS.available)  # as the dynamic graph: see compile_decoder
    graphs = StaticDecodeGraphs(model, rows, _PASS, _OPAQUE_NATIVE if native else _OPAQUE,
                                _ZeroAttention(), lazy, packages, _PassThroughAttention())
    model._static_decode_graphs = {**shared, key: graphs}
    return graphs


def routed_eager_forward(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, Any, Any],
                                                       torch.Tensor]:
    """`model` run eagerly after `compile_decoder` routed its linears through the linear op:
    what serves while the graph compiles in the background (the same kernels, so the same
    numbers), keeping the op's slot table in step with packing as the compiled forward does."""
    native = bool(_NATIVE_SLOTS.available)

    def forward(input_ids: torch.Tensor, positions: torch.Tensor, attn: Any,
                mask: Any) -> torch.Tensor:
        if native:
            _NATIVE_SLOTS.refresh()
        return model(input_ids, positions, attn, mask)

    return forward


class _ZeroAttention:
    """A pass's attention handle for compiling without an engine: zeros shaped like q."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Any) -> torch.Tensor:
        return torch.zeros_like(q)


class _PassThroughAttention:
    """A pass's attention handle for probing a graph without an engine: q itself, plus zero
    times the sum of k and v, so a NaN in any of the three reaches the output."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Any) -> torch.Tensor:
        return q + (k.sum() + v.sum()) * 0


# What selects a compiled graph: per tensor its dtype and, per dimension, 1 or "more"
# (dynamo specialises sizes 0 and 1 and keeps the rest symbolic), for input_ids and positions.
PassShape = tuple[tuple[torch.dtype, tuple[int, ...]], ...]


def pass_shape(input_ids: torch.Tensor, positions: torch.Tensor) -> PassShape:
    """The key of the graph a pass with these tensors runs."""
    return tuple((t.dtype, tuple(min(size, 2) for size in t.shape))
                 for t in (input_ids, positions))


# The packed layouts' passes (BATON, Orca, the template): several tokens (prefill, mixed and
# multi-row decode passes share the dynamic graph) and one token. Others are built when seen.
PACKED_PASS_SHAPES: tuple[PassShape, ...] = tuple(
    ((torch.long, (n,)), (torch.long, (n,))) for n in (2, 1))


def build_graph(forward: Callable[..., torch.Tensor], shape: PassShape,
                device: torch.device) -> None:
    """Compile `forward` (from `compile_decoder`) for one pass shape on throwaway tokens,
    touching no engine state: no KV layout, no scheduler, no request."""
    (ids_dtype, ids_sizes), (pos_dtype, pos_sizes) = shape
    # 3 for "more than one"; made outside inference mode, as a layout makes a pass's tensors
    # (dynamo guards on their dispatch keys: an inference tensor builds graphs no pass matches).
    ids = torch.ones([3 if n > 1 else n for n in ids_sizes], dtype=ids_dtype, device=device)
    pos_sizes = [3 if n > 1 else n for n in pos_sizes]
    positions = torch.zeros(pos_sizes, dtype=pos_dtype, device=device)
    if pos_sizes:
        positions += torch.arange(pos_sizes[-1], dtype=pos_dtype, device=device)
    with torch.inference_mode():  # as `ModelRunner.run` runs the forward
        forward(ids, positions, _ZeroAttention(), None)


# Python's GIL switch interval while a graph builds (the default is 5 ms). Dynamo traces in
# Python; the serving thread releases the GIL in every torch op and waits up to this long to
# take it back, thousands of times per eager pass. Measured on 2 cores (64 requests arriving
# as the compile starts): 0.68-0.73x of eager throughput at 5 ms, 0.84x at 50 us and at 10 us,
# the compile no slower (docs/benchmarks.md).
GIL_SWITCH_WHILE_COMPILING = 5e-5


class BackgroundCompile:
    """The compiled decoder built on a daemon thread while the engine serves eagerly.

    `forward` stands for the model: a pass whose shape (`pass_shape`) has its graph built runs
    the compiled decoder, any other runs the eager one and, the first time its shape is seen,
    queues that graph. The packed layouts' shapes are queued at start. So the serving thread
    never waits on a compile, a layout with other shapes (the static batch's `(B, T)`) still
    gets its graphs, and a pass never mixes the two forwards. A failed build (no C++ compiler,
    an inductor bug) is logged once, and that shape stays eager. While a graph builds, the
    GIL switch interval is `GIL_SWITCH_WHILE_COMPILING` (restored after).
    """

    def __init__(self, model: nn.Module, compiled: Callable[..., torch.Tensor],
                 eager: Callable[..., torch.Tensor],
                 shapes: tuple[PassShape, ...] = PACKED_PASS_SHAPES,
                 jobs: list[Callable[[], None]] | None = None) -> None:
        self.built: dict[PassShape, float] = {}  # shape -> seconds its graph took
        self.failed: dict[PassShape, str] = {}  # shape -> why
        self.passes = {"compiled": 0, "eager": 0}  # how the engine's passes ran
        self._compiled, self._eager = compiled, eager
        self._device = next(model.parameters()).device
        self._seen: set[PassShape] = set()
        self._queue: list[PassShape | Callable[[], None]] = []
        self._changed = threading.Condition()
        self._initial = shapes
        self._jobs = list(jobs or ())  # further builds, after the initial shapes (each logs)
        self._thread = threading.Thread(target=self._run, name="compile-decoder", daemon=True)

    def start(self) -> BackgroundCompile:
        logger.info("compile: background: compiling the decoder; the eager forward serves "
                    "until it is ready")
        for shape in self._initial:
            self._request(shape)
        with self._changed:
            self._queue.extend(self._jobs)
        self._thread.start()
        return self

    @property
    def state(self) -> str:
        """`compiling` while a graph is queued or building, else `ready` or `failed`."""
        with self._changed:
            if self._queue:
                return "compiling"
            return "failed" if self.failed else "ready"

    @property
    def pending(self) -> int:
        """Pass shapes whose graph is queued or building."""
        with self._changed:
            return len(self._queue)

    def wait(self, timeout: float | None = None) -> bool:
        """True once every queued graph is built (or failed) within `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue, timeout)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Any,
                mask: Any) -> torch.Tensor:
        shape = pass_shape(input_ids, positions)
        if shape in self.built:
            self.passes["compiled"] += 1
            return self._compiled(input_ids, positions, attn, mask)
        if shape not in self._seen:
            self._request(shape)
        self.passes["eager"] += 1
        return self._eager(input_ids, positions, attn, mask)

    def _request(self, shape: PassShape) -> None:
        with self._changed:
            if shape not in self._seen:
                self._seen.add(shape)
                self._queue.append(shape)
                self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._queue))
                shape = self._queue[0]
            start = time.perf_counter()
            normal = sys.getswitchinterval()
            sys.setswitchinterval(GIL_SWITCH_WHILE_COMPILING)
            try:
                if callable(shape):  # a job (`jobs`): handles its own failures
                    shape()
                else:
                    build_graph(self._compiled, shape, self._device)
            except Exception as exc:  # anything inductor raises: this shape stays eager
                self.failed[shape] = f"{type(exc).__name__}: {exc}"
                logger.warning("compile: background: compiling the decoder failed (%s); the "
                               "eager forward keeps serving", self.failed[shape])
            else:
                if not callable(shape):
                    self.built[shape] = time.perf_counter() - start
            finally:
                sys.setswitchinterval(normal)
            with self._changed:
                self._queue.pop(0)
                if not self._queue and self.built:
                    logger.info("compile: background: the compiled decoder serves (%d graph(s) "
                                "built in %.1f s)", len(self.built), sum(self.built.values()))
                self._changed.notify_all()
