"""Reports: vLLM's text table per contender, a ratio table against a baseline, JSON files.

The text table copies `vllm bench serve`'s layout and the JSON copies its key names, so users
can diff our numbers against theirs with the tools they already have.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.bench.metrics import STALL_FACTOR

HEADER = "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")
_LATENCY_SECTIONS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)
# (key, label, higher is better) rows of the ratio table.
RATIO_ROWS = (
    ("request_throughput", "Request throughput", True),
    ("output_throughput", "Output token throughput", True),
    ("total_token_throughput", "Total token throughput", True),
    ("duration", "Makespan", False),
    ("output_tokens_per_cpu_s", "Output tokens per CPU-s", True),
    ("mean_ttft_ms", "Mean TTFT", False),
    ("p99_ttft_ms", "P99 TTFT", False),
    ("mean_tpot_ms", "Mean TPOT", False),
    ("p99_tpot_ms", "P99 TPOT", False),
    ("mean_itl_ms", "Mean ITL", False),
    ("mean_e2el_ms", "Mean E2EL", False),
    ("p99_e2el_ms", "P99 E2EL", False),
    ("computed_token_slots", "Token slots computed", False),
    ("computed_attention_pairs", "Attention pairs computed", False),
    ("mean_kv_allocated_mib", "KV allocated (mean)", False),
    ("forward_time_s", "Forward time (all passes)", False),
    ("server_startup_s", "Server startup", False),
)
# (key, label, scale, format) rows of the absolute summary table; fractions shown in percent.
SUMMARY_ROWS = (
    ("output_throughput", "Output tokens/s", 1, ".1f"),
    ("request_throughput", "Requests/s", 1, ".2f"),
    ("duration", "Makespan (s)", 1, ".1f"),
    ("cpu_time_s", "CPU time of the process (s)", 1, ".1f"),
    ("output_tokens_per_cpu_s", "Output tokens per CPU-second", 1, ".1f"),
    ("mean_ttft_ms", "Mean TTFT (ms)", 1, ".0f"),
    ("mean_tpot_ms", "Mean TPOT (ms)", 1, ".1f"),
    ("mean_e2el_ms", "Mean E2EL (ms)", 1, ".0f"),
    ("makespan_over_arrival_bound", "Makespan / arrival bound", 1, ".2f"),
    ("idle_token_fraction", "Idle token slots (%)", 100, ".1f"),
    ("idle_attention_fraction", "Idle attention pairs (%)", 100, ".1f"),
    ("mean_kv_allocated_mib", "KV allocated, mean (MiB)", 1, ".1f"),
    ("kv_usage", "KV used / allocated (%)", 100, ".1f"),
    ("prefill_time_s", "Prefill-only passes (s)", 1, ".2f"),
    ("decode_time_s", "Decode-only passes (s)", 1, ".2f"),
    ("mixed_time_s", "Mixed passes (s)", 1, ".2f"),
    ("decode_stall_passes", f"Decode stalls (> {STALL_FACTOR:g}x median)", 1, ".0f"),
    ("decode_stall_s", "Decode stall time (s)", 1, ".2f"),
    ("server_startup_s", "Server startup, launch to ready (s)", 1, ".1f"),
)


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{label:<40} {value:<10.2f}"
    return f"{label:<40} {value:<10}"


def _section(title: str) -> str:
    return "{s:{c}^{n}}".format(s=title, n=50, c="-")


def format_report(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """One contender's result in `vllm bench serve`'s layout, plus our idle/KV/phase rows."""
    lines = [HEADER]
    if title:
        lines.append(_row("Contender:", title))
    lines += [
        _row("Successful requests:", metrics["completed"]),
        _row("Failed requests:", metrics["failed"]),
        _row("Benchmark duration (s):", float(metrics["duration"])),
        _row("Total input tokens:", metrics["total_input_tokens"]),
        _row("Total generated tokens:", metrics["total_output_tokens"]),
        _row("Request throughput (req/s):", float(metrics["request_throughput"])),
        _row("Output token throughput (tok/s):", float(metrics["output_throughput"])),
        _row("Total Token throughput (tok/s):", float(metrics["total_token_throughput"])),
    ]
    if "server_startup_s" in metrics:
        lines.append(_row("Server startup (s):", float(metrics["server_startup_s"])))
    if "cpu_time_s" in metrics:
        lines.append(_row("Process CPU time (s):", float(metrics["cpu_time_s"])))
        lines.append(
            _row("Output tokens per CPU-second:", float(metrics["output_tokens_per_cpu_s"]))
        )
    for key, short, title_text in _LATENCY_SECTIONS:
        lines.append(_section(title_text))
        lines.append(_row(f"Mean {short} (ms):", float(metrics[f"mean_{key}_ms"])))
        lines.append(_row(f"Median {short} (ms):", float(metrics[f"median_{key}_ms"])))
        lines.append(_row(f"P99 {short} (ms):", float(metrics[f"p99_{key}_ms"])))
    if "computed_token_slots" in metrics:
        lines.append(_section("Idle Computation"))
        lines.append(
            _row(
                "Token slots computed/useful:",
                f"{int(metrics['computed_token_slots'])}/{int(metrics['useful_token_slots'])}",
            )
        )
        lines.append(_row("Idle token slots (%):", 100 * float(metrics["idle_token_fraction"])))
        lines.append(
            _row("Attention pairs computed (M):", float(metrics["computed_attention_pairs"]) / 1e6)
        )
        lines.append(
            _row("Idle attention pairs (%):", 100 * float(metrics["idle_attention_fraction"]))
        )
        lines.append(_section("Time by Phase"))
        for phase in ("prefill", "decode", "mixed"):
            lines.append(_row(f"{phase.capitalize()} time (s):", float(metrics[f"{phase}_time_s"])))
        if "decode_stall_passes" in metrics:
            lines.append(_row("Decode stalls (passes):", int(metrics["decode_stall_passes"])))
            lines.append(_row("Decode stall time (s):", float(metrics["decode_stall_s"])))
    if "mean_kv_allocated_mib" in metrics:
        lines.append(_section("KV Cache Memory"))
        lines.append(_row("Mean allocated (MiB):", float(metrics["mean_kv_allocated_mib"])))
        lines.append(_row("Peak allocated (MiB):", float(metrics["peak_kv_allocated_mib"])))
        lines.append(_row("Mean used (MiB):", float(metrics["mean_kv_used_mib"])))
        lines.append(_row("Used / allocated (%):", 100 * float(metrics["kv_usage"])))
    lines.append("=" * 50)
    return "\n".join(lines)


def ratio_table(results: Mapping[str, Mapping[str, Any]], baseline: str) -> dict[str, dict]:
    """Each contender's metric divided by the baseline's (NaN where the baseline is 0)."""
    base = results[baseline]
    out: dict[str, dict] = {}
    for name, metrics in results.items():
        row = {}
        for key, _, _ in RATIO_ROWS:
            if key in metrics and key in base:
                b = float(base[key])
                row[key] = float(metrics[key]) / b if b else math.nan
        out[name] = row
    return out


def format_ratios(ratios: Mapping[str, Mapping[str, float]], baseline: str) -> str:
    """The ratio table as text: one column per contender, `x` ratios against the baseline."""
    names = list(ratios)
    width = max(10, *(len(n) + 2 for n in names))
    title = f"metric ({baseline} = 1.00x)"
    first = max(28, len(title) + 1)
    head = f"{title:<{first}}{'better':>8}" + "".join(f"{n:>{width}}" for n in names)
    lines = ["{s:{c}^{n}}".format(s=f" Ratios vs {baseline} ", n=len(head), c="="), head]
    for key, label, higher in RATIO_ROWS:
        if not all(key in ratios[n] for n in names):
            continue
        cells = "".join(
            f"{f'{ratios[n][key]:.2f}x':>{width}}"
            if not math.isnan(ratios[n][key])
            else f"{'n/a':>{width}}"
            for n in names
        )
        lines.append(f"{label:<{first}}{'higher' if higher else 'lower':>8}{cells}")
    lines.append("=" * len(head))
    return "\n".join(lines)


def format_summary(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Absolute values side by side (idle fractions, KV use, time by pass phase)."""
    names = list(results)
    width = max(10, *(len(n) + 2 for n in names))
    head = f"{'metric':<36}" + "".join(f"{n:>{width}}" for n in names)
    lines = ["{s:{c}^{n}}".format(s=" Summary ", n=len(head), c="="), head]
    for key, label, scale, fmt in SUMMARY_ROWS:
        if all(key in results[n] for n in names):
            cells = "".join(f"{float(results[n][key]) * scale:>{width}{fmt}}" for n in names)
            lines.append(f"{label:<36}{cells}")
    lines.append("=" * len(head))
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured (they are only comparable on the same machine)."""
    import os

    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` as indented JSON (NaN becomes null, as vLLM's readers expect)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(dict(payload)), indent=2) + "\n")
    return path


def vllm_result(metrics: Mapping[str, Any], label: str, extra: Mapping[str, Any] = ()) -> dict:
    """One contender's flat result dict, shaped like `vllm bench serve --save-result`."""
    return {"backend": label, **dict(extra), **dict(metrics)}
