"""Metric formulas on a hand-made trace: every number is computed by hand in the comments."""

from __future__ import annotations

import pytest

from runtime.bench.metrics import (
    PassTrace,
    RequestTrace,
    RunTrace,
    StepRecorder,
    aggregate,
    compute_metrics,
    decode_stalls,
    pass_metrics,
)
from runtime.kv_cache import MemoryStats, PassStats, Phase
from runtime.scheduling import StepStats


def hand_trace() -> RunTrace:
    requests = [
        # ttft 1.0, e2el 2.0, tpot (2.0 - 1.0) / 2 = 0.5, itl 0.5, 0.5
        RequestTrace(10, 3, arrival=0.0, token_times=[1.0, 1.5, 2.0]),
        # ttft 0.5, e2el 2.0, tpot 1.5 / 1 = 1.5, itl 1.5
        RequestTrace(20, 2, arrival=1.0, token_times=[1.5, 3.0]),
        # ttft 2.0, e2el 2.0, one token: no tpot, no itl
        RequestTrace(5, 1, arrival=0.5, token_times=[2.5]),
        RequestTrace(7, 0, arrival=0.2, token_times=[], success=False, error="boom"),
    ]
    passes = [PassTrace("prefill", 0.2, 30, 40, 100, 200), PassTrace("decode", 0.1, 3, 4, 30, 40)]
    return RunTrace(
        requests,
        start=0.0,
        end=4.0,
        passes=passes,
        memory=[(100, 50), (300, 100)],
        bytes_per_element=4,
    )


def test_throughput_counts_and_duration():
    m = compute_metrics(hand_trace())
    assert m["duration"] == 4.0
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (35, 6)
    assert m["request_throughput"] == pytest.approx(0.75)
    assert m["output_throughput"] == pytest.approx(1.5)
    assert m["total_token_throughput"] == pytest.approx(41 / 4)


def test_latency_statistics_match_vllm_definitions():
    m = compute_metrics(hand_trace())
    # TTFT [500, 1000, 2000] ms; numpy's linear p99 sits at index 1.98: 1000 + 0.98 * 1000
    assert m["mean_ttft_ms"] == pytest.approx(3500 / 3)
    assert m["median_ttft_ms"] == pytest.approx(1000)
    assert m["p99_ttft_ms"] == pytest.approx(1980)
    # TPOT [500, 1500] ms
    assert m["mean_tpot_ms"] == pytest.approx(1000)
    assert m["median_tpot_ms"] == pytest.approx(1000)
    assert m["p99_tpot_ms"] == pytest.approx(1490)
    # ITL [500, 500, 1500] ms
    assert m["mean_itl_ms"] == pytest.approx(2500 / 3)
    assert m["median_itl_ms"] == pytest.approx(500)
    assert m["p99_itl_ms"] == pytest.approx(1480)
    # E2EL [2000, 2000, 2000] ms
    assert m["mean_e2el_ms"] == m["median_e2el_ms"] == m["p99_e2el_ms"] == pytest.approx(2000)
    assert m["std_e2el_ms"] == pytest.approx(0.0)


def test_idle_computation_phase_time_and_kv_memory():
    m = compute_metrics(hand_trace())
    assert (m["computed_token_slots"], m["useful_token_slots"]) == (44, 33)
    assert m["idle_token_fraction"] == pytest.approx(0.25)
    assert (m["computed_attention_pairs"], m["useful_attention_pairs"]) == (240, 130)
    assert m["idle_attention_fraction"] == pytest.approx(1 - 130 / 240)
    assert m["prefill_time_s"] == pytest.approx(0.2) and m["decode_time_s"] == pytest.approx(0.1)
    assert m["mixed_time_s"] == 0 and m["num_passes"] == 2
    mib = 4 / 2**20
    assert m["mean_kv_allocated_mib"] == pytest.approx(200 * mib)
    assert m["peak_kv_allocated_mib"] == pytest.approx(300 * mib)
    assert m["mean_kv_used_mib"] == pytest.approx(75 * mib)
    assert m["kv_usage"] == pytest.approx(150 / 400)


def test_step_recorder_reads_step_stats():
    rec = StepRecorder()
    stats = StepStats(
        1,
        (PassStats(Phase.DECODE, 2, 2, 4, 10, 16),),
        (0.25,),
        MemoryStats(64, 32, 8, 4, 2),
        num_running=2,
        num_waiting=0,
    )
    rec.on_step_end(stats)
    assert rec.passes == [PassTrace("decode", 0.25, 2, 4, 10, 16, requests=2)]
    assert rec.memory == [(64, 32)]


def test_aggregate_is_the_median_of_repeats():
    runs = [
        {"completed": 3, "output_throughput": 10.0},
        {"completed": 3, "output_throughput": 30.0},
        {"completed": 3, "output_throughput": 11.0},
    ]
    assert aggregate(runs) == {"completed": 3, "output_throughput": 11.0}


def test_cpu_time_throughput():
    trace = hand_trace()
    trace.cpu_seconds = 2.0
    m = compute_metrics(trace)
    assert m["cpu_time_s"] == 2.0 and m["output_tokens_per_cpu_s"] == pytest.approx(3.0)
    assert m["requests_per_cpu_s"] == pytest.approx(1.5)
    assert "cpu_time_s" not in compute_metrics(hand_trace())


def test_arrival_bound_serves_each_request_alone_at_the_fastest_pass():
    m = compute_metrics(hand_trace())
    # fastest pass 0.1 s; finishes 0 + 3 * 0.1, 1.0 + 2 * 0.1, 0.5 + 1 * 0.1 (the failed
    # request does not count): the last at 1.2 s
    assert m["arrival_bound_s"] == pytest.approx(1.2)
    assert m["makespan_over_arrival_bound"] == pytest.approx(4.0 / 1.2)
    late = hand_trace()
    late.requests[1].arrival = 3.5  # a late arrival sets the bound: 3.5 + 2 * 0.1
    late.requests[1].token_times = [3.6, 3.9]
    assert compute_metrics(late)["arrival_bound_s"] == pytest.approx(3.7)
    no_passes = hand_trace()
    no_passes.passes = []
    assert "arrival_bound_s" not in compute_metrics(no_passes)


def test_decode_stalls_are_passes_far_over_their_batch_sizes_median():
    """A decode pass over twice the median of its batch size's decode passes is a stall; its
    time past that median is the stall's cost. Sizes with too few passes are not judged, and
    prompt-carrying passes never are."""
    def decode(seconds: float, rows: int) -> PassTrace:
        return PassTrace("decode", seconds, rows, rows, rows, rows, requests=rows)

    passes = [decode(0.060, 64)] * 6 + [decode(0.065, 64), decode(0.400, 64)]  # median 0.060
    passes += [decode(0.020, 8)] * 3 + [decode(0.041, 8)]  # median 0.020: 0.041 is a stall
    passes += [decode(0.010, 1), decode(0.500, 1)]  # two passes: too few to judge
    passes += [PassTrace("mixed", 2.5, 4000, 4000, 0, 0, requests=40)]
    assert decode_stalls(passes) == (2, pytest.approx((0.400 - 0.060) + (0.041 - 0.020)))
    assert decode_stalls(passes[:7]) == (0, 0.0)
    metrics = pass_metrics(passes)
    assert metrics["decode_stall_passes"] == 2
    assert metrics["decode_stall_s"] == pytest.approx(0.361)
    assert decode_stalls([PassTrace("decode", 9.0, 1, 1, 1, 1)] * 5) == (0, 0.0)  # rows unknown
