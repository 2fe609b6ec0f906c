"""A tiny offline comparison end to end through the CLI: reports, JSON and PNGs."""

from __future__ import annotations

import json

import pytest

from runtime.bench.model_spec import resolve_model
from runtime.bench.offline import EngineContender, run_comparison
from runtime.bench.workload import BenchRequest
from runtime.cli import main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_RUNTIME_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_two_schedulers_produce_json_and_png(tmp_path, cache, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "bench",
            "--model-spec",
            "tiny",
            "--workload",
            "smoke",
            "--num-requests",
            "6",
            "--schedulers",
            "static,default",
            "--baseline",
            "static",
            "--repeats",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert text.count("============ Serving Benchmark Result ============") == 2
    assert "Ratios vs static" in text
    data = json.loads((out / "results.json").read_text())
    assert set(data["results"]) == {"static", "default"}
    assert len(data["runs"]["static"]) == 2
    for label in ("static", "default"):
        res = data["results"][label]
        assert res["completed"] == 6 and res["failed"] == 0
        assert res["output_throughput"] > 0 and res["computed_token_slots"] >= 1
        flat = json.loads((out / f"{label}.json").read_text())
        assert flat["backend"] == label and "p99_ttft_ms" in flat
    assert data["ratios"]["static"]["request_throughput"] == 1.0
    # every request's timeline, per repeat: what the aggregates came from
    timelines = json.loads((out / "requests.json").read_text())
    assert set(timelines) == {"static", "default"} and len(timelines["static"]) == 2
    for label, repeats in timelines.items():
        for repeat, run in zip(repeats, data["runs"][label], strict=True):
            assert len(repeat) == 6 and all(r["success"] for r in repeat)
            assert sum(len(r["token_times"]) for r in repeat) == run["total_output_tokens"]
            assert all(0 <= r["arrival"] <= r["token_times"][0] and
                       r["token_times"] == sorted(r["token_times"]) for r in repeat)
            ttft = [r["token_times"][0] - r["arrival"] for r in repeat]
            assert sum(ttft) / len(ttft) * 1000 == pytest.approx(run["mean_ttft_ms"], rel=1e-3)
    assert "Paired ratios vs static (2 repeats)" in text
    paired = data["paired_ratios"]["default"]["output_throughput"]
    mine, theirs = data["runs"]["default"], data["runs"]["static"]
    assert paired["ratios"] == pytest.approx(
        [a["output_throughput"] / b["output_throughput"] for a, b in zip(mine, theirs, strict=True)]
    )
    assert paired["ci95"] is None and set(data["paired_ratios"]) == {"default"}
    assert data["workload"]["name"] == "smoke"
    for png in ("throughput.png", "latency_cdf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rate_sweep_writes_a_plot(tmp_path, cache):
    out = tmp_path / "sweep"
    rc = main(
        [
            "bench",
            "--model-spec",
            "tiny",
            "--workload",
            "smoke",
            "--num-requests",
            "3",
            "--schedulers",
            "default",
            "--rate-sweep",
            "50,100",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    sweep = json.loads((out / "rate_sweep.json").read_text())
    assert set(sweep) == {"50.0", "100.0"}
    assert (out / "rate_sweep.png").is_file() and (out / "results-rate50.json").is_file()


def test_arrivals_are_replayed_on_the_engine_clock(cache):
    from runtime.loader import load_model

    model = load_model(resolve_model("tiny"))
    contender = EngineContender("default", "default", model)
    reqs = [BenchRequest(0, 0.0, (20, 21, 22), 3), BenchRequest(1, 0.3, (23, 24), 2)]
    result = run_comparison([contender], reqs, progress=False)
    trace = result.traces["default"][0]
    late = trace.requests[1]
    assert late.arrival - trace.start == pytest.approx(0.3)
    assert late.token_times[0] >= late.arrival  # not served before it arrived
    assert [r.output_len for r in trace.requests] == [3, 2]
    assert trace.end - trace.start >= 0.3


def test_a_failing_contender_is_reported_not_fatal(cache):
    from runtime.loader import load_model

    model = load_model(resolve_model("tiny"))
    good = EngineContender("default", "default", model)
    bad = EngineContender("broken", "no-such-scheduler", model)
    result = run_comparison([good, bad], [BenchRequest(0, 0.0, (20, 21), 2)], progress=False)
    assert "default" in result.runs and "broken" not in result.runs
    assert "no-such-scheduler" in result.errors["broken"]


def test_several_workloads_in_one_command(tmp_path, cache):
    other = tmp_path / "tiny-burst.yaml"
    other.write_text("num_requests: 2\nprompt_len: [3, 5]\noutput_len: 2\n")
    out = tmp_path / "multi"
    rc = main(
        [
            "bench",
            "--model-spec",
            "tiny",
            "--workload",
            f"smoke,{other}",
            "--num-requests",
            "2",
            "--schedulers",
            "default",
            "--out",
            str(out),
            "--no-progress",
            "--no-plots",
        ]
    )
    assert rc == 0
    assert json.loads((out / "smoke" / "results.json").read_text())["workload"]["name"] == "smoke"
    burst = json.loads((out / "tiny-burst" / "results.json").read_text())
    assert burst["results"]["default"]["completed"] == 2


def test_engine_option_sets_one_contenders_attention_backend(tmp_path, cache, native_kernel):
    """baton on the native decode kernel against baton on SDPA, in one run: the kernel reads
    real keys only, SDPA the padded bucket windows."""
    out = tmp_path / "out"
    rc = main(["bench", "--model-spec", "tiny", "--workload", "smoke", "--num-requests", "8",
               "--schedulers", "baton,baton-sdpa=baton", "--scheduler-option",
               "baton.max_buckets=1", "--scheduler-option", "baton-sdpa.max_buckets=1",
               "--engine-option", "baton-sdpa.attention_backend=sdpa", "--out", str(out),
               "--no-progress", "--no-plots"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())["results"]
    native, sdpa = results["baton"], results["baton-sdpa"]
    assert native["completed"] == sdpa["completed"] == 8
    assert native["computed_attention_pairs"] == native["useful_attention_pairs"]
    assert sdpa["computed_attention_pairs"] > sdpa["useful_attention_pairs"]


def test_engine_option_sets_one_contenders_kv_cache_dtype(tmp_path, cache):
    """A full-precision cache against a bfloat16 one over the same model, in one run."""
    out = tmp_path / "out"
    rc = main(["bench", "--model-spec", "tiny", "--workload", "smoke", "--num-requests", "6",
               "--schedulers", "orca,orca-bf16kv=orca", "--engine-option",
               "orca-bf16kv.kv_cache_dtype=bfloat16", "--out", str(out), "--no-progress",
               "--no-plots"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())["results"]
    full, half = results["orca"], results["orca-bf16kv"]
    assert full["completed"] == half["completed"] == 6
    assert half["peak_kv_allocated_mib"] == pytest.approx(full["peak_kv_allocated_mib"] / 2)


@pytest.mark.parametrize(("option", "message"), [
    ("baton.compile=true", "cannot differ between contenders"),
    ("orca.attention_backend=sdpa", "no contender 'orca'"),
    ("baton-attention_backend=sdpa", "expected LABEL.KEY=VALUE"),
])
def test_engine_option_errors_name_the_entry(cache, capsys, option, message):
    rc = main(["bench", "--model-spec", "tiny", "--workload", "smoke", "--schedulers", "baton",
               "--engine-option", option, "--no-progress", "--no-plots"])
    assert rc != 0
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--static-decode-rows", "2"], "--static-decode-rows: needs --compile"),
    (["--compile", "--static-decode-rows", "0", "2"], "--static-decode-rows: expected a list of row counts >= 1"),
])
def test_static_decode_rows_flag_errors(cache, capsys, flags, message):
    rc = main(["bench", "--model-spec", "tiny", "--workload", "smoke", "--schedulers", "baton",
               *flags, "--no-progress", "--no-plots"])
    assert rc != 0
    assert message in capsys.readouterr().err


def test_contender_hands_static_decode_rows_to_its_engine(cache):
    """The rows reach the engine (which refuses them without a compiled decoder: building the
    fixed-shape graphs themselves is tests/test_static_graphs.py's)."""
    from runtime.loader import load_model

    model = load_model(resolve_model("tiny"))
    contender = EngineContender("baton", "baton", model, static_decode_rows=(1, 2))
    with pytest.raises(ValueError, match="static_decode_rows: needs compile"):
        contender.make_engine()


def test_contender_hands_its_model_folder_to_the_package_builder(cache):
    """With `--static-decode-rows` the engine's package cache names where a separate process
    loads the model (`runtime.package_builder`), so the bench's first run builds there too."""
    from runtime.loader import load_model
    from runtime.package_builder import ModelSource

    folder = resolve_model("tiny")
    source = ModelSource(folder, "float32")
    contender = EngineContender("baton", "baton", load_model(folder, dtype="float32"),
                                compile_model=True, static_decode_rows=(2,),
                                model_source=source)
    spec = contender.make_engine().runner.static_graphs.packages.spec
    assert spec.builder == source


def _device_run(tmp_path, device: str, dtype: str, schedulers: str, *extra: str) -> dict:
    out = tmp_path / "out"
    rc = main(["bench", "--model-spec", "tiny", "--workload", "smoke", "--num-requests", "4",
               "--schedulers", schedulers, "--device", device, "--dtype", dtype, "--out",
               str(out), "--no-progress", "--no-plots", *extra])
    assert rc == 0
    return json.loads((out / "results.json").read_text())


def test_the_results_say_where_and_in_what_dtype_the_contenders_ran(tmp_path, cache):
    """`--device auto` takes CUDA where there is one, else the CPU; the JSON names the device
    and the dtype the model was loaded in, and the transformers peer runs in the same dtype."""
    import torch

    data = _device_run(tmp_path, "auto", "float64", "baton,orca", "--peers", "transformers")
    expected = "cuda" if torch.cuda.is_available() else "torch thread"
    assert expected in data["device"]
    assert data["dtype"] == "float64"
    for label in ("baton", "orca", "transformers"):
        assert data["results"][label]["completed"] == 4, label


def test_bench_on_cuda_without_cuda_is_a_clear_error(cache, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc = main(["bench", "--model-spec", "tiny", "--workload", "smoke", "--device", "cuda",
               "--no-progress", "--no-plots"])
    assert rc != 0
    assert "'cuda' requested but CUDA is not available" in capsys.readouterr().err


def test_bench_runs_every_scheduler_on_cuda(tmp_path, cache):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    data = _device_run(tmp_path, "cuda", "bfloat16", "baton,orca,static,default")
    assert "cuda" in data["device"] and data["dtype"] == "bfloat16"
    for label, result in data["results"].items():
        assert result["completed"] == 4 and result["failed"] == 0, label
