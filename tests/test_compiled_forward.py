"""`compile: true`: the compiled decoder gives the eager engine's greedy tokens, per scheduler."""

from __future__ import annotations

import collections
import sys

import pytest
import torch

from runtime.api import hookimpl as runtime_hookimpl
from runtime.architectures import build_model
from runtime.engine import Engine
from runtime.model_config import ModelConfig
from runtime.plugins import instantiate_scheduler
from runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.slow  # compiles: started first under xdist

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def small_model(seed: int = 3) -> torch.nn.Module:
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=96, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                      max_position_embeddings=128, tie_word_embeddings=True, qkv_bias=True)
    model = build_model(cfg).init_weights(seed, std=0.3)
    return model.to(torch.float32).eval().requires_grad_(False)


def prompts() -> list[list[int]]:
    return [[(5 * i + 3 * j) % 96 for j in range(3 + 4 * i)] for i in range(5)]


@pytest.mark.parametrize("scheduler", ["baton", "orca", "static"])
def test_compiled_decoder_gives_the_eager_tokens(scheduler: str) -> None:
    from torch._dynamo.utils import counters

    def run(compile_model: bool) -> list[list[int]]:
        engine = Engine(small_model(), None, instantiate_scheduler(scheduler, {}), scheduler,
                        compile_model=compile_model)
        return [r.output_token_ids for r in engine.generate(prompts(), GREEDY)]

    compiled_before = counters["stats"]["unique_graphs"]
    compiled = run(True)
    assert counters["stats"]["unique_graphs"] > compiled_before  # really compiled, not eager
    assert compiled == run(False)


def test_compile_is_a_config_key_and_a_flag(tmp_path) -> None:
    from runtime.cli import build_parser, engine_overrides
    from runtime.config import ConfigError, RuntimeConfig, build_config

    assert RuntimeConfig().compile is False
    parse = build_parser().parse_args
    assert engine_overrides(parse(["generate", "--compile", "--prompt", "x"]))["compile"] is True
    assert engine_overrides(parse(["serve", "m", "--compile", "false"]))["compile"] is False
    assert engine_overrides(parse(["serve", "--compile", "background"]))["compile"] == "background"
    assert engine_overrides(parse(["serve"]))["compile"] is None  # the config decides
    with pytest.raises(SystemExit):
        parse(["serve", "--compile", "yes"])
    config = tmp_path / "c.yaml"
    config.write_text("compile: background\n")
    assert build_config(config).compile == "background"
    config.write_text("compile: true\n")
    assert build_config(config).compile is True
    with pytest.raises(ConfigError, match="compile: expected true, false or background"):
        build_config(overrides={"compile": "yes"})


@pytest.mark.parametrize("scheduler", ["baton", "static"])
def test_background_compile_serves_eagerly_then_compiled(scheduler: str) -> None:
    """`compile: background`: the engine serves at once with the eager forward, then with the
    compiled graphs, with the eager tokens throughout. Shapes the packed layouts make are
    built from the start, others (the static batch's `(B, T)`) when first seen; once built,
    traffic compiles nothing more (the serving thread never compiles)."""
    from torch._dynamo.utils import counters

    eager = [r.output_token_ids for r in Engine(
        small_model(), None, instantiate_scheduler(scheduler, {}), scheduler,
    ).generate(prompts(), GREEDY)]
    switch_interval = sys.getswitchinterval()
    engine = Engine(small_model(), None, instantiate_scheduler(scheduler, {}), scheduler,
                    compile_model="background")
    background = engine.runner.background_compile

    def traffic() -> list[list[int]]:  # pairs, long prompts, then a one-token solo
        tokens = [r.output_token_ids for r in engine.generate(prompts(), GREEDY)]
        engine.generate([[5]], GREEDY)
        return tokens

    assert traffic() == eager
    assert background.wait(300) and background.state == "ready" and not background.failed
    assert traffic() == eager
    assert background.wait(300)  # shapes first seen by that traffic
    graphs, passes = counters["stats"]["unique_graphs"], dict(background.passes)
    assert traffic() == eager
    assert counters["stats"]["unique_graphs"] == graphs and background.state == "ready"
    assert background.passes["compiled"] > passes["compiled"]
    assert background.passes["eager"] == passes["eager"]  # every later pass ran compiled
    assert sys.getswitchinterval() == switch_interval  # shortened only while building


def test_a_failing_background_compile_keeps_serving_eagerly(monkeypatch, caplog) -> None:
    import runtime.compiled_forward as compiled_forward

    def broken(forward, shape, device):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(compiled_forward, "build_graph", broken)
    engine = Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton",
                    compile_model="background")
    background = engine.runner.background_compile
    assert background.wait(60) and background.state == "failed"
    assert "C++ compiler" in caplog.text and "eager forward keeps serving" in caplog.text
    tokens = [r.output_token_ids for r in engine.generate(prompts(), GREEDY)]
    assert tokens == [r.output_token_ids for r in Engine(
        small_model(), None, instantiate_scheduler("baton", {}), "baton",
    ).generate(prompts(), GREEDY)]
    assert background.passes["compiled"] == 0 and background.passes["eager"] > 0


class _StepCounter:
    """An observer: counts the steps and finished requests it is told about."""

    def __init__(self) -> None:
        self.steps = self.finished = 0

    @runtime_hookimpl
    def on_step_end(self, stats) -> None:
        self.steps += 1

    @runtime_hookimpl
    def on_request_finished(self, request) -> None:
        self.finished += 1


@pytest.mark.parametrize("scheduler", ["baton", "static"])
def test_warm_up_compiles_every_pass_shape_before_serving(scheduler: str) -> None:
    """After `warm_up`, mixed traffic (solo rows, pairs, long prompts) compiles nothing new,
    and observers never saw the throwaway requests."""
    from torch._dynamo.utils import counters

    observer = _StepCounter()
    engine = Engine(small_model(), None, instantiate_scheduler(scheduler, {}), scheduler,
                    observers=(observer,), compile_model=True)
    assert engine.warm_up() > 0
    assert (observer.steps, observer.finished, engine.num_steps) == (0, 0, 0)
    graphs = counters["stats"]["unique_graphs"]
    engine.generate(prompts(), GREEDY)
    engine.generate(prompts()[3:4], GREEDY)
    engine.generate([[5]], GREEDY)
    assert counters["stats"]["unique_graphs"] == graphs
    assert observer.finished == 7 and observer.steps > 0


def test_warm_up_refuses_a_busy_engine() -> None:
    engine = Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton")
    engine.add_request([1, 2, 3], GREEDY)
    with pytest.raises(RuntimeError, match="idle"):
        engine.warm_up()


def test_a_failing_compile_names_the_setting(model_dir, monkeypatch) -> None:
    """No C++ compiler (or an inductor bug): startup fails saying to drop --compile."""
    import runtime.compiled_forward as compiled_forward
    from runtime.bootstrap import create_engine
    from runtime.config import RuntimeConfig

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(compiled_forward.torch, "compile", broken_compile)
    config = RuntimeConfig(model=str(model_dir), scheduler="baton", compile=True, num_threads=1)
    with pytest.raises(RuntimeError, match=r"compile: true.*C\+\+ compiler.*without --compile"):
        create_engine(config)


def test_warm_up_leaves_a_fresh_layout() -> None:
    """Orca's variant timings from the warm-up (inflated by compiling) do not carry over."""
    engine = Engine(small_model(), None, instantiate_scheduler("orca", {}), "orca")
    warmed = engine.kv_cache
    engine.warm_up()
    assert warmed.chooser.samples["fused"]  # the warm-up did time decode passes
    assert engine.kv_cache is not warmed
    assert engine.kv_cache.is_empty() and not engine.kv_cache.chooser.samples["fused"]
    assert [r.output_token_ids for r in engine.generate(prompts(), GREEDY)] == [
        r.output_token_ids for r in Engine(small_model(), None, instantiate_scheduler("orca", {}),
                                           "orca").generate(prompts(), GREEDY)]


def test_warm_up_empties_batons_buffer_in_place() -> None:
    """BATON's layout is reset, not made again: the buffer faulted in at startup is the one it
    serves from (no second buffer faulted in), and it starts empty with its counters at zero."""
    engine = Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton")
    warmed, buffer = engine.kv_cache, engine.kv_cache.k.data_ptr()
    engine.warm_up()
    assert engine.kv_cache is warmed and warmed.k.data_ptr() == buffer
    assert warmed.is_empty() and not warmed.buckets and warmed.copies == type(warmed.copies)()
    assert [r.output_token_ids for r in engine.generate(prompts(), GREEDY)] == [
        r.output_token_ids for r in Engine(small_model(), None, instantiate_scheduler("baton", {}),
                                           "baton").generate(prompts(), GREEDY)]


def test_a_failing_layout_reset_names_the_scheduler(monkeypatch) -> None:
    from runtime.scheduling import SchedulerError

    engine = Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton")

    def broken_reset() -> bool:
        raise ValueError("cannot reset")

    monkeypatch.setattr(engine.kv_cache, "reset", broken_reset)
    with pytest.raises(SchedulerError, match=r"baton.*kv_cache.reset\(\) failed.*cannot reset"):
        engine.warm_up()


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_compiled_decoder_serves_every_architecture(arch: str, tmp_path) -> None:
    """GPT-2 (learned positions, LayerNorm, no GQA) and Qwen3 (q/k norms, head_dim != hidden /
    heads) compile too, with the eager tokens."""
    from runtime.loader import load_model
    from tests.model_factory import make_hf_model_dir

    path = make_hf_model_dir(tmp_path, arch, seed=5)

    def run(compile_model: bool) -> list[list[int]]:
        model = load_model(path, dtype="float32")
        engine = Engine(model, None, instantiate_scheduler("baton", {}), "baton",
                        compile_model=compile_model)
        tokens = [[(7 * i + 3 * j) % 300 for j in range(2 + 5 * i)] for i in range(4)]
        return [r.output_token_ids for r in engine.generate(tokens, GREEDY)]

    assert run(True) == run(False)


def _ops_run(engine: Engine) -> set[str]:
    """Names of the ops one decode-heavy generate ran (from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(prompts()[:2], GREEDY)
    return {event.key for event in prof.key_averages()}


def test_compiled_linears_run_as_one_cpp_op_with_the_eager_tokens(native_kernel) -> None:
    """Where the C++ kernels build, every decoder linear is `baton_kernels::linear` (no
    Python per call); the tokens are the eager engine's."""
    eager = Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton")
    compiled = Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton",
                      compile_model=True)
    ops = _ops_run(compiled)
    assert "baton_kernels::linear" in ops and "baton_runtime::linear" not in ops
    want = [r.output_token_ids for r in eager.generate(prompts(), GREEDY)]
    assert [r.output_token_ids for r in compiled.generate(prompts(), GREEDY)] == want


def _op_calls(engine: Engine) -> collections.Counter[str]:
    """How many times each op ran in one decode-heavy generate (from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(prompts()[:3], GREEDY)
    return collections.Counter({e.key: e.count for e in prof.key_averages()})


@pytest.mark.parametrize("scheduler", ["baton", "orca"])
def test_decode_passes_attend_in_the_cpp_op_without_the_python_handle(native_kernel,
                                                                       scheduler: str) -> None:
    """Where the C++ kernels build, the graph's attention is `baton_kernels::attend`: a
    decode-only pass runs its layout's decode plan there (the decode kernel, no Python per
    layer); a pass with prompts calls the layout's handle back through the Python op. The
    tokens are the eager engine's."""
    eager = Engine(small_model(), None, instantiate_scheduler(scheduler, {}), scheduler)
    compiled = Engine(small_model(), None, instantiate_scheduler(scheduler, {}), scheduler,
                      compile_model=True)
    calls = _op_calls(compiled)
    layers = 2
    passes = calls["baton_kernels::attend"] // layers
    called_back = calls["baton_runtime::attend"] // layers
    # 3 prompts, 10 tokens each: a few passes hold prompts, the other 9-10 are decode-only
    assert 0 < called_back <= 3 and passes - called_back >= 8
    want = [r.output_token_ids for r in eager.generate(prompts(), GREEDY)]
    assert [r.output_token_ids for r in compiled.generate(prompts(), GREEDY)] == want


def test_orca_times_its_decode_attention_run_in_the_cpp_op(native_kernel) -> None:
    """Orca's scheduler and `attention: auto` read each pass's decode-attention seconds: a
    pass whose decode plan ran in the C++ op reports the seconds the kernel took there."""
    engine = Engine(small_model(), None, instantiate_scheduler("orca", {}), "orca",
                    compile_model=True)
    engine.generate(prompts()[:3], GREEDY)
    cache = engine.kv_cache
    sample_calls = []
    cache.chooser.record = lambda variant, seconds, rows: sample_calls.append((variant, seconds))
    for request in prompts()[:3]:
        engine.add_request(request, GREEDY)
    while engine.has_unfinished():
        engine.step()
    fused = [seconds for variant, seconds in sample_calls if variant == "fused"]
    assert fused and all(seconds > 0 for seconds in fused)


@pytest.mark.parametrize(("dtype", "fused_op"), [(torch.float32, "sgemm_swiglu"),
                                               (torch.bfloat16, "bf16_swiglu")])
def test_compiled_swiglu_is_one_op_fused_on_the_native_gemm(native_kernel, dtype,
                                                              fused_op: str) -> None:
    """With the engine's GEMM (the float32 sgemm, or the bfloat16 one), the MLP's gate-and-up
    linear and SwiGLU's product run as one `baton_kernels::linear_swiglu` call (no
    `(N, 2 x inter)` tensor); the tokens are the eager engine's, which fuses the same way."""
    from runtime.linear_kernels import packing_supported

    if not packing_supported("native", dtype, torch.device("cpu")):
        pytest.skip(f"the engine's GEMM for {dtype} does not build here")
    eager = Engine(small_model().to(dtype), None, instantiate_scheduler("baton", {}), "baton",
                   linear_backend="native")
    compiled = Engine(small_model().to(dtype), None, instantiate_scheduler("baton", {}), "baton",
                      linear_backend="native", compile_model=True)
    ops = _ops_run(compiled)
    assert "baton_kernels::linear_swiglu" in ops and f"baton_kernels::{fused_op}" not in ops
    assert f"baton_kernels::{fused_op}" in _ops_run(eager)
    want = [r.output_token_ids for r in eager.generate(prompts(), GREEDY)]
    got = [r.output_token_ids for r in compiled.generate(prompts(), GREEDY)]
    if dtype == torch.float32:
        assert got == want
    else:  # inductor rounds the fused norms and residuals to bfloat16 at other points than
        # eager does, so a near tie may flip a token and the rest of its request
        agreeing = sum(next((j for j, (a, b) in enumerate(zip(g, w, strict=True)) if a != b),
                            len(w)) for g, w in zip(got, want, strict=True))
        assert agreeing >= 0.8 * sum(map(len, want)), (got, want)


@pytest.mark.parametrize("backend", ["onednn", "mkl", "native"])
def test_the_cpp_linear_table_follows_packing_changes(native_kernel, backend: str) -> None:
    """Packing after compiling empties the dense weights the C++ table held: the table is
    refreshed before the next pass (a stale entry would fail on a 0-element weight)."""
    from runtime.linear_kernels import pack_linears, packing_supported, unpack_linears

    if not packing_supported(backend, torch.float32, torch.device("cpu")):
        pytest.skip(f"{backend} cannot pack float32 weights here")
    want = [r.output_token_ids for r in Engine(
        small_model(), None, instantiate_scheduler("baton", {}), "baton",
        linear_backend="torch").generate(prompts(), GREEDY)]
    model = small_model()
    engine = Engine(model, None, instantiate_scheduler("baton", {}), "baton",
                    linear_backend="torch", compile_model=True)
    assert [r.output_token_ids for r in engine.generate(prompts(), GREEDY)] == want
    pack_linears(model, backend)
    assert [r.output_token_ids for r in engine.generate(prompts(), GREEDY)] == want
    unpack_linears(model)
    assert [r.output_token_ids for r in engine.generate(prompts(), GREEDY)] == want


def test_without_the_cpp_kernels_the_linears_take_the_python_op(monkeypatch, caplog) -> None:
    """No C++ compiler: the compiled decoder still runs, its linears through the Python op."""
    import runtime.compiled_forward as compiled_forward
    from runtime.attention_kernels import NativeKernelUnavailable

    def no_compiler() -> None:
        raise NativeKernelUnavailable("RuntimeError: no C++ compiler")

    monkeypatch.setattr(compiled_forward, "_NATIVE_SLOTS", compiled_forward._NativeSlots())
    monkeypatch.setattr(compiled_forward, "load_native_kernel", no_compiler)
    caplog.set_level("INFO", logger="runtime.compiled_forward")
    engine = Engine(small_model(), None, instantiate_scheduler("static", {}), "static",
                    compile_model=True)
    ops = _ops_run(engine)
    assert "baton_runtime::linear" in ops and "baton_kernels::linear" not in ops
    assert "Python op (C++ kernels unavailable: RuntimeError: no C++ compiler)" in caplog.text
    want = Engine(small_model(), None, instantiate_scheduler("static", {}), "static")
    assert [r.output_token_ids for r in engine.generate(prompts(), GREEDY)] == [
        r.output_token_ids for r in want.generate(prompts(), GREEDY)]


def test_many_compiled_models_in_one_process_all_stay_compiled() -> None:
    """Every model's decoder is one code object: without isolated caches dynamo would count
    all models' graphs against one recompile limit and run later models eagerly (it says so
    only in a warning). With the limit lowered to 3, four models still compile (each compiles
    at least one graph, so without isolation the fourth would run eagerly)."""
    import logging

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    # `config.patch`, not monkeypatch: undoing a monkeypatch deletes the config entry (later
    # compiles then fail on "torch._dynamo.config.recompile_limit does not exist").
    collect, dynamo_log = Collect(), logging.getLogger("torch._dynamo")  # does not propagate
    dynamo_log.addHandler(collect)
    try:
        with torch._dynamo.config.patch(recompile_limit=3):
            for i, scheduler in enumerate(["baton", "orca", "static", "baton"]):
                engine = Engine(small_model(i), None, instantiate_scheduler(scheduler, {}),
                                scheduler, compile_model=True)
                engine.generate(prompts()[:2], GREEDY)
    finally:
        dynamo_log.removeHandler(collect)
    assert not [m for m in collect.messages if "recompile_limit" in m]


def test_pending_graphs_are_a_metric_read_at_scrape_time() -> None:
    """`runtime:compile_pending_graphs` follows the background compile's queue even while the
    engine is idle (no step updates it), and is 0 without a background compile."""
    from prometheus_client import generate_latest

    from runtime.server.metrics import ServerMetrics

    class Queue:
        pending = 2

    def scraped(metrics: ServerMetrics) -> float:
        for line in generate_latest(metrics.registry).decode().splitlines():
            if line.startswith("runtime:compile_pending_graphs{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("metric missing")

    metrics = ServerMetrics("m", "baton")
    assert scraped(metrics) == 0
    queue = Queue()
    metrics.watch_compile(queue)
    assert scraped(metrics) == 2
    queue.pending = 0
    assert scraped(metrics) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_compiled_rope_rotates_each_half_with_the_eager_arithmetic(dtype) -> None:
    """Compiled, `apply_rope` rotates the halves one by one (inductor's `roll` is a gather);
    each element's arithmetic is eager's, so float32 and float64 match bit for bit, and
    bfloat16 is the float32 result rounded once (inductor keeps a fused kernel's
    intermediates in float32)."""
    from runtime.architectures.layers import apply_rope, rope_tables

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, 16, generator=gen)[:, 1:4]  # (tok, H, D) with a row stride, as qkv's
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    cos, sin = rope_tables(inv_freq, torch.arange(7) * 5, dtype)
    x = x.to(dtype)
    compiled = torch.compile(apply_rope, dynamic=False, fullgraph=True)(x, cos, sin)
    if dtype == torch.bfloat16:
        wide = apply_rope(x.float(), cos.float(), sin.float())
        assert torch.equal(compiled, wide.to(dtype))
    else:
        assert torch.equal(compiled, apply_rope(x, cos, sin))
    if dtype == torch.float64:  # and it is HF's x * cos + rotate_half(x) * sin
        rotated = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
        plain_sin = torch.cat((-sin[..., :8], sin[..., 8:]), dim=-1)  # the table, unsigned
        assert torch.equal(compiled, x * cos + rotated * plain_sin)


def test_the_norms_eps_are_constants_of_the_compiled_graph() -> None:
    """With `dynamic=True` dynamo would make each norm's float `eps` a graph input, rebuilt as a
    tensor in Python before every pass; the compiled decoder keeps them constants instead.
    Read from the code dynamo runs before the graph (what it looks up by name)."""
    import inspect

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    model = small_model().to(torch.bfloat16)  # its norms add `eps` in Python (float32: an op)
    engine = Engine(model, None, instantiate_scheduler("baton", {}), "baton", compile_model=True)
    engine.generate(prompts()[:2], GREEDY)
    compiled = inspect.getclosurevars(model._compiled_decoder).nonlocals["compiled"]
    entries = _debug_get_cache_entry_list(compiled._torchdynamo_orig_callable.__code__)
    assert entries  # the graphs are there to look at
    for entry in entries:
        assert "eps" not in entry.code.co_names
        assert "_as_tensor_fullprec" not in entry.code.co_names
