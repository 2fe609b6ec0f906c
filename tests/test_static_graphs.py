"""`static_decode_rows`: fixed-shape graphs with frozen GEMMs give the eager engine's tokens."""

from __future__ import annotations

import logging

import pytest
import torch

from runtime.engine import Engine
from runtime.plugins import instantiate_scheduler
from runtime.static_graphs import StaticDecodeGraphs
from tests.test_compiled_forward import GREEDY, prompts, small_model


def eager_tokens(scheduler: str) -> list[list[int]]:
    engine = Engine(small_model(), None, instantiate_scheduler(scheduler, {}), scheduler)
    return [r.output_token_ids for r in engine.generate(prompts(), GREEDY)]


@pytest.mark.parametrize("scheduler", ["baton", "orca"])
def test_buckets_serve_padded_passes_with_the_eager_tokens(scheduler: str) -> None:
    """Five decode rows run in the 8-row graphs (three pad rows), the decoder's and the LM
    head's. The graphs compile at warm-up, and traffic compiles nothing more."""
    from torch._dynamo.utils import counters

    engine = Engine(small_model(), None, instantiate_scheduler(scheduler, {}), scheduler,
                    compile_model=True, static_decode_rows=(8,))
    graphs = engine.runner.static_graphs
    assert isinstance(graphs, StaticDecodeGraphs) and graphs.rows == (8,)
    engine.warm_up()
    assert set(graphs.built) == {8} and not graphs.failed
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
