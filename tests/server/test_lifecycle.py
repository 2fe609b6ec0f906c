"""Readiness while loading and after a failed load; the periodic busy log and request logs."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from runtime.bootstrap import create_engine
from runtime.config import RuntimeConfig
from tests.server.conftest import start_server
from tests.server.test_streaming import slow_model


def test_health_is_503_while_loading(model_dir: Path) -> None:
    release = threading.Event()
    config = RuntimeConfig(model=str(model_dir), num_threads=1)

    def slow_factory():
        release.wait(30)
        return create_engine(config)

    live = start_server(model_dir, engine_factory=slow_factory, wait_ready=False)
    try:
        with live.client() as http:
            resp = http.get("/health")
            assert resp.status_code == 503 and "loading" in resp.json()["error"]["message"]
            resp = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert resp.status_code == 503
            assert http.get("/v1/models").status_code == 200
            release.set()
            for _ in range(1000):
                if http.get("/health").status_code == 200:
                    break
            assert http.post("/v1/completions", json={"prompt": "Hi"}).status_code == 200
    finally:
        release.set()
        live.stop()


def test_failed_load_stays_503_with_the_reason(model_dir: Path) -> None:
    def broken_factory():
        raise RuntimeError("weights are corrupt")

    live = start_server(model_dir, engine_factory=broken_factory, wait_ready=False)
    try:
        with live.client() as http:
            for _ in range(200):
                if live.state.load_error is not None:
                    break
                http.get("/health")
            resp = http.get("/health")
            assert resp.status_code == 503 and "weights are corrupt" in resp.text
    finally:
        live.stop()


def test_periodic_log_request_logging_and_chat_template_option(
    model_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    caplog.set_level(logging.INFO, logger="runtime.server")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # --chat-template
    live = start_server(model_dir, log_interval=0.1, log_requests=True, chat_template=template)
    try:
        slow_model(live, monkeypatch, 0.01)
        with live.client() as http:
            body = {"prompt": "Hello", "max_tokens": 30}
            rid = http.post("/v1/completions", json=body).json()["id"]
            chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
            usage = http.post("/v1/chat/completions", json=chat).json()["usage"]
            assert usage["prompt_tokens"] == len(live.engine.tokenizer.encode("Hello", False))
        live.wait_idle()
    finally:
        live.stop()
    text = caplog.text
    assert "Avg prompt throughput" in text and "Running: " in text and "KV cache usage" in text
    assert (
        f"request {rid}-0: prompt_tokens=" in text and f"request {rid}-0 finished: length" in text
    )
