"""Fixed-shape decode graphs (`static_decode_rows`): small passes on frozen, autotuned GEMMs.

The compiled decoder (`runtime.compiled_forward`) serves every pass size from one graph with
the token count dynamic, and calls each linear through an opaque op onto oneDNN's or MKL's
prepacked weights. At a few rows those GEMMs are far from the machine's rate. Compiled for one
row count with the weights frozen into the graph as constants, inductor's max-autotune picks
per weight shape between its own C++ GEMM template (a micro-kernel blocked for that exact
shape, the weight laid out once) and ATen's, and can fuse the neighbouring elementwise work.
On a 2-core AVX2 EPYC (float32, SmolLM2-135M shape, decoder with attention stubbed, docs/
benchmarks.md) this ran 1.50x / 1.36x / 1.34x / 1.10x / 1.04x faster than the oneDNN-packed
compiled decoder at 1 / 4 / 8 / 16 / 32 rows and level at 64; a frozen graph with the token
count dynamic did not (tuned for one size, 0.87-0.9x at 64 rows and in prefill).

So the small passes get graphs of fixed row counts, the buckets: a pass of n <= the largest
bucket tokens (a decode batch, or a small mixed pass) runs the smallest bucket >= n, its rows
padded with token 0 at position 0. Pad rows never reach the attention (the attention op runs
the pass's handle on the real rows only and hands zeros back for the rest) nor the sampler
(the graph's output is cut back to the real rows). Larger passes take the dynamic graph. That
is what a dense batch's fixed shapes buy on a CPU, the counterpart of a CUDA graph replay.

The LM head gets the same: the sampled rows' logits from a frozen head graph per bucket
(1.2-1.3x oneDNN's packed head at 1-4 rows, about 1 ms of a one-row step here).

Cost, stated at startup: each bucket's graphs hold their own copy of the linear weights (the
decoder's and the head's) in their packed layout, and they compile from a dense copy of those
weights kept beside the packed ones the rest of the engine runs (none for weights that are
dense already, such as a head tied to the embedding), so up to buckets + 1 copies of the
linear weights in all. Where the buckets come from packages and share one packed layout, as
all of `1 2 4 8 16 32 64` do for the 135M shape, that is one: a package's code reads the packed
forms only (each new package is probed to show it), so once every bucket is loaded the dense
copies are released and the twin with them. Each bucket compiles and autotunes for
about a minute on 2 cores for a 30-layer model. With a package cache (`static_graph_cache`,
`runtime.graph_packages`) that happens once per model: the bucket is saved as an AOTInductor
package and the next start loads it in about a second, and buckets whose packed weights are
the same bytes (inductor chose the same blocking) share one copy of them, on disk and in
memory.

A bucket is kept only where it is measured faster than the dynamic graph at its own row count:
right after it is built or loaded, both run a throwaway pass of that many rows, decoder and LM
head, alternately for `SPEED_CHECK_ROUNDS` rounds, and a bucket whose median paired ratio is
above 1 is dropped, logged with both times, its passes left to the dynamic graph. Nothing
makes a bucket faster by construction: autotuning picks each GEMM's kernel from one timing of
the candidates, a package keeps those picks for every later start, and at 1-2 rows on a 2-core
Zen 3 a bucket and the dynamic graph are about level (docs/benchmarks.md, forty-third session:
in eight starts the 2-row bucket was kept five times at 1.01-1.10x and dropped three times).

float32 and bfloat16 on CPU only: float64 (the exact parity tests) keeps the plain
path, and CUDA has its own graph replay to build.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from runtime.architectures.layers import Linear, RotaryEmbedding
from runtime.compiled_forward import compile_options, slot_free_rope_forward
from runtime.graph_packages import GraphPackages, PackageCacheSpec, model_key
from runtime.hardware import release_freed_memory
from runtime.linear_kernels import dense_weight

logger = logging.getLogger(__name__)

STATIC_DTYPES = (torch.float32, torch.bfloat16)
# Inductor settings for building a bucket's graph: the weights become constants, and each GEMM
# is timed against its candidates (inductor's C++ template, ATen) for the bucket's exact shape.
# (Its table of timings per GEMM is not printed: the build logs one line per bucket.)
FROZEN_GEMM_SETTINGS = {"freezing": True, "max_autotune": True,
                        "max_autotune_gemm_backends": "CPP,ATEN",
                        "autotune_num_choices_displayed": 0}
# Paired rounds of the check that keeps a bucket only where it beats the dynamic graph (0: no
# check, every built bucket serves). Seven cost a few seconds a bucket at startup.
SPEED_CHECK_ROUNDS = 7
# The same for an ahead-of-time package (`runtime.graph_packages`), less the display-only key,
# with the constants stored as files beside its shared library rather than inside it: loaded
# from the library, every weight would take memory twice (the graph keeps the parameters it
# was exported with beside their packed forms), and the library's copy cannot be freed.
PACKAGE_SETTINGS = {**{k: v for k, v in FROZEN_GEMM_SETTINGS.items()
                       if k != "autotune_num_choices_displayed"},
                    "aot_inductor.package_constants_in_so": False,
                    "aot_inductor.package_constants_on_disk_format": "pickle_weights"}


def static_rows_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why fixed-shape decode graphs cannot serve this model here, or None if they can."""
    if device.type != "cpu":
        return f"CPU only (the model is on {device.type})"
    if dtype not in STATIC_DTYPES:
        return f"float32 and bfloat16 only ({dtype} keeps the plain, exact path)"
    return None


def _dense_linear(linear: Linear) -> Linear:
    """`linear` again (its class and attributes, such as a fused linear's `output_sizes`) on
    its dense weight and `F.linear`: what inductor freezes and autotunes."""
    clone = copy.copy(linear)
    clone.__dict__.pop("forward", None)  # the compiled decoder's routing to the linear op
    clone.__dict__.pop("gated", None)  # and to its fused SwiGLU op
    clone._parameters = dict(linear._parameters)
    clone.weight = nn.Parameter(dense_weight(linear), requires_grad=False)
    clone.packed = clone.packed_by = None
    return clone


def dense_twin(model: nn.Module) -> nn.Module:
    """`model`'s module tree again, sharing every parameter and buffer, with each `Linear`
    (the decoder's routed through the compiled decoder's linear op, perhaps packed, and the LM
    head) replaced by `_dense_linear`'s copy over its dense weight (the same tensor when
    unpacked or shared, else a copy read back exactly from the packed one), and each rotary
    embedding's tables through the slot-free op, so a graph of it can outlive the process."""
    twins: dict[int, nn.Module] = {}

    def twin(module: nn.Module) -> nn.Module:
        if id(module) not in twins:
            if isinstance(module, Linear):
                twins[id(module)] = _dense_linear(module)
            else:
                clone = copy.copy(module)  # shares the parameter and buffer dicts
                clone._modules = {name: None if child is None else twin(child)
                                  for name, child in module._modules.items()}
                if isinstance(module, RotaryEmbedding):  # no slot number in the graph
                    clone.forward = slot_free_rope_forward(clone)
                twins[id(module)] = clone
        return twins[id(module)]

    return twin(model)


class _Decoder(nn.Module):
    """The twin's decoder as `torch.compile` takes it: the attention through the opaque op."""

    def __init__(self, twin: nn.Module, opaque_attention: object) -> None:
        super().__init__()
        self.twin = twin
        self._opaque = opaque_attention

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.twin(input_ids, positions, self._opaque, None)


class _Logits(nn.Module):
    """The twin's LM head as `torch.compile` takes it: the sampled rows' logits."""

    def __init__(self, twin: nn.Module) -> None:
        super().__init__()
        self.twin = twin

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.twin.compute_logits(hidden)


class StaticDecodeGraphs:
    """One frozen, fixed-shape compiled decoder per bucket row count, and the routing to them.

    `wrap(dynamic)` returns the forward the engine runs: a 1-D pass (the packed layouts' token
    rows) of at most `max(rows)` tokens runs the smallest built bucket that holds it, anything
    else `dynamic`; `logits(rows)` does the same for the LM head over the sampled rows, or
    returns None. `lazy` (``compile: true``): a bucket not yet built is built by the first pass
    that needs it, as the dynamic graph is (`Engine.warm_up` builds them all first); otherwise
    (``compile: background``) only `build` builds, on the compile thread, and passes take the
    dynamic graph until then.
    """

    def __init__(self, model: nn.Module, rows: tuple[int, ...], pass_state: Any,
                 opaque_attention: object, zero_attention: object, lazy: bool,
                 packages: PackageCacheSpec | None = None,
                 probe_attention: object | None = None) -> None:
        """`packages`: keep each bucket's graphs on disk there (`runtime.graph_packages`) and
        load them at the next start; None builds them in the process every time.
        `probe_attention`: a handle whose output carries its inputs' NaNs, with which a new
        package is probed for the dense copies its code never reads (then released once
        every bucket comes from a package); None keeps them."""
        self.rows = tuple(sorted(set(rows)))
        self.built: dict[int, float] = {}  # bucket -> seconds its graph took
        self.failed: dict[int, str] = {}  # bucket -> why
        self.passes: dict[int, int] = dict.fromkeys(self.rows, 0)  # passes each bucket ran
        # bucket -> (its pass, the dynamic graph's pass) in ms, from the speed check
        self.compared: dict[int, tuple[float, float]] = {}
        self._dynamic: Callable[..., torch.Tensor] | None = None  # set by `wrap`
        self._dynamic_logits: Callable[[torch.Tensor], torch.Tensor] = model.compute_logits
        self.released_bytes = 0  # dense copies dropped once every bucket came from a package
        self._lazy = lazy
        self._pass = pass_state
        # the C++ attention op (`_OpaqueAttention.native`), which runs decode plans itself;
        # packages that call it are kept apart from those that call the Python op
        self._native_attention = bool(getattr(opaque_attention, "native", False))
        self._zero = zero_attention
        self._probe = probe_attention
        self._packaged: set[int] = set()  # buckets whose graphs came from packages
        self._device = next(model.parameters()).device
        twin = dense_twin(model)
        own = {p.untyped_storage().data_ptr() for p in model.parameters()}
        # Weak references to the copies' storages, not their tensors: a view of one kept by
        # anything (torch.export leaves one of each weight alive in a process that built a
        # package) keeps the memory too.
        copies = [m.weight.untyped_storage() for m in twin.modules()
                  if isinstance(m, Linear) and m.weight.untyped_storage().data_ptr() not in own]
        self._dense_copies = [(StorageWeakRef(c), c.nbytes()) for c in copies]
        self._copy_pointers = {c.data_ptr() for c in copies}  # while they live
        del copies
        self._hidden_size = model.config.hidden_size
        self._dtype = next(model.parameters()).dtype
        on_cpu = self._device.type == "cpu"

        def compiled(module: nn.Module) -> Callable[..., torch.Tensor]:
            return torch.compile(module.eval(), dynamic=False, isolate_recompiles=True,
                                 options=compile_options(on_cpu))

        self._graphs = {n: compiled(_Decoder(twin, opaque_attention)) for n in self.rows}
        self._heads = {n: compiled(_Logits(twin)) for n in self.rows}
        self.packages = None
        self._twin_modules: tuple[nn.Module, nn.Module] | None = None
        if packages is not None and on_cpu:
            self._twin_modules = (_Decoder(twin, opaque_attention).eval(), _Logits(twin).eval())
            attention_op = "baton_kernels" if self._native_attention else "baton_runtime"
            key = model_key(twin, {**PACKAGE_SETTINGS, "attention_op": attention_op})
            self.packages = GraphPackages(packages, key, PACKAGE_SETTINGS)

    def bucket(self, tokens: int) -> int | None:
        """The bucket a pass of `tokens` tokens runs in, or None (the dynamic graph)."""
        for n in self.rows:
            if n >= tokens and n not in self.failed and (n in self.built or self._lazy):
                return n
        return None

    def build(self, rows: int) -> None:
        """Compile and autotune the bucket's graph on throwaway tokens (no engine state)."""
        if rows in self.built or rows in self.failed:
            return
        start = time.perf_counter()
        ids, positions = self._throwaway_tokens(rows)
        if self.packages is not None and self._from_packages(rows, ids, positions):
            self.built[rows] = time.perf_counter() - start
            self._packaged.add(rows)
            self._keep_if_faster(rows)
            self._release_dense_copies()
            return
        try:
            with torch.inference_mode():  # as `ModelRunner.run` runs the forward and head
                self._call(rows, ids, positions, self._zero, None, rows)
                hidden = torch.zeros(rows, self._hidden_size, dtype=self._dtype,
                                     device=self._device)
                with torch._inductor.config.patch(FROZEN_GEMM_SETTINGS):
                    self._heads[rows](hidden)
        except Exception as exc:  # anything inductor raises: the dynamic graph keeps serving
            self.failed[rows] = f"{type(exc).__name__}: {exc}"
            logger.warning("static_decode_rows: the %d-row graph failed to build (%s); passes "
                           "of that size take the dynamic graph", rows, self.failed[rows])
            self._release_dense_copies()
            return
        self.built[rows] = time.perf_counter() - start
        logger.info("static_decode_rows: %d-row graph built in %.1f s", rows, self.built[rows])
        self._keep_if_faster(rows)

    def _throwaway_tokens(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and positions for a pass of `rows` rows, made outside inference mode even
        when a lazy build runs inside a pass's: dynamo guards on the dispatch keys, so a graph
        traced on inference tensors does not match the layouts' tensors, and the first real
        pass compiled the bucket again without the frozen, autotuned settings. That graph ran
        its GEMMs on ATen's (MKL's generic matrix-vector code on an AMD CPU): a one-row step in
        37-45 ms against 22-24 (docs/benchmarks.md, forty-third session)."""
        with torch.inference_mode(False):
            ids = torch.zeros(rows, dtype=torch.long, device=self._device)
            positions = torch.arange(rows, dtype=torch.long, device=self._device)
        return ids, positions

    def _keep_if_faster(self, rows: int) -> None:
        """Drop the built bucket `rows` where a pass of that many rows, decoder and head, runs
        slower in it than in the dynamic graph (the median of `SPEED_CHECK_ROUNDS` paired,
        alternating rounds on throwaway tokens, attention stubbed in both)."""
        rounds = SPEED_CHECK_ROUNDS
        if not rounds or self._dynamic is None or rows not in self.built:
            return
        dynamic = self._dynamic
        ids, positions = self._throwaway_tokens(rows)

        def bucket_pass() -> None:
            with torch.inference_mode(), self._throwaway_pass(rows):
                hidden = self._graphs[rows](ids, positions)
                self._heads[rows](hidden.reshape(rows, -1))

        def dynamic_pass() -> None:
            with torch.inference_mode():
                hidden = dynamic(ids, positions, self._zero, None)
                self._dynamic_logits(hidden.reshape(rows, -1))

        try:
            times = paired_times(bucket_pass, dynamic_pass, rounds)
        except Exception as exc:  # the dynamic graph could not run it: nothing to set against
            logger.warning("static_decode_rows: the %d-row graph's speed check failed (%s: %s);"
                           " keeping it", rows, type(exc).__name__, exc)
            return
        ratio = statistics.median(b / d for b, d in times)
        mine = 1000 * statistics.median(b for b, _ in times)
        theirs = 1000 * statistics.median(d for _, d in times)
        self.compared[rows] = (mine, theirs)
        if ratio <= 1.0:
            logger.info("static_decode_rows: %d-row graph kept: %.1f ms a pass against %.1f in "
                        "the dynamic graph (medians), %.2fx as fast in the median of %d paired "
                        "rounds", rows, mine, theirs, 1 / ratio, rounds)
            return
        del self.built[rows]
        self._packaged.discard(rows)
        self.failed[rows] = (f"slower than the dynamic graph: {mine:.1f} against {theirs:.1f} ms "
                             f"a {rows}-row pass, {ratio:.2f}x its time in the median of "
                             f"{rounds} paired rounds")
        logger.warning("static_decode_rows: the %d-row graph is dropped, %s; passes of that "
                       "size take the dynamic graph", rows, self.failed[rows])

    def _from_packages(self, rows: int, ids: torch.Tensor, positions: torch.Tensor) -> bool:
        """The bucket's decoder and head from their packages (built first if missing); False,
        logged, where that fails: the bucket is then compiled in the process."""
        assert self.packages is not None and self._twin_modules is not None
        decoder, head = self._twin_modules
        hidden = torch.zeros(rows, self._hidden_size, dtype=self._dtype, device=self._device)
        built = len(self.packages.built)
        start = time.perf_counter()
        probing = (None if self._probe is None
                   else lambda: self._pass_state(self._probe, None, rows))
        try:
            graph = self.packages.load_or_build(f"decoder-{rows}", decoder, (ids, positions),
                                                lambda: self._throwaway_pass(rows), probing)
            head_graph = self.packages.load_or_build(f"head-{rows}", head, (hidden,),
                                                     contextlib.nullcontext, probing)
            with torch.inference_mode(), self._throwaway_pass(rows):
                graph(ids, positions)  # the first call of a loaded package sets it up
                head_graph(hidden)
        except Exception as exc:  # no compiler, an export or AOTInductor limit
            logger.warning("static_decode_rows: the %d-row graph's package failed (%s: %s); "
                           "compiling it in the process", rows, type(exc).__name__, exc)
            return False
        self._graphs[rows], self._heads[rows] = graph, head_graph
        how = "built and saved" if len(self.packages.built) > built else "loaded"
        logger.info("static_decode_rows: %d-row graph %s in %.1f s (%s, %.2f GiB on disk; "
                    "%.0f MiB of packed weights in memory for the buckets so far, shared "
                    "where their layouts coincide)", rows, how, time.perf_counter() - start,
                    self.packages.directory, self.packages.disk_bytes() / 2**30,
                    self.packages.constant_bytes / 2**20)
        return True

    def _release_dense_copies(self) -> None:
        """Drop the twin (and its dense copies of packed weights) once no bucket can need it:
        every bucket built or failed, every built one from packages whose graphs hold none of
        the copies (their probes showed them unread). Returned to the OS, not kept in the
        heap: 405 MiB of the 135M shape's resident memory in float32."""
        if (self.packages is None or self._twin_modules is None
                or any(r not in self.built and r not in self.failed for r in self.rows)
                or any(r not in self._packaged for r in self.built)):
            return
        held = {t.untyped_storage().data_ptr() for rows in self.built
                for runner in (self._graphs[rows], self._heads[rows])
                for t in runner.constants.values()}
        if held & self._copy_pointers:
            return
        size = self._alive_dense_copy_bytes()
        self._twin_modules = None
        for rows in self.failed:  # their compile wrappers hold the twin too
            self._graphs.pop(rows, None)
            self._heads.pop(rows, None)
        gc.collect()
        if self._alive_dense_copy_bytes():
            logger.info("static_decode_rows: the twin is dropped, but its dense weight copies "
                        "are still referenced (as in a process that built packages); they go "
                        "at the next start that loads them")
            return
        self.released_bytes = size
        release_freed_memory()
        if size:
            logger.info("static_decode_rows: every bucket came from a package: released the "
                        "%.0f MiB of dense weight copies they were frozen from", size / 2**20)

    def _alive_dense_copy_bytes(self) -> int:
        """The memory of the twin's dense copies still alive."""
        return sum(size for ref, size in self._dense_copies if not ref.expired())

    @contextlib.contextmanager
    def _pass_state(self, attn: Any, mask: Any, rows: int) -> Iterator[None]:
        """The pass state the attention op reads, set for one graph call and cleared after."""
        self._pass.enter(attn, mask, rows, native_op=self._native_attention)
        try:
            yield
        finally:
            self._pass.leave()

    def _throwaway_pass(self, rows: int) -> contextlib.AbstractContextManager:
        """The pass state for tracing or warming a graph: zero attention, no engine state."""
        return self._pass_state(self._zero, None, rows)

    def build_all(self) -> None:
        """Every bucket: their missing packages first built by a separate process where the
        packages say how to load the model there, then each loaded (or built here)."""
        self._build_missing_packages_apart()
        for rows in self.rows:
            self.build(rows)

    def packaged(self) -> set[int]:
        """The buckets whose graphs came from packages."""
        return set(self._packaged)

    def _build_missing_packages_apart(self) -> None:
        """Have `runtime.package_builder` build the packages no bucket has yet, so that what
        the build allocates goes with its process; the buckets then load them. Where it fails,
        `build` makes them here, as without it."""
        if self.packages is None or self.packages.spec.builder is None:
            return
        missing = tuple(rows for rows in self.rows
                        if rows not in self.built and rows not in self.failed
                        and not all(self.packages.has(f"{part}-{rows}")
                                    for part in ("decoder", "head")))
        if missing:
            from runtime.package_builder import build_apart

            spec = self.packages.spec
            if not build_apart(spec.builder, spec.root, spec.max_bytes, missing):
                logger.warning("static_decode_rows: building what is missing in this "
                               "process instead")

    def _call(self, rows: int, input_ids: torch.Tensor, positions: torch.Tensor, attn: Any,
              mask: Any, real: int) -> torch.Tensor:
        with self._pass_state(attn, mask, real):
            if rows in self.built:
                return self._graphs[rows](input_ids, positions)
            with torch._inductor.config.patch(FROZEN_GEMM_SETTINGS):
                return self._graphs[rows](input_ids, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits of `hidden`'s rows (the sampled ones, made in inference mode) from the
        built bucket that holds them, or None: the caller's LM head then."""
        tokens = hidden.shape[0]
        if not tokens:
            return None
        rows = next((n for n in self.rows if n >= tokens and n in self.built), None)
        if rows is None:
            return None
        if tokens < rows:
            hidden = torch.cat([hidden, hidden.new_zeros(rows - tokens, hidden.shape[1])])
        return self._heads[rows](hidden)[:tokens]

    def wrap(self, dynamic: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The engine's forward: a bucket's graph where one fits, else `dynamic`."""

        self._dynamic = dynamic

        def forward(input_ids: torch.Tensor, positions: torch.Tensor, attn: Any,
                    mask: Any) -> torch.Tensor:
            tokens = input_ids.shape[0]
            rows = self.bucket(tokens) if input_ids.dim() == 1 else None
            if rows is None:
                return dynamic(input_ids, positions, attn, mask)
            if rows not in self.built:  # lazy: the first pass of this bucket builds it
                self.build(rows)
                if rows not in self.built:
                    return dynamic(input_ids, positions, attn, mask)
            if tokens < rows:
                pad = rows - tokens
                # Normal tensors, as the layouts make a pass's (and `build` its throwaway
                # ones): dynamo guards on the dispatch keys, and an inference tensor made here
                # would not match the graph.
                with torch.inference_mode(False):
                    input_ids = torch.cat([input_ids, input_ids.new_zeros(pad)])
                    positions = torch.cat([positions, positions.new_zeros(pad)])
            self.passes[rows] += 1
            return self._call(rows, input_ids, positions, attn, mask, tokens)[:tokens]

        forward.static_graphs = self  # type: ignore[attr-defined]
        return forward


def paired_times(first: Callable[[], object], second: Callable[[], object], rounds: int
                 ) -> list[tuple[float, float]]:
    """Seconds of `first` and `second` in each of `rounds` rounds, alternating which runs
    first, after one untimed call of each: a paired sample of a noisy host's same moment."""
    first()
    second()
    times = []
    for i in range(rounds):
        pair = [0.0, 0.0]
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (first, second)[which]()
            pair[which] = time.perf_counter() - start
        times.append((pair[0], pair[1]))
    return times
