"""Access: an API key (`--api-key` or $RUNTIME_API_KEY, as vLLM's) on every route but
/health, /metrics and the docs covered by an option; the Host check of a loopback server."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from runtime.server.security import allowed_host_names, host_name
from runtime.server.state import API_KEY_ENV
from tests.server.conftest import MODEL_NAME, start_server

KEY = "sk-test-0123456789"


def test_api_key_through_the_official_client(model_dir: Path) -> None:
    live = start_server(model_dir, api_key=KEY)
    try:
        url = live.base_url + "/v1"
        wrong = openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
        assert info.value.status_code == 401 and info.value.body["code"] == 401
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        out = right.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert out.choices[0].finish_reason in ("length", "stop")
        assert [m.id for m in right.models.list()] == [MODEL_NAME]
        with live.client() as http:
            resp = http.post("/v1/completions", json={"prompt": "Hi"})
            assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
            assert resp.json()["error"]["type"] == "AuthenticationError"
            prefix = {"Authorization": f"Bearer {KEY}x"}
            assert http.get("/v1/models", headers=prefix).status_code == 401
            basic = {"Authorization": f"Basic {KEY}"}
            assert http.get("/v1/models", headers=basic).status_code == 401
            assert http.get("/nothing-here").status_code == 401  # every other route needs it
            for open_path in ("/health", "/metrics", "/docs", "/openapi.json"):
                assert http.get(open_path).status_code == 200, open_path
    finally:
        live.stop()


def test_api_key_from_the_environment_covers_metrics_and_docs(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEY_ENV, KEY)
    live = start_server(model_dir, api_key_all_routes=True)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        with live.client() as http:
            assert http.get("/health").status_code == 200
            for path in ("/metrics", "/docs", "/openapi.json", "/v1/models"):
                assert http.get(path).status_code == 401, path
                assert http.get(path, headers=auth).status_code == 200, path
    finally:
        live.stop()


def test_host_check_on_a_loopback_server(model_dir: Path) -> None:
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: refused; loopback names
    pass with any port."""
    live = start_server(model_dir)
    try:
        port = live.base_url.rsplit(":", 1)[1]
        with httpx.Client(base_url=live.base_url, timeout=30) as http:
            evil = http.get("/v1/models", headers={"Host": f"attacker.example:{port}"})
            assert evil.status_code == 400 and "--allowed-hosts" in evil.json()["error"]["message"]
            body = {"prompt": "Hi", "max_tokens": 2}
            assert http.post("/v1/completions", json=body, headers={"Host": "rebind.test"}).status_code == 400
            for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "LOCALHOST"):
                assert http.get("/health", headers={"Host": host}).status_code == 200, host
    finally:
        live.stop()


def test_allowed_host_names() -> None:
    assert allowed_host_names("127.0.0.1", None) == frozenset()  # loopback names only
    assert allowed_host_names("::1", None) == frozenset()
    assert allowed_host_names("0.0.0.0", None) is None  # any
    assert allowed_host_names("127.0.0.1", "*") is None
    assert allowed_host_names("127.0.0.1", "API.example.com, b.test") == {"api.example.com", "b.test"}
    assert host_name(b"[::1]:8000") == "::1" and host_name(b"Example.COM:80") == "example.com"
    assert host_name(b"[::1") is None
