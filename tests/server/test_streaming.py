"""Disconnects abort within a step and free the cache; a failing request ends with an error
event and `[DONE]` while others finish; a dead engine loop fails in-flight requests and /health."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runtime.request import FinishReason
from tests.server.conftest import LiveServer, start_server

MAGIC = 500  # a token id only the "poisoned" prompts contain


def events(resp: httpx.Response) -> Iterator[dict | str]:
    """The SSE data payloads of a streaming response: dicts, or the final "[DONE]"."""
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def slow_model(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, delay: float, poison: bool = False
) -> None:
    """Make every forward pass take `delay` s; with `poison`, passes that feed >= 4 MAGIC
    tokens raise, as a broken kernel would."""
    model = server.engine.model
    forward = model.forward

    def wrapped(input_ids, *args, **kwargs):
        time.sleep(delay)
        if poison and int((input_ids == MAGIC).sum()) >= 4:
            raise RuntimeError("injected forward failure")
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", wrapped)


def running_request(server: LiveServer, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not server.engine.running:
        assert time.monotonic() < deadline, "request never started running"
        time.sleep(0.005)
    return server.engine.running[0]


def test_streaming_disconnect_aborts_and_frees(server: LiveServer, monkeypatch) -> None:
    slow_model(server, monkeypatch, 0.02)
    body = {"prompt": "Hello", "max_tokens": 120, "stream": True, "temperature": 0}
    with server.client() as http, http.stream("POST", "/v1/completions", json=body) as resp:
        it = events(resp)
        first, second = next(it), next(it)
        assert first["choices"] and second["choices"]
        req = running_request(server)
        tokens_at_close = req.num_output_tokens
    # leaving the block closed the connection mid-stream
    server.wait_idle()
    assert req.finish_reason is FinishReason.ABORT
    assert req.num_output_tokens <= tokens_at_close + 3, "abort must land within a step or so"
    assert server.engine.kv_cache.is_empty() and not server.engine.running
    metrics = server.client().get("/metrics").text
    assert 'finished_reason="abort"' in metrics


def test_non_streaming_disconnect_aborts(server: LiveServer, monkeypatch) -> None:
    slow_model(server, monkeypatch, 0.02)
    body = {"prompt": "Hello", "max_tokens": 120, "temperature": 0}
    seen = {}

    def watch() -> None:
        seen["req"] = running_request(server)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with (
        server.client(timeout=httpx.Timeout(30.0, read=0.3)) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/completions", json=body)
    closed_at = seen["req"].num_output_tokens
    watcher.join()
    server.wait_idle()
    req = seen["req"]
    assert req.finish_reason is FinishReason.ABORT and req.num_output_tokens < 120
    assert req.num_output_tokens <= closed_at + 3
    assert server.engine.kv_cache.is_empty()


def test_failing_request_gets_error_event_others_finish(
    server: LiveServer, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A's batch runs clean; B's prefill pass raises: B gets a 500 error event then [DONE],
    A streams to its end, and the server keeps serving. The 500 names the request for the
    log, which has the exception; its text stays out of the response."""
    slow_model(server, monkeypatch, 0.002, poison=True)
    good = {"prompt": "Hello", "max_tokens": 30, "stream": True, "temperature": 0}
    bad = {"prompt": [MAGIC] * 4, "max_tokens": 5, "stream": True}
    with server.client() as http, http.stream("POST", "/v1/completions", json=good) as a:
        a_events = events(a)
        assert next(a_events)["choices"]
        with server.client() as http_b, http_b.stream("POST", "/v1/completions", json=bad) as b:
            assert b.status_code == 200
            b_events = list(events(b))
        rest = list(a_events)
    assert b_events[-1] == "[DONE]"
    err = b_events[-2]["error"]
    assert err["code"] == 500 and err["type"] == "InternalServerError"
    assert "injected" not in err["message"] and "RuntimeError" not in err["message"]
    request_id = err["message"].split("(request ", 1)[1].split(")", 1)[0]
    assert f"request {request_id} failed" in caplog.text and "injected forward" in caplog.text
    assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
    with server.client() as http:
        resp = http.post("/v1/completions", json={"prompt": [MAGIC] * 4, "max_tokens": 2})
        assert resp.status_code == 500 and resp.json()["error"]["type"] == "InternalServerError"
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    server.wait_idle()


def test_engine_loop_death(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-flight streams end with an error event and [DONE]; /health and new requests 503."""
    live = start_server(model_dir, "static")
    try:
        slow_model(live, monkeypatch, 0.01)
        engine = live.engine
        body = {"prompt": "Hello", "max_tokens": 100, "stream": True}
        with live.client() as http, http.stream("POST", "/v1/completions", json=body) as resp:
            it = events(resp)
            assert next(it)["choices"]

            def broken_step():
                raise RuntimeError("scheduler bug")

            monkeypatch.setattr(engine, "step", broken_step)
            rest = list(it)
        assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == 500
        assert "engine loop died" in rest[-2]["error"]["message"]
        with live.client() as http:
            assert http.get("/health").status_code == 503
            resp = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert resp.status_code == 503
    finally:
        live.stop()
