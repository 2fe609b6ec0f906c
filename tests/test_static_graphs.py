"""`static_decode_rows`: fixed-shape graphs with frozen GEMMs give the eager engine's tokens."""

from __future__ import annotations

import contextlib
import json
import logging
import zipfile

import pytest
import torch

from runtime import graph_packages
from runtime.engine import Engine
from runtime.graph_packages import PackageCacheSpec
from runtime.plugins import instantiate_scheduler
from runtime.static_graphs import FROZEN_GEMM_SETTINGS, PACKAGE_SETTINGS, StaticDecodeGraphs
from tests.test_compiled_forward import GREEDY, prompts, small_model

pytestmark = pytest.mark.slow  # compiles and builds packages: started first under xdist
# The tests of the module's package store run on one xdist worker, in order: the first builds.
SHARES_PACKAGES = pytest.mark.xdist_group("tests/test_static_graphs.py::packages")


@pytest.fixture
def cpp_gemms_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen GEMMs on inductor's C++ template only, which computes from its own packed copy.

    Autotuning may pick ATen's GEMM instead, which reads the dense weight. At these tiny
    shapes the two time alike, so the pick follows the machine's load (under a parallel run
    it went to ATen three times in three): tests that need a packed copy, or the dense weights
    unread, fix it.
    """
    for settings in (FROZEN_GEMM_SETTINGS, PACKAGE_SETTINGS):
        monkeypatch.setitem(settings, "max_autotune_gemm_backends", "CPP")


def eager_tokens(scheduler: str) -> list[list[int]]:
    engine = Engine(small_model(), None, instantiate_scheduler(scheduler, {}), scheduler)
    return [r.output_token_ids for r in engine.generate(prompts(), GREEDY)]


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> PackageCacheSpec:
    """One package directory for the module: the first engine builds, the next ones load."""
    return PackageCacheSpec(tmp_path_factory.mktemp("static-graphs"), 2**40)


@SHARES_PACKAGES
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


@SHARES_PACKAGES
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


@SHARES_PACKAGES
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


def test_packages_with_the_same_packed_weights_share_one_stored_copy(tmp_path,
                                                                    cpp_gemms_only) -> None:
    """Two packages whose packed constants are the same bytes (here the same frozen GEMM under
    two names, as buckets get when inductor picks one blocking for both) store them once and
    load them as one tensor, counted once; each still computes its module's output."""
    from runtime.graph_packages import GraphPackages

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False), torch.nn.ReLU()).eval()
    x = torch.randn(2, 64)
    packages = GraphPackages(PackageCacheSpec(tmp_path, 2**40), "key", PACKAGE_SETTINGS)
    first = packages.load_or_build("first", module, (x,), contextlib.nullcontext)
    second = packages.load_or_build("second", module, (x,), contextlib.nullcontext)
    assert packages.built == ["first", "second"]
    store = list((packages.directory / "constants").iterdir())
    own = set(module.state_dict())
    packed = {name: t for name, t in first.constants.items() if name not in own}
    assert packed and len(store) == len(packed)  # the second package added nothing
    assert {name: t for name, t in second.constants.items() if name not in own}.keys() == \
        packed.keys()
    assert all(second.constants[name] is tensor for name, tensor in packed.items())
    assert packages.constant_bytes == sum(t.untyped_storage().nbytes() for t in packed.values())
    for name in own & first.constants.keys():  # the module's own tensors, not copies
        assert first.constants[name].data_ptr() == module.state_dict()[name].data_ptr()
    with torch.inference_mode():
        expected = module(x)
        torch.testing.assert_close(first(x), expected)
        torch.testing.assert_close(second(x), expected)


def test_a_package_lists_the_tensors_its_code_never_reads(tmp_path, monkeypatch,
                                                          cpp_gemms_only) -> None:
    """A frozen GEMM computes from its packed weight: the probe finds the original unread
    (a NaN copy of it leaves the output bit for bit the same), and a load hands a one-element
    stand-in for it; the embedding, which the graph does read, is kept. Without a probe
    nothing is listed and every tensor is the module's own."""
    from runtime.graph_packages import GraphPackages

    monkeypatch.setattr(GraphPackages, "min_unread_bytes", 0)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Embedding(32, 64), torch.nn.Linear(64, 96),
                                 torch.nn.ReLU()).eval()
    ids = torch.arange(4)
    packages = GraphPackages(PackageCacheSpec(tmp_path, 2**40), "key", PACKAGE_SETTINGS)
    probed = packages.load_or_build("probed", module, (ids,), contextlib.nullcontext,
                                    contextlib.nullcontext)
    with zipfile.ZipFile(packages.directory / "probed.pt2") as archive:
        unread = json.loads(archive.read(next(n for n in archive.namelist()
                                              if n.endswith("/baton_unread.json"))))
    assert "1.weight" in unread and "0.weight" not in unread
    assert probed.constants["1.weight"].untyped_storage().nbytes() == 4  # a stand-in
    assert probed.constants["0.weight"].data_ptr() == module[0].weight.data_ptr()
    with torch.inference_mode():
        torch.testing.assert_close(probed(ids), module(ids))

    plain = packages.load_or_build("plain", module, (ids,), contextlib.nullcontext)
    assert all(plain.constants[name].data_ptr() == tensor.data_ptr()
               for name, tensor in module.state_dict().items() if name in plain.constants)


def test_buckets_from_packages_release_the_dense_copies(tmp_path, monkeypatch,
                                                        cpp_gemms_only) -> None:
    """With the linears packed for oneDNN, the twin the buckets are frozen from holds dense
    copies of their weights. Once every bucket's graphs come from packages that never read
    them, the twin is dropped; a restart that loads the packages frees the copies (a process
    that built them may keep them: torch.export leaves views of the weights alive, and then
    nothing is counted as released). The tokens stay eager's."""
    from runtime.graph_packages import GraphPackages

    monkeypatch.setattr(GraphPackages, "min_unread_bytes", 0)  # the small model's linears
    spec = PackageCacheSpec(tmp_path, 2**40)
    for expected_built in (["decoder-8", "head-8"], []):
        engine = Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton",
                        linear_backend="onednn", compile_model=True, static_decode_rows=(8,),
                        static_graph_cache=spec)
        engine.warm_up()
        graphs = engine.runner.static_graphs
        assert graphs.packages.built == expected_built
        assert graphs._dense_copies and graphs._twin_modules is None
        size = sum(m.in_features * m.out_features * 4 for m in engine.model.modules()
                   if getattr(m, "packed", None) is not None and not m.weight.numel())
        alive = graphs._alive_dense_copy_bytes()
        if expected_built:  # consistent: counted as released only if the memory went
            assert (graphs.released_bytes, alive) in ((size, 0), (0, size))
        else:
            assert graphs.released_bytes == size and alive == 0
        assert [r.output_token_ids for r in engine.generate(prompts(), GREEDY)] == \
            eager_tokens("baton")
        assert graphs.passes[8] > 0


def test_a_different_model_gets_its_own_packages(tmp_path) -> None:
    """The key covers the weights: one changed weight is another directory."""
    from runtime.graph_packages import model_key

    settings = {"freezing": True}
    model = small_model()
    key = model_key(model, settings)
    assert model_key(small_model(), settings) == key
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1
    assert model_key(model, settings) != key
    assert model_key(small_model(), {"freezing": False}) != key


def test_eviction_removes_the_least_recently_used_models(tmp_path) -> None:
    import os

    from runtime.graph_packages import GraphPackages

    for age, name in enumerate(["old", "newer", "current"]):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "decoder-1.pt2").write_bytes(b"x" * 1000)
        os.utime(directory, (1000 + age, 1000 + age))
    packages = GraphPackages(PackageCacheSpec(tmp_path, 2500), "current", {})
    packages.evict()
    assert sorted(d.name for d in tmp_path.iterdir()) == ["current", "newer"]
    GraphPackages(PackageCacheSpec(tmp_path, 10), "current", {}).evict()
    assert [d.name for d in tmp_path.iterdir()] == ["current"]  # in use: kept


def test_static_graph_cache_is_a_config_key_and_a_flag(tmp_path) -> None:
    from runtime.cli import build_parser, engine_overrides
    from runtime.config import ConfigError, build_config
    from runtime.graph_packages import cache_spec, default_root

    parse = build_parser().parse_args
    args = parse(["serve", "--compile", "--static-decode-rows", "4",
                  "--static-graph-cache", str(tmp_path)])
    config = build_config(overrides=engine_overrides(args))
    assert config.static_graph_cache == str(tmp_path) and config.static_graph_cache_gib == 16
    spec = cache_spec(config.static_graph_cache, config.static_graph_cache_gib)
    assert spec.root == tmp_path and spec.max_bytes == 16 * 2**30
    args = parse(["serve", "--static-graph-cache", "false"])
    assert build_config(overrides=engine_overrides(args)).static_graph_cache is False
    assert cache_spec(False) is None and cache_spec(True).root == default_root()
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("static_graph_cache_gib: 0\n")
    with pytest.raises(ConfigError, match="static_graph_cache_gib: must be a number of GiB > 0"):
        build_config(yaml_file)
    yaml_file.write_text("static_graph_cache: 3\n")
    with pytest.raises(ConfigError, match="static_graph_cache"):
        build_config(yaml_file)


def test_a_served_model_has_its_missing_packages_built_by_a_separate_process(
        tmp_path, model_dir, caplog) -> None:
    """`create_engine` (what `serve` runs) hands its model's folder and dtype to
    `runtime.package_builder`, which builds the missing bucket packages in a child process;
    the server then loads them (it compiles none itself) and gives the eager tokens."""
    from runtime.bootstrap import create_engine
    from runtime.config import build_config
    from runtime.package_builder import ModelSource

    def engine(cache: str, **extra) -> Engine:
        config = build_config(overrides={"model": str(model_dir), "dtype": "float32",
                                         "compile": True, "static_decode_rows": [4],
                                         "static_graph_cache": cache, **extra})
        return create_engine(config)

    prompts_ = [[(5 * i + 3 * j) % 500 + 3 for j in range(3 + 4 * i)] for i in range(3)]
    eager = build_config(overrides={"model": str(model_dir), "dtype": "float32"})
    expected = [r.output_token_ids for r in create_engine(eager).generate(prompts_, GREEDY)]

    with caplog.at_level(logging.INFO):
        served = engine(str(tmp_path / "graphs"))
    graphs = served.runner.static_graphs
    spec = graphs.packages.spec
    assert spec.builder == ModelSource(model_dir, "float32")
    assert "package builder finished" in caplog.text
    assert graphs.packages.loaded == ["decoder-4", "head-4"] and not graphs.packages.built
    assert graphs.packaged() == {4}
    assert [r.output_token_ids for r in served.generate(prompts_, GREEDY)] == expected
    assert graphs.passes[4] > 0

    # A second builder while another holds the model directory's build lock waits for it,
    # then loads what is there rather than building it again.
    import fcntl
    import threading
    import time

    from runtime import package_builder

    holder = open(graphs.packages.directory / ".build.lock", "w")  # noqa: SIM115
    fcntl.flock(holder, fcntl.LOCK_EX)
    threading.Timer(2.0, holder.close).start()  # closing releases it
    caplog.clear()
    start = time.perf_counter()
    with caplog.at_level(logging.INFO):
        assert package_builder.build(spec.builder, spec.root, spec.max_bytes, (4,))
    assert time.perf_counter() - start >= 2.0
    assert "another process is building the packages" in caplog.text
    assert "4-row graph loaded" in caplog.text and "built and saved" not in caplog.text



def test_a_package_builder_that_fails_leaves_the_buckets_to_this_process(tmp_path, caplog,
                                                                        capfd) -> None:
    """The child cannot load the model (here: no such folder): logged, and `build` then
    makes the buckets in the serving process, as without a builder."""
    from runtime.package_builder import ModelSource

    spec = PackageCacheSpec(tmp_path, 2**40, ModelSource(tmp_path / "no-such-model", "float32"))
    engine = Engine(small_model(), None, instantiate_scheduler("baton", {}), "baton",
                    compile_model=True, static_decode_rows=(2,), static_graph_cache=spec)
    graphs = engine.runner.static_graphs
    built: list[int] = []
    graphs.build = built.append  # the in-process build, covered by the tests above
    with caplog.at_level(logging.INFO):
        graphs.build_all()
    assert "building the packages of buckets 2 in a separate process" in caplog.text
    assert "package builder exited with status 1" in caplog.text
    child = capfd.readouterr().err  # the child's log, on this process's stderr
    assert "[package builder]" in child and "model folder not found" in child
    assert "building what is missing in this process instead" in caplog.text
    assert built == [2]
