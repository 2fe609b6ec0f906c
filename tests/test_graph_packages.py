"""The store of compiled bucket packages: shared constants, unread weights, the released dense
copies, keys, eviction, the config keys, and the separate process that builds a served model's
packages. The buckets' tokens from packages are in tests/test_static_graphs.py."""

from __future__ import annotations

import contextlib
import json
import logging
import zipfile

import pytest
import torch

from runtime.engine import Engine
from runtime.graph_packages import PackageCacheSpec
from runtime.plugins import instantiate_scheduler
from runtime.static_graphs import PACKAGE_SETTINGS
from tests.test_compiled_forward import GREEDY, prompts, small_model
from tests.test_static_graphs import eager_tokens

pytestmark = pytest.mark.slow  # compiles and builds packages: started first under xdist


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
