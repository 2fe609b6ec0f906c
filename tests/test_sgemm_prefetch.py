"""The sgemm's prefetch settings (spread, slicing), measured at startup: they change no output
bit, and the engine keeps the settings its probe measured faster."""

import dataclasses
import itertools
import logging

import pytest
import torch

from runtime import sgemm_prefetch
from runtime.linear_kernels import apply_linear_backend, pack_linears, packing_supported
from tests.test_linear_kernels import small_model

pytestmark = pytest.mark.skipif(not packing_supported("native", torch.float32, torch.device("cpu")),
                                reason="the engine's sgemm needs AVX2 and FMA")


@pytest.fixture(autouse=True)
def default_settings(monkeypatch):
    monkeypatch.setattr(sgemm_prefetch, "_CACHE", {})
    yield
    sgemm_prefetch.apply(sgemm_prefetch.DEFAULT)


def test_no_setting_changes_an_output_bit() -> None:
    """Rows around every tile count and the row limits; a K of three blocks, the last
    partial (slices of 96 then end mid-block); N not a multiple of the panel: linear and fused
    SwiGLU alike, under every mix of spread and slicing, each row as it is alone."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 400, generator=gen)
    gate_up = torch.randn(64, 400, generator=gen)
    packed = torch.ops.baton_kernels.sgemm_pack(weight)
    packed_gu = torch.ops.baton_kernels.sgemm_pack(gate_up)
    every = [sgemm_prefetch.PrefetchSettings(*limits)
             for limits in itertools.product((0, 32, 1000), repeat=2)]
    for rows in (1, 3, 4, 5, 7, 8, 16, 17, 31, 32, 33, 40, 64, 200):
        x = torch.randn(rows, 400, generator=gen)
        outputs = []
        for settings in every:
            sgemm_prefetch.apply(settings)
            outputs.append((torch.ops.baton_kernels.sgemm_linear(x, packed, 40, None),
                            torch.ops.baton_kernels.sgemm_swiglu(x, packed_gu, 32)))
        for linear, swiglu in outputs[1:]:
            assert torch.equal(linear, outputs[0][0]) and torch.equal(swiglu, outputs[0][1])
        alone = (torch.ops.baton_kernels.sgemm_linear(x[-1:], packed, 40, None),
                 torch.ops.baton_kernels.sgemm_swiglu(x[-1:], packed_gu, 32))
        assert torch.equal(alone[0][0], outputs[0][0][-1])
        assert torch.equal(alone[1][0], outputs[0][1][-1])
        torch.testing.assert_close(outputs[0][0], x @ weight.T, rtol=1e-4, atol=1e-4)


def test_applying_settings_returns_the_ones_they_replace() -> None:
    settings = sgemm_prefetch.PrefetchSettings(64, 32)
    assert sgemm_prefetch.apply(settings) == sgemm_prefetch.DEFAULT
    assert sgemm_prefetch.apply(sgemm_prefetch.PrefetchSettings(7, 9)) == settings
    with pytest.raises(RuntimeError, match="row limits must be >= 0"):
        sgemm_prefetch.apply(sgemm_prefetch.PrefetchSettings(0, -1))
    assert sgemm_prefetch.apply(sgemm_prefetch.DEFAULT) == sgemm_prefetch.PrefetchSettings(7, 9)


QUESTIONS = (sgemm_prefetch.NEVER_SPREAD, sgemm_prefetch.WIDER_SPREAD, sgemm_prefetch.SLICED)


def fake_probe(monkeypatch, figures: dict[str, float]) -> list[tuple]:
    """`measure` answering each question (known by its rows) with `figures[label]`, 1.0 when
    absent; returns the questions asked, with their baselines."""
    asked = []
    by_rows = {q.rows: q for q in QUESTIONS}

    def measure(model, candidates, rows, rounds=5):
        base, other = candidates
        question = by_rows[rows]
        assert question.challenger(base) == other
        asked.append((question.label, base))
        return {base: 1.0, other: figures.get(question.label, 1.0)}

    monkeypatch.setattr(sgemm_prefetch, "measure", measure)
    return asked


P = sgemm_prefetch.PrefetchSettings


@pytest.mark.parametrize(("figures", "want"), [
    ({"never spread": 0.88, "sliced to 16": 0.95}, P(0, 16)),
    ({"never spread": 0.88}, P(0, 0)),
    ({"never spread": 1.07}, P(32, 0)),
    ({"never spread": 0.99, "spread to 64": 0.99, "sliced to 16": 0.985}, P(32, 0)),
    ({"spread to 64": 0.96, "sliced to 16": 0.93}, P(64, 16)),
    ({"spread to 64": 1.01, "sliced to 16": 0.9}, P(32, 16)),
])
def test_the_engine_keeps_the_settings_measured_faster(monkeypatch, caplog, figures,
                                                      want) -> None:
    """The probe's figures decide (a lead under 2% keeps the baseline), each answer is the
    baseline of the next question, the kernel runs with the choice, startup logs it with the
    figures, and the wider spread is timed only when spreading won."""
    asked = fake_probe(monkeypatch, figures)
    with caplog.at_level(logging.INFO, logger="runtime.sgemm_prefetch"):
        apply_linear_backend(small_model(), "native")
    assert sgemm_prefetch.apply(sgemm_prefetch.DEFAULT) == want
    labels = [label for label, _ in asked]
    spreading = figures.get("never spread", 1.0) >= 0.98
    assert labels == ["never spread"] + (["spread to 64"] if spreading else []) + ["sliced to 16"]
    assert asked[0][1] == sgemm_prefetch.DEFAULT
    assert asked[-1][1] == dataclasses.replace(want, slice_rows=0)  # sliced asked last
    assert "sgemm weight prefetch" in caplog.text
    for label in labels:
        assert f"{label} {figures.get(label, 1.0):.2f}" in caplog.text
    assert want.describe() in caplog.text


def test_each_question_is_measured_once_per_process(monkeypatch) -> None:
    asked = fake_probe(monkeypatch, {})
    model = small_model()
    pack_linears(model, "native")
    for _ in range(2):
        assert sgemm_prefetch.tune(model).settings == sgemm_prefetch.DEFAULT
    assert len(asked) == 3


def test_measuring_restores_the_settings_and_times_the_fused_swiglu(monkeypatch) -> None:
    """A real (one-round) probe of each question: a ratio per candidate, the baseline's 1, the
    settings left as they were, the gate-and-up projection timed as the fused op the pass
    runs."""
    model = small_model()
    pack_linears(model, "native")
    fused = []
    real = sgemm_prefetch._runs_swiglu
    monkeypatch.setattr(sgemm_prefetch, "_call",
                        lambda m, call=sgemm_prefetch._call: fused.append(real(m)) or call(m))
    before = sgemm_prefetch.PrefetchSettings(5, 7)
    sgemm_prefetch.apply(before)
    for question in QUESTIONS:
        fused.clear()
        candidates = (sgemm_prefetch.DEFAULT, question.challenger(sgemm_prefetch.DEFAULT))
        ratios = sgemm_prefetch.measure(model, candidates, question.rows, rounds=1)
        assert set(ratios) == set(candidates) and ratios[candidates[0]] == 1.0
        assert all(r > 0 for r in ratios.values())
        assert any(fused) and not all(fused)
    assert sgemm_prefetch.apply(sgemm_prefetch.DEFAULT) == before


def test_a_model_without_native_float32_linears_is_left_alone() -> None:
    assert sgemm_prefetch.tune(small_model()) is None  # nothing packed
    assert sgemm_prefetch.tune(small_model(torch.float64)) is None
