"""Online mode against a stub OpenAI-compatible streaming server (FastAPI + uvicorn)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from runtime.bench.metrics import compute_metrics
from runtime.bench.online import run_online
from runtime.bench.workload import BenchRequest
from runtime.cli import main

TOKEN_DELAY = 0.01
seen: list[dict] = []


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(body: dict):
        seen.append(body)
        if body["max_tokens"] > 50:
            return JSONResponse({"error": {"message": "too long", "param": "max_tokens"}}, 400)

        async def events():
            for i in range(body["max_tokens"]):
                await asyncio.sleep(TOKEN_DELAY)
                chunk = {"id": "cmpl-1", "choices": [{"index": 0, "text": f" t{i}"}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@contextmanager
def serving(app: FastAPI):
    """`app` on a free local port in a thread; yields its URL once it accepts connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "stub server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def stub_url():
    with serving(make_app()) as url:
        yield url


def test_replay_streams_and_times_every_chunk(stub_url):
    seen.clear()
    reqs = [
        BenchRequest(0, 0.0, (20, 21, 22), 4),
        BenchRequest(1, 0.2, (23,), 3),
        BenchRequest(2, 0.05, (24, 25), 60),
    ]
    trace, model = run_online(stub_url, reqs, progress=False)
    assert model == "stub-model"
    body = next(b for b in seen if b["prompt"] == [20, 21, 22])
    assert body["stream"] and body["ignore_eos"] and body["max_tokens"] == 4
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "stub-model"
    ok, late, failed = trace.requests
    assert ok.success and ok.output_len == 4 and len(ok.token_times) == 4
    # sent no earlier than its arrival time; the upper bound only guards against a hang
    assert ok.ttft >= TOKEN_DELAY and 0.19 <= late.arrival - trace.start < 5.0
    assert not failed.success and "HTTP 400" in failed.error
    m = compute_metrics(trace)
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (2, 1, 7)
    assert m["mean_itl_ms"] >= TOKEN_DELAY * 1000 * 0.9


def test_bench_serve_cli_compares_two_servers(stub_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BATON_RUNTIME_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "online"
    rc = main(
        [
            "bench",
            "serve",
            "--base-url",
            f"a={stub_url}",
            "--base-url",
            f"b={stub_url}",
            "--model-spec",
            "tiny",
            "--workload",
            "smoke",
            "--num-requests",
            "4",
            "--baseline",
            "a",
            "--out",
            str(out),
            "--no-progress",
            "--no-plots",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert text.count("============ Serving Benchmark Result ============") == 2
    data = json.loads((out / "results.json").read_text())
    assert data["mode"] == "online" and data["results"]["a"]["completed"] == 4
    assert data["ratios"]["a"]["request_throughput"] == 1.0
    timelines = json.loads((out / "requests.json").read_text())
    assert [len(run) for run in timelines["b"]] == [4]
    assert sum(len(r["token_times"]) for r in timelines["b"][0]) == \
        data["runs"]["b"][0]["total_output_tokens"]


def test_bench_serve_replays_several_workloads_into_their_own_folders(
        stub_url, tmp_path, monkeypatch, capsys):
    """`--workload a,b` (as offline mode takes it): each workload is replayed against every
    server and written to OUT/<name>/; an unknown name fails before any replay."""
    monkeypatch.setenv("BATON_RUNTIME_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "online"
    args = ["bench", "serve", "--base-url", f"a={stub_url}", "--model-spec", "tiny",
            "--num-requests", "2", "--out", str(out), "--no-progress", "--no-plots"]
    other = tmp_path / "short.yaml"  # a workload file beside a named one
    other.write_text("name: short\nseed: 1\nnum_requests: 3\narrival: all-at-once\n"
                     "prompt_len: [4, 8]\noutput_len: [2, 4]\n")
    assert main([*args, "--workload", f"smoke,{other}"]) == 0
    text = capsys.readouterr().out
    assert "requests of smoke against" in text and "requests of short against" in text
    for name in ("smoke", "short"):
        data = json.loads((out / name / "results.json").read_text())
        assert data["workload"]["name"] == name and data["results"]["a"]["completed"] == 2
    assert not (out / "results.json").exists()
    assert main([*args, "--workload", "smoke,nope"]) == 2
    captured = capsys.readouterr()
    assert "unknown workload 'nope'" in captured.err and "replaying" not in captured.out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_serve_starts_each_server_in_turn(tmp_path, monkeypatch, capsys):
    """`--servers FILE`: the bench launches one server at a time and stops it afterwards."""
    import shlex
    import sys

    import yaml

    monkeypatch.setenv("BATON_RUNTIME_CACHE", str(tmp_path / "cache"))
    ports = {"first": free_port(), "second": free_port()}
    marker = tmp_path / "alive"
    servers = tmp_path / "servers.yaml"
    spec = {}
    for name, port in ports.items():
        # the stub notes, as it starts, whether the other server is up: the bench must have
        # stopped it by then
        others = [q for n, q in ports.items() if n != name]
        delay = 1.5 if name == "second" else 0  # a slower start, to be measured
        code = (f"import pathlib, socket, time, uvicorn; time.sleep({delay}); "
                f"from tests.bench.test_online import make_app; "
                f"up = any(socket.socket().connect_ex(('127.0.0.1', q)) == 0 for q in {others}); "
                f"pathlib.Path({str(marker)!r}).open('a').write(f'{name} starts; other up: "
                f"{{up}}' + chr(10)); "
                f"uvicorn.run(make_app(), host='127.0.0.1', port={port}, log_level='warning')")
        spec[name] = {"url": f"http://127.0.0.1:{port}", "startup_timeout": 60,
                      "command": f"{sys.executable} -c {shlex.quote(code)}"}
    servers.write_text(yaml.safe_dump(spec))
    out = tmp_path / "online"
    rc = main(["bench", "serve", "--servers", str(servers), "--model-spec", "tiny",
               "--workload", "smoke", "--num-requests", "3", "--repeats", "2",
               "--out", str(out), "--no-progress", "--no-plots"])
    assert rc == 0
    starts = marker.read_text().splitlines()
    assert starts == ["first starts; other up: False", "second starts; other up: False",
                      "second starts; other up: False", "first starts; other up: False"]
    data = json.loads((out / "results.json").read_text())
    assert data["results"]["first"]["completed"] == 3 and "servers" in data
    assert (out / "server-logs" / "first.log").exists()
    # each repeat records its server's launch-to-ready time, the slower start too
    startups = {n: [r["server_startup_s"] for r in runs] for n, runs in data["runs"].items()}
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in startups.values())
    assert min(startups["second"]) >= 1.5
    printed = capsys.readouterr().out
    assert "Server startup, launch to ready (s)" in printed and "second: ready" in printed
    for port in ports.values():  # both stopped at the end
        assert socket.socket().connect_ex(("127.0.0.1", port)) != 0


def test_bench_servers_file_errors_name_the_entry(tmp_path):
    from runtime.bench.launch import load_servers

    bad = tmp_path / "s.yaml"
    bad.write_text("vllm: {url: http://x}\n")
    with pytest.raises(ValueError, match="'vllm' needs 'url' and 'command'"):
        load_servers(bad)


def test_a_server_that_cannot_start_is_named_with_its_log(tmp_path, monkeypatch, capsys):
    """A command that is not on PATH, or a server that exits before it is ready: the bench
    says which server, and where its output went, instead of a traceback."""
    import sys

    import yaml

    monkeypatch.setenv("BATON_RUNTIME_CACHE", str(tmp_path / "cache"))
    cases = {"missing": "no-such-server-program --port 1",
             "crashing": f"{sys.executable} -c 'import sys; sys.exit(3)'"}
    errors = {}
    for name, command in cases.items():
        servers = tmp_path / f"{name}.yaml"
        servers.write_text(yaml.safe_dump(
            {name: {"url": f"http://127.0.0.1:{free_port()}", "command": command}}))
        rc = main(["bench", "serve", "--servers", str(servers), "--model-spec", "tiny",
                   "--workload", "smoke", "--num-requests", "1", "--out", str(tmp_path / name),
                   "--no-progress", "--no-plots"])
        assert rc == 2
        errors[name] = capsys.readouterr().err
        assert f"server {name!r}" in errors[name] and "Traceback" not in errors[name]
    assert "cannot start 'no-such-server-program' (No such file or directory)" in errors["missing"]
    log = tmp_path / "crashing" / "server-logs" / "crashing.log"
    assert f"exited with code 3 before it was ready (its output: {log})" in errors["crashing"]


def test_an_empty_server_command_is_refused(tmp_path):
    from runtime.bench.launch import load_servers

    bad = tmp_path / "s.yaml"
    bad.write_text("baton: {url: http://x, command: ''}\n")
    with pytest.raises(ValueError, match="'baton': 'command' is empty"):
        load_servers(bad)


def test_a_server_command_with_an_unset_variable_is_refused(tmp_path, monkeypatch):
    from runtime.bench.launch import load_servers

    monkeypatch.setenv("MODEL", "/models/m")
    monkeypatch.delenv("DTYPE", raising=False)
    servers = tmp_path / "s.yaml"
    servers.write_text("baton: {url: http://x, command: 'runtime serve $MODEL --dtype ${DTYPE}'}\n")
    with pytest.raises(ValueError, match=r"'baton': its command uses \$DTYPE, not set"):
        load_servers(servers)
    monkeypatch.setenv("DTYPE", "float32")
    assert load_servers(servers)[0].command == "runtime serve /models/m --dtype float32"


@pytest.mark.parametrize("name", ["runtime-vs-vllm", "compiled-vs-vllm", "scale-out",
                                  "three-way"])
def test_shipped_servers_files_load(name, monkeypatch):
    from pathlib import Path

    from runtime.bench.launch import load_servers

    for variable, value in {"MODEL": "/models/m", "DTYPE": "float32", "LB": "auto"}.items():
        monkeypatch.setenv(variable, value)  # what each file's header says to set

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "servers" / f"{name}.yaml"
    servers = load_servers(path)
    assert servers and all(s.url.startswith("http://127.0.0.1:") for s in servers)
    assert len({s.url for s in servers}) == len(servers)  # one port each


def test_max_concurrency_one_sends_each_request_after_the_previous(stub_url):
    reqs = [BenchRequest(i, 0.0, (20 + i,), 3) for i in range(3)]
    trace, _ = run_online(stub_url, reqs, progress=False, max_concurrency=1)
    spans = sorted((r.arrival, r.token_times[-1]) for r in trace.requests)
    assert all(r.success for r in trace.requests)
    assert all(spans[i + 1][0] >= spans[i][1] for i in range(2))  # no overlap


def test_launch_waits_for_a_background_compile(tmp_path):
    """A `compile: background` server is healthy at once; the bench waits until its
    `runtime:compile_pending_graphs` reads 0 before replaying (a server without the metric,
    such as vLLM, is used as soon as it is healthy)."""
    from fastapi.responses import PlainTextResponse

    from runtime.bench.launch import pending_graphs, wait_healthy

    scrapes: list[int] = []
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {}

    @app.get("/metrics")
    async def metrics():
        scrapes.append(1)
        pending = max(0, 3 - len(scrapes))
        return PlainTextResponse(
            "# HELP runtime:compile_pending_graphs ...\n"
            f'runtime:compile_pending_graphs{{model_name="m",scheduler="baton"}} {pending}.0\n')

    class Alive:
        returncode = None

        def poll(self):
            return None

    with serving(app) as url:
        wait_healthy(url, Alive(), timeout=30)
        assert len(scrapes) == 3  # polled until the queue drained
        assert pending_graphs(url) == 0
    assert pending_graphs(url) is None  # nothing there any more: not reported
