"""`static_decode_rows`: fixed-shape graphs with frozen GEMMs give the eager engine's tokens."""

from __future__ import annotations

import logging
import time
import zipfile

import pytest
import torch

from runtime import graph_packages, static_graphs
from runtime.engine import Engine
from runtime.graph_packages import PackageCacheSpec
from runtime.plugins import instantiate_scheduler
from runtime.static_graphs import StaticDecodeGraphs
from tests.test_compiled_forward import GREEDY, prompts, small_model

pytestmark = pytest.mark.slow  # compiles and builds packages: started first under xdist


def eager_tokens(scheduler: str) -> list[list[int]]:
    engine = Engine(small_model(), None, instantiate_scheduler(scheduler, {}), scheduler)
    return [r.output_token_ids for r in engine.generate(prompts(), GREEDY)]


@pytest.fixture(scope="module")
def package_directory(tmp_path_factory: pytest.TempPathFactory) -> PackageCacheSpec:
    return PackageCacheSpec(tmp_path_factory.mktemp("static-graphs"), 2**40)


@pytest.fixture
def packages(package_directory: PackageCacheSpec, cpp_gemms_only) -> PackageCacheSpec:
    """One package directory for the module: the first engine builds, the next ones load.
    Its GEMMs are inductor's C++ template (`cpp_gemms_only`, part of the store's key): the
    damaged store below needs both packages to hold packed constants."""
    return package_directory


@pytest.mark.parametrize("scheduler", ["baton", "orca"])
def test_buckets_serve_padded_passes_with_the_eager_tokens(scheduler: str,
                                                           packages: PackageCacheSpec) -> None:
    """Five decode rows run in the 8-row graphs (three pad rows), the decoder's and the LM
    head's, from their packages (built by the first engine, loaded by the second). The graphs
    are ready after warm-up, and traffic compiles nothing more."""
    from torch._dynamo.utils import counters

    engine = Engine(small_model(), None, instantiate_scheduler(scheduler, {}), scheduler,
                    compile_model=True, static_decode_rows=(8,), static_graph_cache=packages)
    graphs = engine.runner.static_graphs
    assert isinstance(graphs, StaticDecodeGraphs) and graphs.rows == (8,)
    engine.warm_up()
    assert set(graphs.built) == {8} and not graphs.failed
    assert sorted(graphs.packages.built + graphs.packages.loaded) == ["decoder-8", "head-8"]
    before = counters["stats"]["unique_graphs"]
    tokens = [r.output_token_ids for r in engine.generate(prompts(), GREEDY)]
    assert counters["stats"]["unique_graphs"] == before
    assert graphs.passes[8] > 0  # five rows padded to eight
    assert tokens == eager_tokens(scheduler)
    with torch.inference_mode():  # the head's bucket graph against the model's own head
        hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
        logits = graphs.logits(hidden)
        torch.testing.assert_close(logits, engine.model.compute_logits(hidden))
        assert graphs.logits(hidden[:0]) is None and graphs.logits(torch.zeros(9, 64)) is None


@pytest.mark.parametrize("scheduler", ["baton", "orca"])
def test_a_padded_bucket_pass_runs_its_decode_plan_in_the_cpp_attention_op(
        native_kernel, scheduler: str, packages: PackageCacheSpec) -> None:
    """The buckets' graphs (from packages) call the C++ attention op too: a decode-only pass
    padded to the bucket runs the layout's decode plan there, pad rows zeroed, without the
    Python handle; only the passes with prompts call it back. The tokens are the eager ones."""
    from tests.test_compiled_forward import _op_calls

    engine = Engine(small_model(), None, instantiate_scheduler(scheduler, {}), scheduler,
                    compile_model=True, static_decode_rows=(8,), static_graph_cache=packages)
    engine.warm_up()
    graphs = engine.runner.static_graphs
    calls = _op_calls(engine)  # three prompts: their decode rows padded to eight
    layers = 2
    assert graphs.passes[8] >= 8
    assert calls["baton_kernels::attend"] // layers >= 10
    assert 0 < calls["baton_runtime::attend"] // layers <= 3
    assert [r.output_token_ids for r in engine.generate(prompts(), GREEDY)] == \
        eager_tokens(scheduler)


def test_background_compile_builds_the_buckets_after_the_dynamic_graph() -> None:
    engine = Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton",
                    compile_model="background", static_decode_rows=(8,))
    graphs = engine.runner.static_graphs
    first = [r.output_token_ids for r in engine.generate(prompts(), GREEDY)]  # while building
    assert engine.runner.background_compile.wait(timeout=600)
    assert engine.runner.background_compile.state == "ready"
    assert set(graphs.built) == {8}
    served = graphs.passes[8]
    assert [r.output_token_ids for r in engine.generate(prompts(), GREEDY)] == first
    assert graphs.passes[8] > served
    assert first == eager_tokens("baton")


def test_a_bucket_that_fails_to_build_leaves_its_passes_to_the_dynamic_graph(
        monkeypatch, caplog) -> None:
    def broken(self, *args, **kwargs):
        raise RuntimeError("inductor fell over")

    monkeypatch.setattr(StaticDecodeGraphs, "_call", broken)
    engine = Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton",
                    compile_model=True, static_decode_rows=(8,))
    with caplog.at_level(logging.WARNING, logger="runtime.static_graphs"):
        engine.warm_up()
    assert "8-row graph failed to build (RuntimeError: inductor fell over)" in caplog.text
    graphs = engine.runner.static_graphs
    assert graphs.bucket(5) is None and not graphs.built
    assert [r.output_token_ids for r in engine.generate(prompts(), GREEDY)] == \
        eager_tokens("baton")


def slowed(fn, seconds: float):
    """`fn` taking `seconds` longer per call."""

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slow


def test_a_bucket_serves_only_while_it_beats_the_dynamic_graph(monkeypatch, caplog) -> None:
    """The startup check times the bucket and the dynamic graph on a pass of the bucket's
    rows: the bucket is kept where the dynamic graph is the slower one, and dropped, logged
    with both times, once the bucket is; its passes then go to the dynamic graph, with the
    same tokens."""
    monkeypatch.setattr(static_graphs, "SPEED_CHECK_ROUNDS", 3)
    engine = Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton",
                    compile_model=True, static_decode_rows=(8,))
    graphs = engine.runner.static_graphs
    fast_dynamic = graphs._dynamic
    graphs._dynamic = slowed(fast_dynamic, 0.05)  # only the check calls it through here
    with caplog.at_level(logging.INFO, logger="runtime.static_graphs"):
        engine.warm_up()
    mine, theirs = graphs.compared[8]
    assert set(graphs.built) == {8} and not graphs.failed and mine < theirs
    assert "8-row graph kept" in caplog.text
    expected = eager_tokens("baton")
    assert [r.output_token_ids for r in engine.generate(prompts(), GREEDY)] == expected
    served = graphs.passes[8]
    assert served > 0

    graphs._dynamic = fast_dynamic
    graphs._graphs[8] = slowed(graphs._graphs[8], 0.05)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.static_graphs"):
        graphs._keep_if_faster(8)
    mine, theirs = graphs.compared[8]
    assert mine > theirs and not graphs.built
    assert graphs.failed[8].startswith("slower than the dynamic graph")
    assert "8-row graph is dropped, slower than the dynamic graph" in caplog.text
    assert graphs.bucket(5) is None and graphs.logits(torch.zeros(5, 64)) is None
    assert [r.output_token_ids for r in engine.generate(prompts(), GREEDY)] == expected
    assert graphs.passes[8] == served


def test_a_lazy_build_traces_on_the_tensors_a_pass_brings() -> None:
    """A bucket built lazily by the first pass that needs it runs inside that pass's
    inference mode; its throwaway tokens must still be normal tensors, as the layouts make a
    pass's: traced on inference tensors, the graph failed dynamo's guards at the first real
    pass, which compiled it again without the frozen, autotuned settings (a one-row step 1.7x
    slower on the 135M shape)."""
    engine = Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton",
                    compile_model=True, static_decode_rows=(8,))
    with torch.inference_mode():
        ids, positions = engine.runner.static_graphs._throwaway_tokens(8)
    assert not ids.is_inference() and not positions.is_inference()
    assert ids.tolist() == [0] * 8 and positions.tolist() == list(range(8))


def test_float64_keeps_the_plain_path(caplog) -> None:
    model = small_model().to(torch.float64)
    with caplog.at_level(logging.WARNING, logger="runtime.compiled_forward"):
        engine = Engine(model, None, instantiate_scheduler("baton", {}), "baton",
                        compile_model=True, static_decode_rows=(4,))
    assert engine.runner.static_graphs is None
    assert "static_decode_rows ignored: float32 and bfloat16 only" in caplog.text


def test_static_decode_rows_is_a_config_key_and_a_flag(tmp_path) -> None:
    from runtime.cli import build_parser, engine_overrides
    from runtime.config import ConfigError, build_config

    parse = build_parser().parse_args
    args = parse(["serve", "--compile", "--static-decode-rows", "4", "1", "4"])
    assert build_config(overrides=engine_overrides(args)).static_decode_rows == (1, 4)
    config = tmp_path / "c.yaml"
    config.write_text("compile: background\nstatic_decode_rows: [8, 2]\n")
    assert build_config(config).static_decode_rows == (2, 8)
    with pytest.raises(ConfigError, match="static_decode_rows: needs compile"):
        build_config(overrides={"static_decode_rows": [4]})
    for bad in ([0], 4, ["4"], [True]):
        with pytest.raises(ConfigError, match="static_decode_rows.*(expects|expected a list)"):
            build_config(overrides={"compile": True, "static_decode_rows": bad})
    with pytest.raises(ValueError, match="static_decode_rows: needs compile"):
        Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton",
               static_decode_rows=(4,))


def test_packages_are_built_once_then_loaded_by_the_next_start(
        packages: PackageCacheSpec, caplog) -> None:
    """The first engine over these weights compiles the bucket's packages (here, or in the
    test above); a second model with the same weights (a restart: its rotary embeddings get
    new op slots) loads them, compiling nothing, and gives the eager tokens. An unreadable
    package is rebuilt, not fatal."""
    spec = packages

    def engine(scheduler: str) -> Engine:
        engine = Engine(small_model(), None, instantiate_scheduler(scheduler, {}), scheduler,
                        compile_model=True, static_decode_rows=(8,), static_graph_cache=spec)
        engine.warm_up()
        return engine

    first = engine("baton")
    packages = first.runner.static_graphs.packages
    assert sorted(packages.built + packages.loaded) == ["decoder-8", "head-8"]
    assert sorted(p.name for p in packages.directory.iterdir()) == ["constants",
                                                                   "decoder-8.pt2",
                                                                   "head-8.pt2"]
    stored = {p.stem for p in (packages.directory / "constants").iterdir()}
    assert stored and all(p.suffix == ".pt" for p in (packages.directory / "constants").iterdir())
    for name in ("decoder-8.pt2", "head-8.pt2"):  # neither the model's weights nor packed ones
        with zipfile.ZipFile(packages.directory / name) as archive:
            assert not [n for n in archive.namelist() if "/weights/weight_" in n]

    second = engine("orca")
    graphs = second.runner.static_graphs
    assert graphs.packages.directory == packages.directory
    assert graphs.packages.loaded == ["decoder-8", "head-8"] and not graphs.packages.built
    assert [r.output_token_ids for r in second.generate(prompts(), GREEDY)] == \
        eager_tokens("orca")
    assert graphs.passes[8] > 0
    with torch.inference_mode():
        hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(graphs.logits(hidden), second.model.compute_logits(hidden))
    # The packed constants both engines name are one tensor each in this process.
    assert graphs.packages.constant_digests == stored
    assert graphs.packages.constant_bytes > 0
    first_constants = _packed_constants(first.runner.static_graphs)
    second_constants = _packed_constants(graphs)
    assert first_constants and first_constants.keys() == second_constants.keys()
    assert all(first_constants[k] is second_constants[k] for k in first_constants)

    head = packages.directory / "head-8.pt2"
    head.write_bytes(head.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.WARNING, logger="runtime.graph_packages"):
        third = engine("baton")
    assert "head-8.pt2 unreadable" in caplog.text
    assert third.runner.static_graphs.packages.built == ["head-8"]
    assert third.runner.static_graphs.packages.loaded == ["decoder-8"]

    # The store damaged (one file's bytes changed, same size) and lost (the others), in a new
    # process (nothing loaded from it yet): both packages are rebuilt, the store rewritten.
    graph_packages._LOADED.clear()
    damaged, *lost = sorted((packages.directory / "constants").iterdir())
    damaged.write_bytes(damaged.read_bytes()[::-1])
    for constant in lost:
        constant.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.graph_packages"):
        fourth = engine("orca")
    assert "decoder-8.pt2 unreadable" in caplog.text and "head-8.pt2 unreadable" in caplog.text
    assert sorted(fourth.runner.static_graphs.packages.built) == ["decoder-8", "head-8"]
    used = fourth.runner.static_graphs.packages.constant_digests
    assert used and all(  # rewritten intact (the same digests unless autotuning chose anew)
        graph_packages._sha1_of((packages.directory / "constants" / f"{d}.pt").read_bytes())
        == d for d in used)
    assert [r.output_token_ids for r in fourth.generate(prompts(), GREEDY)] == \
        eager_tokens("orca")


def _packed_constants(graphs: StaticDecodeGraphs) -> dict[tuple[int, str], torch.Tensor]:
    """The store's constants each bucket's loaded graphs hold, by (bucket, name)."""
    model_names = {name for runner in (*graphs._graphs.values(), *graphs._heads.values())
                   for name in runner.constants if name.startswith("twin.")}
    return {(rows, name): tensor for rows in graphs.built
            for runner in (graphs._graphs[rows], graphs._heads[rows])
            for name, tensor in runner.constants.items() if name not in model_names}
