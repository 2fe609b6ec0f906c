"""Paired ratios: repeat-by-repeat ratios against the baseline, their interval and verdict."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from runtime.bench.paired import PairedRatio, format_paired, paired_ratios, pool_runs
from runtime.cli import main


def runs_of(values: dict[str, list[tuple[float, float, float]]]) -> dict[str, list[dict]]:
    """(output tok/s, mean TTFT ms, mean TPOT ms) per repeat -> the bench's `runs` shape."""
    return {
        label: [
            {"output_throughput": t, "mean_ttft_ms": ttft, "mean_tpot_ms": tpot, "completed": 4}
            for t, ttft, tpot in reps
        ]
        for label, reps in values.items()
    }


def test_each_repeat_is_divided_by_the_baselines_same_repeat():
    runs = runs_of({
        "orca": [(100.0, 50.0, 10.0), (200.0, 40.0, 20.0), (150.0, 60.0, 15.0)],
        "baton": [(110.0, 40.0, 9.0), (240.0, 36.0, 16.0), (195.0, 30.0, 15.0)],
    })
    paired = paired_ratios(runs, "orca")
    assert set(paired) == {"baton"}
    tput = paired["baton"]["output_throughput"]
    assert tput.ratios == pytest.approx((1.1, 1.2, 1.3))
    assert tput.geomean == pytest.approx((1.1 * 1.2 * 1.3) ** (1 / 3))
    logs = [math.log(r) for r in (1.1, 1.2, 1.3)]
    half = 4.303 * statistics.stdev(logs) / math.sqrt(3)  # t(0.975, 2 df)
    low, high = tput.interval
    assert low == pytest.approx(math.exp(statistics.mean(logs) - half))
    assert high == pytest.approx(math.exp(statistics.mean(logs) + half))
    assert paired["baton"]["mean_ttft_ms"].ratios == pytest.approx((0.8, 0.9, 0.5))


def test_the_verdict_reads_the_metrics_direction():
    steady_gain = PairedRatio((1.20, 1.22, 1.21, 1.19), higher_is_better=True)
    assert steady_gain.interval[0] > 1 and steady_gain.verdict == "ahead"
    steady_loss = PairedRatio((0.80, 0.82, 0.81), higher_is_better=True)
    assert steady_loss.verdict == "behind"
    lower_latency = PairedRatio((0.80, 0.82, 0.81), higher_is_better=False)
    assert lower_latency.verdict == "ahead"
    noisy = PairedRatio((0.9, 1.3, 1.05), higher_is_better=True)
    low, high = noisy.interval
    assert low < 1 < high and noisy.verdict == "within noise"
    two = PairedRatio((1.2, 1.3), higher_is_better=True)
    assert two.interval is None and two.verdict == "n/a"


def test_missing_or_zero_values_leave_that_repeat_out():
    runs = runs_of({"a": [(100.0, 1.0, 0.0), (0.0, 1.0, 2.0), (100.0, 1.0, 2.0)],
                    "b": [(120.0, 2.0, 4.0), (130.0, 2.0, 4.0), (110.0, 2.0, 4.0)]})
    runs["b"][2]["mean_ttft_ms"] = math.nan
    paired = paired_ratios(runs, "a")["b"]
    assert paired["output_throughput"].ratios == pytest.approx((1.2, 1.1))
    assert paired["mean_ttft_ms"].ratios == pytest.approx((2.0, 2.0))
    assert paired["mean_tpot_ms"].ratios == pytest.approx((2.0, 2.0))


def test_nothing_to_pair_with_one_repeat_or_no_baseline():
    one = runs_of({"a": [(1.0, 1.0, 1.0)], "b": [(2.0, 1.0, 1.0)]})
    assert paired_ratios(one, "a") == {}
    assert paired_ratios(runs_of({"b": [(2.0, 1.0, 1.0)] * 3}), "a") == {}
    assert format_paired({}, "a") == ""


def test_the_table_names_each_contender_metric_and_verdict():
    runs = runs_of({"vllm": [(100.0, 50.0, 10.0)] * 3,
                    "baton": [(130.0, 50.0, 8.0), (128.0, 52.0, 8.2), (131.0, 49.0, 7.9)]})
    text = format_paired(paired_ratios(runs, "vllm"), "vllm")
    lines = text.splitlines()
    assert "Paired ratios vs vllm (3 repeats)" in lines[0]
    row = next(line for line in lines if "Output token throughput" in line)
    assert row.startswith("baton") and "1.30x" in row and row.endswith("ahead")
    assert next(line for line in lines if "Mean TTFT" in line).endswith("within noise")
    two = format_paired(paired_ratios({k: v[:2] for k, v in runs.items()}, "vllm"), "vllm")
    assert "n/a" in two and "--repeats 3 or more" in two


def write_results(path, runs, **header):
    path.mkdir()
    base = {"mode": "offline", "model": "m", "dtype": "float32", "baseline": "orca",
            "workload": {"name": "smoke", "num_requests": 4, "seed": 0}}
    (path / "results.json").write_text(json.dumps(base | header | {"runs": runs}))


def test_compare_pools_the_repeats_of_several_runs(tmp_path, capsys):
    first = runs_of({"orca": [(100.0, 50.0, 10.0)] * 2, "baton": [(110.0, 40.0, 9.0)] * 2,
                     "static": [(50.0, 90.0, 20.0)] * 2})
    second = runs_of({"orca": [(200.0, 50.0, 10.0)], "baton": [(260.0, 45.0, 9.5)]})
    write_results(tmp_path / "a", first)
    write_results(tmp_path / "b", second)
    runs, header = pool_runs([tmp_path / "a", tmp_path / "b" / "results.json"])
    assert set(runs) == {"orca", "baton"}  # static is not in b
    assert [r["output_throughput"] for r in runs["baton"]] == [110.0, 110.0, 260.0]
    assert header["baseline"] == "orca"
    assert main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert "smoke: 3 repeats from 2 file(s)" in text
    row = next(line for line in text.splitlines() if "Output token throughput" in line)
    assert row.startswith("baton") and f"{(1.1 * 1.1 * 1.3) ** (1 / 3):.2f}x" in row


def test_compare_refuses_runs_of_another_comparison(tmp_path, capsys):
    runs = runs_of({"orca": [(100.0, 50.0, 10.0)] * 2, "baton": [(110.0, 40.0, 9.0)] * 2})
    write_results(tmp_path / "a", runs)
    write_results(tmp_path / "b", runs, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"b/results.json: its dtype differs"):
        pool_runs([tmp_path / "a", tmp_path / "b"])
    assert main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "its dtype differs" in capsys.readouterr().err
    (tmp_path / "c.json").write_text("{}")
    assert main(["bench", "compare", str(tmp_path / "c.json")]) == 2
    assert "not a `runtime bench` results.json" in capsys.readouterr().err
    assert main(["bench", "compare", str(tmp_path / "a"), "--baseline", "vllm"]) == 2
    assert "baseline 'vllm' is not in every file" in capsys.readouterr().err
