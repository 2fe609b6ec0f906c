"""Graceful shutdown: stop admitting, drain, abort the rest with a final event, exit 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from runtime.server.app import SHUTDOWN_MARGIN
from tests.server.conftest import make_model_dir, start_server
from tests.server.test_streaming import events, slow_model


def refused(base_url: str) -> bool:
    try:
        httpx.get(base_url + "/health", timeout=2.0)
    except httpx.ConnectError:
        return True
    return False


def test_drain_lets_in_flight_streams_finish(model_dir: Path, monkeypatch) -> None:
    live = start_server(model_dir, shutdown_timeout=20.0)
    slow_model(live, monkeypatch, 0.01)
    body = {"prompt": "Hello", "max_tokens": 40, "stream": True}
    with live.client() as http, http.stream("POST", "/v1/completions", json=body) as resp:
        it = events(resp)
        assert next(it)["choices"]
        live.server.should_exit = True  # what SIGTERM does
        time.sleep(0.3)
        assert refused(live.base_url), "no new connections while draining"
        rest = list(it)
    assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
    live.thread.join(timeout=30)
    assert not live.thread.is_alive()


def test_drain_timeout_aborts_with_final_event(model_dir: Path, monkeypatch) -> None:
    live = start_server(model_dir, shutdown_timeout=0.3, max_num_seqs=4)
    slow_model(live, monkeypatch, 0.01)
    plain: dict = {}

    def non_streaming() -> None:
        with live.client() as http:
            plain["resp"] = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 120})

    thread = threading.Thread(target=non_streaming)
    body = {"prompt": "Hello", "max_tokens": 120, "stream": True}
    with live.client() as http, http.stream("POST", "/v1/completions", json=body) as resp:
        thread.start()
        it = events(resp)
        assert next(it)["choices"]
        while len(live.engine.running) + live.engine.num_waiting < 2:  # both in flight
            time.sleep(0.005)
        live.server.should_exit = True
        started = time.monotonic()
        rest = list(it)
    assert time.monotonic() - started < 10
    assert rest[-1] == "[DONE]"
    err = rest[-2]["error"]
    assert err["code"] == 503 and "shutting down" in err["message"]
    thread.join(timeout=10)
    assert plain["resp"].status_code == 503
    live.thread.join(timeout=30)
    assert not live.thread.is_alive()


def slow_body_client(base_url: str, extra: str = "") -> socket.socket:
    """A client that sends its headers and a few bytes of a 1000-byte body, then nothing."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: 1000\r\n{extra}\r\n"
    )
    sock.sendall(head.encode() + b'{"prompt": "')
    return sock


def test_exit_is_bounded_with_a_slow_body_client(model_dir: Path) -> None:
    """A slow-body client and a slow-header one are connected (the body timeout is the default
    60 s): the exit still comes within --shutdown-timeout plus the margin, the slow body
    getting a 503."""
    live = start_server(model_dir, shutdown_timeout=0.5)
    slow = slow_body_client(live.base_url)
    half = socket.create_connection(slow.getpeername(), timeout=30)
    half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 1")
    try:
        time.sleep(0.3)
        live.server.should_exit = True
        started = time.monotonic()
        live.thread.join(timeout=60)
        took = time.monotonic() - started
        assert not live.thread.is_alive() and took < 0.5 + SHUTDOWN_MARGIN, took
        answer = slow.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert half.recv(100) == b""
    finally:
        slow.close()
        half.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_sigterm_during_streaming_exits_zero(tmp_path: Path) -> None:
    """`runtime serve` in a subprocess: SIGTERM while a long stream runs and a slow-body
    client is connected; the stream gets a final error event and [DONE], new connections are
    refused, the exit status is 0 within the timeout plus the margin, without a traceback."""
    model = make_model_dir(tmp_path / "model", context=1024)
    port = free_port()
    exe = Path(sys.executable).with_name("runtime")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "runtime.cli"]
    config = tmp_path / "serve.yaml"  # YAML keys are the long option names; CLI wins
    config.write_text("served-model-name: tiny\nshutdown_timeout: 30\nport: 1\n")
    cmd += ["serve", str(model), "--config", str(config), "--port", str(port)]
    cmd += ["--shutdown-timeout", "0.2", "--num-threads", "1", "--body-timeout", "60"]
    cmd += ["--api-key", "sk-cli-secret"]  # logged as ***
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not become ready"
            try:
                if httpx.get(base + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 1000, "stream": True,
                "ignore_eos": True}  # sampled: an early EOS would end the stream before SIGTERM
        slow = slow_body_client(base, "Authorization: Bearer sk-cli-secret\r\n")
        auth = {"Authorization": "Bearer sk-cli-secret"}
        with httpx.stream(
            "POST", base + "/v1/completions", json=body, headers=auth, timeout=30
        ) as resp:
            it = events(resp)
            assert next(it)["choices"] and next(it)["choices"]
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rest = list(it)
        assert rest[-1] == "[DONE]"
        assert rest[-2]["error"]["code"] == 503, rest[-2]
        assert refused(base)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 0.2 + SHUTDOWN_MARGIN + 2  # + interpreter exit
        assert slow.recv(65536).startswith(b"HTTP/1.1 503 ")
        slow.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert "effective config" in log and '"shutdown_timeout": 0.2' in log
    assert '"served_model_name": "tiny"' in log and "aborting 1 unfinished" in log
    assert "Traceback" not in log, log
    assert '"body_timeout": 60.0' in log and '"api_key": "***"' in log
    assert "sk-cli-secret" not in log
