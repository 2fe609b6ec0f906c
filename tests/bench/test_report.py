"""Report writers: vLLM's header and rows, ratio table, JSON keys."""

from __future__ import annotations

import json
import math

from runtime.bench.metrics import compute_metrics
from runtime.bench.report import (
    HEADER,
    format_ratios,
    format_report,
    format_summary,
    ratio_table,
    vllm_result,
    write_json,
)
from tests.bench.test_metrics import hand_trace

VLLM_KEYS = (
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    *(
        f"{s}_{m}_ms"
        for m in ("ttft", "tpot", "itl", "e2el")
        for s in ("mean", "median", "std", "p99")
    ),
)


def test_text_report_has_vllm_layout():
    text = format_report(compute_metrics(hand_trace()), title="static")
    lines = text.splitlines()
    assert HEADER == "============ Serving Benchmark Result ============"
    assert lines[0] == HEADER and lines[-1] == "=" * 50
    for row in (
        "Successful requests:",
        "Failed requests:",
        "Benchmark duration (s):",
        "Request throughput (req/s):",
        "Output token throughput (tok/s):",
        "Mean TTFT (ms):",
        "Median TPOT (ms):",
        "P99 ITL (ms):",
        "Mean E2EL (ms):",
        "Idle token slots (%):",
        "Prefill time (s):",
        "Mean allocated (MiB):",
    ):
        assert any(line.startswith(row) for line in lines), row
    assert "Successful requests:                     3" in text
    assert "Mean TTFT (ms):                          1166.67" in text


def test_ratio_table_divides_by_the_baseline():
    fast = compute_metrics(hand_trace())
    slow = dict(fast, request_throughput=fast["request_throughput"] / 2, duration=8.0)
    ratios = ratio_table({"orca": slow, "baton": fast}, "orca")
    assert ratios["orca"]["request_throughput"] == 1.0
    assert ratios["baton"]["request_throughput"] == 2.0
    assert ratios["baton"]["duration"] == 0.5
    text = format_ratios(ratios, "orca")
    assert "Ratios vs orca" in text.splitlines()[0]
    assert any(
        line.startswith("Request throughput") and line.rstrip().endswith("2.00x")
        for line in text.splitlines()
    )


def test_json_has_vllm_keys_and_no_nan(tmp_path):
    metrics = compute_metrics(hand_trace())
    path = write_json(tmp_path / "r.json", vllm_result(metrics, "baton", {"x": math.nan}))
    data = json.loads(path.read_text())
    assert data["backend"] == "baton" and data["x"] is None
    for key in VLLM_KEYS:
        assert key in data, key


def test_summary_shows_fractions_in_percent():
    m = compute_metrics(hand_trace())
    text = format_summary({"baton": m})
    row = next(line for line in text.splitlines() if line.startswith("Idle token slots (%)"))
    assert row.split()[-1] == "25.0"
