"""Online benchmark: replay a workload over HTTP against any OpenAI-compatible server.

Like `vllm bench serve`: every request is a streaming `POST /v1/completions` with token-id
prompts, `ignore_eos` and `max_tokens` (so `runtime serve` and `vllm serve` do the same work),
sent at its arrival time; a timestamp is taken per chunk carrying choices, and the output
token count comes from the final usage chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from runtime.bench.launch import ServerSpec, StartedServer, load_servers, running
from runtime.bench.metrics import RequestTrace, RunTrace
from runtime.bench.workload import BenchRequest, load_workload


def completion_payload(model: str, req: BenchRequest) -> dict:
    """The request body: greedy, forced length, streamed with a usage chunk at the end."""
    return {
        "model": model,
        "prompt": list(req.prompt_token_ids),
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def discover_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id the server lists (`GET /v1/models`)."""
    resp = await client.get(f"{base_url}/v1/models")
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --served-model-name")
    return str(data[0]["id"])


async def _stream_one(
    client: httpx.AsyncClient, base_url: str, model: str, req: BenchRequest, start: float,
    gate: asyncio.Semaphore,
) -> RequestTrace:
    """Send one request at its arrival time (and a free concurrency slot); time every chunk."""
    await asyncio.sleep(max(0.0, start + req.arrival - time.perf_counter()))
    async with gate:
        return await _send(client, base_url, model, req)


async def _send(
    client: httpx.AsyncClient, base_url: str, model: str, req: BenchRequest
) -> RequestTrace:
    sent = time.perf_counter()
    times: list[float] = []
    usage_tokens: int | None = None
    error = ""
    try:
        async with client.stream(
            "POST", f"{base_url}/v1/completions", json=completion_payload(model, req)
        ) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                error = f"HTTP {resp.status_code}: {body[:300]}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = f"stream error: {chunk['error']}"
                        break
                    if chunk.get("choices"):
                        times.append(time.perf_counter())
                    elif chunk.get("usage"):
                        usage_tokens = chunk["usage"].get("completion_tokens")
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    out_len = usage_tokens if usage_tokens is not None else len(times)
    ok = not error and bool(times) and out_len == req.output_len
    if not error and out_len != req.output_len:
        error = f"expected {req.output_len} tokens, got {out_len}"
    return RequestTrace(req.prompt_len, out_len, sent, times, ok, error)


async def run_online_async(
    base_url: str,
    requests: Sequence[BenchRequest],
    model: str | None = None,
    progress: bool = True,
    timeout: float | None = None,
    max_concurrency: int | None = None,
) -> tuple[RunTrace, str]:
    """Replay `requests` against `base_url`; returns the trace and the model id used.

    `max_concurrency` caps requests in flight (vLLM's `--max-concurrency`): 1 replays them
    one at a time, each sent when the previous one has finished.
    """
    base_url = base_url.rstrip("/")
    limits = httpx.Limits(max_connections=max(100, len(requests)), max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = model or await discover_model(client, base_url)
        bar = tqdm(
            total=len(requests), desc="requests", unit="req", disable=not progress, leave=False
        )
        gate = asyncio.Semaphore(max_concurrency or len(requests) or 1)
        start = time.perf_counter()

        async def one(req: BenchRequest) -> RequestTrace:
            trace = await _stream_one(client, base_url, model, req, start, gate)
            bar.update(1)
            return trace

        traces = await asyncio.gather(*(one(r) for r in requests))
        end = time.perf_counter()
        bar.close()
    return RunTrace(list(traces), start, end), model


def run_online(
    base_url: str, requests: Sequence[BenchRequest], model: str | None = None,
    progress: bool = True, max_concurrency: int | None = None,
) -> tuple[RunTrace, str]:
    """Synchronous wrapper of `run_online_async` (the CLI entry point)."""
    return asyncio.run(
        run_online_async(base_url, requests, model, progress, max_concurrency=max_concurrency)
    )


def parse_targets(values: list[str]) -> list[tuple[str, str]]:
    """`--base-url` values, `URL` or `NAME=URL`, as (label, url) pairs."""
    targets = []
    for i, value in enumerate(values):
        name, sep, url = value.partition("=")
        if sep and not name.startswith("http"):
            targets.append((name, url))
        else:
            targets.append((f"server{i + 1}" if len(values) > 1 else "server", value))
    return targets


def run_online_cli(args: Any) -> int:
    """Replay each workload against each server in turn (interleaved repeats), same client;
    several workloads (comma separated) write to OUT/<name>/, as offline mode does."""
    from runtime.bench.main import _csv
    from runtime.bench.model_spec import resolve_model
    from runtime.loader import load_model_config

    model_dir = resolve_model(args.model_spec, args.model)
    config = load_model_config(model_dir)
    names = _csv(args.workload)
    for name in names:  # every name checked before the first server starts
        load_workload(name)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    servers = {s.name: s for s in load_servers(args.servers)} if args.servers else {}
    targets = parse_targets(args.base_url) + [(s.name, s.url) for s in servers.values()]
    if not targets:
        raise ValueError("bench serve: give --base-url URL or --servers FILE")
    for name in names:
        out = Path(args.out) / Path(name).stem if len(names) > 1 else Path(args.out)
        _replay_workload(args, name, config, model_dir, servers, targets, out)
        print(f"results written to {out}/")
    return 0


def _replay_workload(args: Any, name: str, config: Any, model_dir: Path,
                     servers: dict[str, ServerSpec], targets: list[tuple[str, str]],
                     out: Path) -> None:
    from runtime.bench.main import _header, _summarise, _workload
    from runtime.bench.metrics import compute_metrics
    from runtime.bench.offline import ComparisonResult

    max_len = min(config.max_position_embeddings, load_workload(name).max_total_len())
    spec, requests = _workload(args, name, config.vocab_size, max_len)
    result = ComparisonResult()
    for rep in range(args.repeats):
        for label, url in targets[rep % len(targets) :] + targets[: rep % len(targets)]:
            print(f"{label}: replaying {len(requests)} requests of {spec.name} against {url}")
            with _maybe_started(servers.get(label), out) as started:
                trace, _ = run_online(url, requests, args.served_model_name,
                                      not args.no_progress, args.max_concurrency)
            metrics = compute_metrics(trace)
            if started is not None:
                metrics["server_startup_s"] = started.startup_s
                print(f"{label}: ready {started.startup_s:.1f} s after launch")
            result.runs.setdefault(label, []).append(metrics)
            result.traces.setdefault(label, []).append(trace)
            failed = [r.error for r in trace.requests if not r.success]
            if failed:
                print(f"{label}: {len(failed)} failed, first: {failed[0]}", file=sys.stderr)
    header = _header(args, spec, model_dir, "online") | {"base_urls": dict(targets)}
    if servers:
        header["servers"] = {n: {"command": s.command, "env": s.env} for n, s in servers.items()}
    _summarise(result, args, header, out)


@contextlib.contextmanager
def _maybe_started(server: ServerSpec | None, out: Path) -> Iterator[StartedServer | None]:
    """Start `server` for the duration of one replay when the bench launches it (yield it
    started), else yield None."""
    if server is None:
        yield None
        return
    with running(server, out / "server-logs") as started:
        yield started
