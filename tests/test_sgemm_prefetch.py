"""The sgemm's weight prefetch spread, measured at startup: it changes no output bit, and the
engine keeps the setting its probe measured faster."""

import logging

import pytest
import torch

from runtime import sgemm_prefetch
from runtime.linear_kernels import apply_linear_backend, pack_linears, packing_supported
from tests.test_linear_kernels import small_model

pytestmark = pytest.mark.skipif(not packing_supported("native", torch.float32, torch.device("cpu")),
                                reason="the engine's sgemm needs AVX2 and FMA")


@pytest.fixture(autouse=True)
def default_spread(monkeypatch):
    monkeypatch.setattr(sgemm_prefetch, "_CACHE", {})
    yield
    sgemm_prefetch.set_spread_rows(sgemm_prefetch.DEFAULT_SPREAD_ROWS)


def test_the_spread_changes_no_output_bit() -> None:
    """Rows around every tile count and the spread threshold; a K of three blocks, the last
    partial; N not a multiple of the panel: linear and fused SwiGLU alike."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 400, generator=gen)
    gate_up = torch.randn(64, 400, generator=gen)
    packed = torch.ops.baton_kernels.sgemm_pack(weight)
    packed_gu = torch.ops.baton_kernels.sgemm_pack(gate_up)
    for rows in (1, 5, 8, 16, 17, 31, 32, 33, 40, 64):
        x = torch.randn(rows, 400, generator=gen)
        outputs = []
        for spread in (0, 32, 1000):
            sgemm_prefetch.set_spread_rows(spread)
            outputs.append((torch.ops.baton_kernels.sgemm_linear(x, packed, 40, None),
                            torch.ops.baton_kernels.sgemm_swiglu(x, packed_gu, 32)))
        for linear, swiglu in outputs[1:]:
            assert torch.equal(linear, outputs[0][0]) and torch.equal(swiglu, outputs[0][1])
        torch.testing.assert_close(outputs[0][0], x @ weight.T, rtol=1e-4, atol=1e-4)


def test_setting_the_spread_returns_the_one_it_replaces() -> None:
    assert sgemm_prefetch.set_spread_rows(0) == sgemm_prefetch.DEFAULT_SPREAD_ROWS
    assert sgemm_prefetch.set_spread_rows(7) == 0
    with pytest.raises(RuntimeError, match="rows must be >= 0"):
        sgemm_prefetch.set_spread_rows(-1)
    assert sgemm_prefetch.set_spread_rows(sgemm_prefetch.DEFAULT_SPREAD_ROWS) == 7


@pytest.mark.parametrize(("never", "wider", "want"), [(0.88, 0.97, 0), (1.07, 1.02, 32),
                                                      (1.07, 0.96, 64), (1.0, 1.0, 32),
                                                      (0.99, 0.99, 32)])
def test_the_engine_keeps_the_spread_measured_faster(monkeypatch, caplog, never, wider,
                                                     want) -> None:
    """The probe's figures decide (a lead under 2% keeps the baseline), the kernel runs with the
    choice, startup logs it with the figures, and the wider spread is timed only when
    spreading won."""
    asked = []

    def measure(model, candidates, rows, rounds=5):
        asked.append((candidates, rows))
        return {candidates[0]: 1.0, candidates[1]: never if candidates[1] == 0 else wider}

    monkeypatch.setattr(sgemm_prefetch, "measure", measure)
    with caplog.at_level(logging.INFO, logger="runtime.sgemm_prefetch"):
        apply_linear_backend(small_model(), "native")
    assert sgemm_prefetch.set_spread_rows(sgemm_prefetch.DEFAULT_SPREAD_ROWS) == want
    assert asked[0] == sgemm_prefetch.SPREAD_PROBE
    assert asked[1:] == ([] if want == 0 else [sgemm_prefetch.WIDER_PROBE])
    assert "sgemm weight prefetch" in caplog.text and f"never {never:.2f}" in caplog.text
    assert (f"up to 64 rows {wider:.2f}" in caplog.text) == (want != 0)


def test_each_probe_is_measured_once_per_process(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(sgemm_prefetch, "measure",
                        lambda model, candidates, rows, rounds=5:
                        calls.append(candidates) or {candidates[0]: 1.0, candidates[1]: 1.1})
    model = small_model()
    pack_linears(model, "native")
    for _ in range(2):
        assert sgemm_prefetch.tune(model).spread_rows == 32
    assert calls == [sgemm_prefetch.SPREAD_PROBE[0], sgemm_prefetch.WIDER_PROBE[0]]


def test_measuring_restores_the_setting_and_times_the_fused_swiglu(monkeypatch) -> None:
    """A real (one-round) probe: a ratio per candidate, the baseline's 1, the setting left as
    it was, the gate-and-up projection timed as the fused op the pass runs."""
    model = small_model()
    pack_linears(model, "native")
    fused = []
    real = sgemm_prefetch._runs_swiglu
    monkeypatch.setattr(sgemm_prefetch, "_runs_swiglu", lambda m: fused.append(real(m)) or real(m))
    sgemm_prefetch.set_spread_rows(5)
    for candidates, rows in (sgemm_prefetch.SPREAD_PROBE, sgemm_prefetch.WIDER_PROBE):
        ratios = sgemm_prefetch.measure(model, candidates, rows, rounds=1)
        assert set(ratios) == set(candidates) and ratios[candidates[0]] == 1.0
        assert all(r > 0 for r in ratios.values())
    assert sgemm_prefetch.set_spread_rows(sgemm_prefetch.DEFAULT_SPREAD_ROWS) == 5
    assert any(fused) and not all(fused)


def test_a_model_without_native_float32_linears_is_left_alone() -> None:
    assert sgemm_prefetch.tune(small_model()) is None  # nothing packed
    assert sgemm_prefetch.tune(small_model(torch.float64)) is None
