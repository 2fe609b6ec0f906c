"""`runtime bench` (offline, engines in process) and `runtime bench serve` (online, over HTTP).

Argument parsing and the glue: workload -> model folder -> contenders -> interleaved runs ->
text report, ratio table, JSON and PNGs under `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from runtime.bench.workload import generate_requests, load_workload

if TYPE_CHECKING:
    from runtime.bench.offline import ComparisonResult

# Heavy modules (torch, numpy, matplotlib) are imported inside the commands, so that
# registering the parser keeps `runtime --help` instant.
logger = logging.getLogger(__name__)
MODEL_SPECS = ("demo", "demo-shape", "smollm2-135m-shape", "tiny")  # model_spec.SPECS + demo


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str) -> list[float]:
    return [float(v) for v in _csv(value)]


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by offline and online mode: what to replay and where results go."""
    p.add_argument(
        "--workload",
        default="smoke",
        help="named workload(s) in benchmarks/workloads/ or YAML file(s), comma "
        "separated; several go to OUT/<name>/ (default smoke)",
    )
    p.add_argument("--num-requests", type=int, help="override the workload's request count")
    p.add_argument("--rate", type=float, help="override: Poisson arrivals at this rate (req/s)")
    p.add_argument("--all-at-once", action="store_true", help="override: all requests at t=0")
    p.add_argument("--seed", type=int, help="override the workload's seed")
    p.add_argument(
        "--model-spec",
        choices=MODEL_SPECS,
        default=None,
        help="random model of a named shape, built once and cached; demo = the trained demo "
        "model when present, else demo-shape (default demo)",
    )
    p.add_argument("--model", help="a Hugging Face model folder instead of --model-spec")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats (default 1)")
    p.add_argument(
        "--baseline", help="contender the ratio table divides by (default: the first one)"
    )
    p.add_argument("--out", default="bench-results", help="folder for JSON and PNG results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `bench` (and `bench serve`) on the top-level subparsers of `runtime`."""
    bench = sub.add_parser("bench", help="compare schedulers and peer engines on one workload")
    add_workload_arguments(bench)
    bench.add_argument(
        "--schedulers",
        type=_csv,
        help="comma list of scheduler entry points, or 'default' for the "
        "engine's built-in FCFS (default: every installed scheduler); LABEL=NAME adds a "
        "contender LABEL running scheduler NAME, so one scheduler can run with several "
        "--scheduler-option sets (baton,baton-1b=baton --scheduler-option baton-1b.max_buckets=1)",
    )
    bench.add_argument(
        "--scheduler-option",
        action="append",
        default=[],
        metavar="NAME.KEY=VAL",
        help="a scheduler_options entry, e.g. static.max_batch_size=8 (YAML value)",
    )
    bench.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="LABEL.KEY=VAL",
        help="an engine setting for one contender, e.g. baton-sdpa.attention_backend=sdpa "
        f"(keys: {', '.join(PER_CONTENDER_ENGINE_OPTIONS)}; the others change the model all "
        "contenders share, so they are global flags)",
    )
    bench.add_argument(
        "--peers",
        type=_csv,
        default=[],
        help="peer engines on the same model: transformers, transformers-cb",
    )
    bench.add_argument(
        "--rate-sweep",
        type=_floats,
        help="comma list of Poisson rates: run the workload at each one",
    )
    bench.add_argument("--max-num-seqs", type=int, default=64, help="batch size limit (default 64)")
    bench.add_argument(
        "--max-model-len", type=int, help="context length (default: the workload's longest request)"
    )
    bench.add_argument("--kv-cache-tokens", type=int, help="KV capacity in tokens")
    bench.add_argument("--kv-cache-memory", help="KV budget: auto, a fraction or a size (4GiB)")
    bench.add_argument("--kv-cache-dtype", default="auto",
                       help="KV storage: auto (the model's dtype), bfloat16 or float16")
    bench.add_argument("--linear-backend", default="auto",
                       help="auto, torch, onednn, mkl or native")
    bench.add_argument("--attention-backend", default="auto",
                       help="decode attention: auto, native or sdpa")
    bench.add_argument("--compile", action="store_true",
                       help="every contender runs the compiled decoder (runtime.compiled_forward)")
    bench.add_argument("--static-decode-rows", type=int, nargs="+", metavar="N", default=(),
                       help="with --compile: every contender also runs fixed-shape graphs for "
                            "passes of up to these row counts (runtime.static_graphs; built "
                            "once, shared by all)")
    bench.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    bench.add_argument("--device", default="cpu",
                       help="where the model and every contender run: cpu, cuda, cuda:N or "
                            "auto (CUDA when available; default cpu)")
    bench.add_argument(
        "--num-threads", type=int, help="torch CPU threads (default: one per physical core)"
    )
    modes = bench.add_subparsers(dest="bench_mode")
    serve = modes.add_parser("serve", help="replay over HTTP against OpenAI-compatible servers")
    add_workload_arguments(serve)
    serve.add_argument(
        "--base-url",
        action="append",
        default=[],
        metavar="[NAME=]URL",
        help="server to replay against (repeatable: NAME=URL compares servers)",
    )
    serve.add_argument(
        "--max-concurrency",
        type=int,
        help="most requests in flight (as vLLM's bench); 1 sends them one at a time",
    )
    serve.add_argument(
        "--servers",
        metavar="FILE",
        help="YAML of servers the bench starts itself, one at a time (name: {url, command, "
        "env}); see runtime/bench/launch.py",
    )
    serve.add_argument(
        "--served-model-name",
        help="model id to request (default: the first one GET /v1/models lists)",
    )
    compare = modes.add_parser(
        "compare",
        help="pool the repeats of earlier runs of one workload and compare them repeat by "
        "repeat (geometric mean, 95%% interval, verdict)",
    )
    compare.add_argument("results", nargs="+", type=Path, metavar="RESULTS",
                         help="results.json files of earlier runs, or the folders holding them")
    compare.add_argument("--baseline", help="contender to divide by (default: the runs' own)")
    return bench


def run_compare_cli(args: argparse.Namespace) -> int:
    """`runtime bench compare`: the paired table over the pooled repeats of earlier runs."""
    from runtime.bench.paired import format_paired, paired_ratios, pool_runs

    try:
        runs, header = pool_runs(args.results)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    baseline = args.baseline or header.get("baseline") or next(iter(runs), None)
    if baseline not in runs:
        print(f"error: baseline {baseline!r} is not in every file (they share: "
              f"{', '.join(runs) or 'no contender'})", file=sys.stderr)
        return 2
    paired = paired_ratios(runs, baseline)
    if not paired:
        print(f"error: nothing to pair: {baseline!r} has {len(runs[baseline])} repeat(s) and "
              "needs 2 or more beside another contender", file=sys.stderr)
        return 2
    print(f"{header['workload'].get('name')}: {len(runs[baseline])} repeats from "
          f"{len(args.results)} file(s)")
    print(format_paired(paired, baseline))
    return 0


def _split_option(flag: str, entry: str, form: str) -> tuple[str, str, str]:
    """`NAME.KEY=VALUE` -> (NAME, KEY, VALUE), or an error naming the flag and the entry."""
    key, sep, value = entry.partition("=")
    name, dot, option = key.partition(".")
    if not sep or not dot:
        raise ValueError(f"{flag} {entry!r}: expected {form}")
    return name, option, value


def _scheduler_options(entries: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for entry in entries:
        name, option, value = _split_option("--scheduler-option", entry, "NAME.KEY=VALUE")
        out.setdefault(name, {})[option] = yaml.safe_load(value)
    return out


PER_CONTENDER_ENGINE_OPTIONS = ("attention_backend", "kv_cache_dtype")


def _engine_options(entries: list[str], labels: list[str]) -> dict[str, dict]:
    """`--engine-option LABEL.KEY=VAL` entries by contender label, checked."""
    out: dict[str, dict] = {}
    for entry in entries:
        label, option, value = _split_option("--engine-option", entry, "LABEL.KEY=VALUE")
        if option not in PER_CONTENDER_ENGINE_OPTIONS:
            raise ValueError(f"--engine-option {entry!r}: {option!r} cannot differ between "
                             f"contenders (one of: {', '.join(PER_CONTENDER_ENGINE_OPTIONS)})")
        if label not in labels:
            raise ValueError(f"--engine-option {entry!r}: no contender {label!r} "
                             f"(contenders: {', '.join(labels)})")
        out.setdefault(label, {})[option] = value
    return out


def _default_schedulers() -> list[str]:
    from runtime.plugins import installed_schedulers

    return sorted(s.name for s in installed_schedulers()) or ["default"]


def _workload(
    args: argparse.Namespace, name: str, vocab_size: int, max_len: int, rate: float | None = None
):
    """The named workload with this run's overrides, and its seeded request list."""
    spec = load_workload(name).with_overrides(
        args.num_requests, rate if rate is not None else args.rate, args.all_at_once, args.seed
    )
    return spec, generate_requests(spec, vocab_size, max_len)


def _summarise(
    result: ComparisonResult, args: argparse.Namespace, header: dict, out: Path, tag: str = ""
) -> dict[str, dict]:
    """Print the per-contender reports and ratios; write the JSON files; return the results."""
    from runtime.bench.metrics import aggregate, request_timelines
    from runtime.bench.paired import format_paired, paired_ratios
    from runtime.bench.report import (
        format_ratios,
        format_report,
        format_summary,
        ratio_table,
        vllm_result,
        write_json,
    )

    results = {label: aggregate(runs) for label, runs in result.runs.items()}
    for label, metrics in results.items():
        print(format_report(metrics, title=label))
    if results:
        print(format_summary(results))
    baseline = args.baseline or next(iter(results), None)  # default: the first contender
    ratios, paired = {}, {}
    if baseline in results:
        ratios = ratio_table(results, baseline)
        print(format_ratios(ratios, baseline))
        paired = paired_ratios(result.runs, baseline)
        if paired:
            print(format_paired(paired, baseline))
    elif baseline:
        print(f"baseline {baseline!r} did not run; no ratio table", file=sys.stderr)
    for label, reason in result.errors.items():
        print(f"{label}: could not run: {reason}")
    payload = header | {
        "baseline": baseline,
        "results": results,
        "ratios": ratios,
        "paired_ratios": {
            label: {key: ratio.as_json() for key, ratio in rows.items()}
            for label, rows in paired.items()
        },
        "runs": result.runs,
        "unavailable": result.errors,
    }
    write_json(out / f"results{tag}.json", payload)
    write_json(out / f"requests{tag}.json", {
        label: [request_timelines(trace) for trace in traces]
        for label, traces in result.traces.items()})
    for label, metrics in results.items():
        write_json(
            out / f"{label}{tag}.json",
            vllm_result(
                metrics,
                label,
                {
                    "date": header["date"],
                    "model_id": header["model"],
                    "num_prompts": header["workload"]["num_requests"],
                    "request_rate": header["workload"]["arrival"],
                },
            ),
        )
    if not args.no_plots and results:
        from runtime.bench.plots import plot_latency_cdfs, plot_throughput

        title = f"{header['workload']['name']} on {header['model_name']}{tag}"
        plot_throughput(results, out / f"throughput{tag}.png", title)
        plot_latency_cdfs(result.traces, out / f"latency_cdf{tag}.png", title)
    return results


def _header(args: argparse.Namespace, spec: Any, model_dir: Path, mode: str,
            **where: Any) -> dict:
    """The run's identity in its JSON; `where`: offline mode's device and dtype."""
    from runtime.bench.report import machine_info

    return where | {
        "mode": mode,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "runtime " + " ".join(sys.argv[1:]),
        "workload": spec.as_dict(),
        "model": str(model_dir),
        "model_name": args.model_spec or model_dir.name,
        "repeats": args.repeats,
        "machine": machine_info(),
    }


def run_offline_cli(args: argparse.Namespace) -> int:
    """Build every contender once, then run each workload (and each rate of the sweep)."""
    import torch

    from runtime.bench.model_spec import resolve_model
    from runtime.bench.offline import EngineContender, run_comparison
    from runtime.bench.peers import PeerUnavailable, make_peer
    from runtime.bootstrap import configure_host, resolve_device
    from runtime.config import check_static_decode_rows
    from runtime.engine import EngineLimits
    from runtime.loader import load_model, load_model_config
    from runtime.package_builder import ModelSource

    static_rows = check_static_decode_rows(list(args.static_decode_rows), args.compile,
                                           "--static-decode-rows", "--compile")
    device = resolve_device(args.device)
    configure_host(args.num_threads)
    model_dir = resolve_model(args.model_spec, args.model)
    config = load_model_config(model_dir)
    names = _csv(args.workload)
    longest = max(load_workload(n).max_total_len() for n in names)
    max_len = args.max_model_len or min(config.max_position_embeddings, longest)
    model = load_model(model_dir, dtype=args.dtype, device=device)
    source = ModelSource(model_dir, model.config.torch_dtype)
    where = _where(device)  # for the header line and results.json
    limits = EngineLimits(args.max_num_seqs, max_len, args.kv_cache_tokens, args.kv_cache_memory,
                          args.kv_cache_dtype)
    options = _scheduler_options(args.scheduler_option)
    entries = [e.rpartition("=") for e in args.schedulers or _default_schedulers()]
    labels = [label or name for label, _, name in entries]  # LABEL=SCHEDULER: one runs twice
    engine_options = _engine_options(args.engine_option, labels)
    contenders: list[Any] = []
    for label, (_, _, name) in zip(labels, entries, strict=True):
        own = engine_options.get(label, {})
        attention = own.get("attention_backend", args.attention_backend)
        own_limits = dataclasses.replace(
            limits, kv_cache_dtype=own.get("kv_cache_dtype", args.kv_cache_dtype))
        contenders.append(
            EngineContender(label, name, model, None, own_limits, options.get(label),
                            args.linear_backend, args.compile, attention,
                            static_rows, source)
        )
    unavailable = {}
    for name in args.peers:
        try:
            contenders.append(make_peer(name, model_dir, args.max_num_seqs, max_len,
                                        getattr(torch, model.config.torch_dtype), device))
        except PeerUnavailable as exc:
            unavailable[name] = str(exc)
            print(f"peer {name}: not available: {exc}", file=sys.stderr)
    for name in names:
        out = Path(args.out) / Path(name).stem if len(names) > 1 else Path(args.out)
        sweep = {}
        for rate in args.rate_sweep or [None]:
            spec, requests = _workload(args, name, config.vocab_size, max_len, rate)
            arrival = "all at once" if spec.rate is None else f"Poisson {spec.rate:g} req/s"
            print(
                f"workload {spec.name}: {len(requests)} requests, {arrival}; model {model_dir}, "
                f"max_model_len {max_len}; contenders {', '.join(c.label for c in contenders)}; "
                f"{args.repeats} repeat(s), {where}"
            )
            result = run_comparison(contenders, requests, args.repeats, not args.no_progress)
            result.errors |= unavailable
            header = _header(args, spec, model_dir, "offline", device=where,
                             dtype=model.config.torch_dtype)
            tag = f"-rate{rate:g}" if rate is not None else ""
            sweep[spec.rate] = _summarise(result, args, header, out, tag)
        if args.rate_sweep:
            _write_sweep(sweep, out, name, args.no_plots)
        print(f"results written to {out}/")
    return 0


def _where(device: Any) -> str:
    """What the contenders run on, for the run's header line."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{torch.get_num_threads()} torch thread(s)"


def _write_sweep(sweep: dict, out: Path, name: str, no_plots: bool) -> None:
    from runtime.bench.report import write_json

    write_json(out / "rate_sweep.json", {str(r): v for r, v in sweep.items()})
    if not no_plots:
        from runtime.bench.plots import plot_rate_sweep

        plot_rate_sweep(sweep, out / "rate_sweep.png", f"{name} rate sweep")


def run_online_cli(args: argparse.Namespace) -> int:
    """`runtime bench serve`: see `runtime.bench.online.run_online_cli`."""
    from runtime.bench import online

    return online.run_online_cli(args)
