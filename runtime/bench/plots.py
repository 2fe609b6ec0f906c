"""PNG plots of a comparison (matplotlib's Agg backend: no display needed on a server)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)
import numpy as np  # noqa: E402

from runtime.bench.metrics import RunTrace, latency_samples  # noqa: E402


def plot_throughput(results: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Bars per contender: output tokens/s, requests/s, and tokens per CPU-second if measured."""
    names = list(results)
    panels = [
        ("output_throughput", "output tokens/s", "%.1f"),
        ("request_throughput", "requests/s", "%.2f"),
    ]
    if all("output_tokens_per_cpu_s" in results[n] for n in names):
        panels.append(("output_tokens_per_cpu_s", "output tokens per CPU-second", "%.1f"))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(max(6, 1.2 * len(names) + 2) * len(panels) / 2, 3.8)
    )
    for ax, (key, label, fmt) in zip(axes, panels, strict=True):
        values = [float(results[n][key]) for n in names]
        bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt=fmt, fontsize=8)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title or "Throughput per scheduler / engine")
    return _save(fig, path)


def plot_latency_cdfs(
    traces: Mapping[str, Sequence[RunTrace]], path: Path, title: str = ""
) -> Path:
    """Empirical CDFs of TTFT, TPOT and end-to-end latency, one line per contender."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, (name, runs) in enumerate(traces.items()):
        samples = latency_samples(r for run in runs for r in run.requests)
        for ax, key in zip(axes, ("ttft", "tpot", "e2el"), strict=True):
            values = np.sort(np.asarray(samples[key]) * 1000.0)
            if values.size:
                ax.step(
                    values,
                    np.arange(1, values.size + 1) / values.size,
                    where="post",
                    label=name,
                    color=f"C{i}",
                )
    for ax, key in zip(axes, ("TTFT", "TPOT", "E2E latency"), strict=True):
        ax.set_xlabel(f"{key} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "Latency CDFs")
    return _save(fig, path)


def plot_rate_sweep(
    sweep: Mapping[float, Mapping[str, Mapping[str, Any]]], path: Path, title: str = ""
) -> Path:
    """Output throughput and mean E2E latency against the Poisson request rate."""
    rates = sorted(sweep)
    names = list(dict.fromkeys(n for r in rates for n in sweep[r]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, name in enumerate(names):
        xs = [r for r in rates if name in sweep[r]]
        axes[0].plot(
            xs, [sweep[r][name]["output_throughput"] for r in xs], "o-", label=name, color=f"C{i}"
        )
        axes[1].plot(
            xs, [sweep[r][name]["mean_e2el_ms"] for r in xs], "o-", label=name, color=f"C{i}"
        )
    axes[0].set_ylabel("output tokens/s")
    axes[1].set_ylabel("mean E2E latency (ms)")
    for ax in axes:
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "Throughput against request rate")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
