"""Every invalid request is answered 400/404 with OpenAI's error shape and `param`, before any
engine work (the engine's step counter does not move)."""

from __future__ import annotations

import pytest

from tests.server.conftest import MODEL_NAME, LiveServer

OK = {"prompt": "Hello", "max_tokens": 2}
CHAT_OK = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
OVER = "This model's maximum context length is 128 tokens. However, your request has"

COMPLETION_CASES = [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "16"}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": "x"}, "seed"),
    ({"logprobs": 30}, "logprobs"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": "x"}}, "stream_options"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": [99999]}, "prompt"),
    ({"prompt": "word " * 300}, "prompt"),
    ({"max_tokens": 200}, "max_tokens"),
    ({"echo": True}, "echo"),
]

CHAT_CASES = [
    ({"messages": []}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, "messages"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 500}, "max_completion_tokens"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"temperature": 3}, "temperature"),
]


def check_error(resp, status: int, param: str | None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == status and err["message"]
    assert err["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    return err


@pytest.mark.parametrize(("patch", "param"), COMPLETION_CASES, ids=lambda x: str(x)[:40])
def test_completion_validation(server: LiveServer, patch: dict, param: str) -> None:
    steps = server.engine.num_steps
    with server.client() as http:
        body = {k: v for k, v in (OK | patch).items() if v is not None}
        err = check_error(http.post("/v1/completions", json=body), 400, param)
    if "word" in str(patch.get("prompt", "")) or patch.get("max_tokens") == 200:
        assert err["message"].startswith(OVER[:48])
    if "word" in str(patch.get("prompt", "")):
        assert err["message"].startswith(OVER)
    assert server.engine.num_steps == steps, "validation must happen before any engine work"


@pytest.mark.parametrize(("patch", "param"), CHAT_CASES, ids=lambda x: str(x)[:40])
def test_chat_validation(server: LiveServer, patch: dict, param: str) -> None:
    steps = server.engine.num_steps
    with server.client() as http:
        body = {k: v for k, v in (CHAT_OK | patch).items() if v is not None}
        check_error(http.post("/v1/chat/completions", json=body), 400, param)
    assert server.engine.num_steps == steps


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_model_is_404(server: LiveServer, path: str) -> None:
    body = (OK if "chat" not in path else CHAT_OK) | {"model": "gpt-17"}
    with server.client() as http:
        err = check_error(http.post(path, json=body), 404, "model")
    assert "gpt-17" in err["message"]


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"prompt": "\xff\xfe bytes"}', b"\xff\xfe\x00", b"[1, 2]", b"", b"null"],
    ids=["malformed", "non-utf8-in-string", "non-utf8", "array", "empty", "null"],
)
def test_malformed_bodies(server: LiveServer, raw: bytes) -> None:
    with server.client() as http:
        resp = http.post(
            "/v1/completions", content=raw, headers={"content-type": "application/json"}
        )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "BadRequestError"


def test_unknown_fields_are_ignored(server: LiveServer) -> None:
    with server.client() as http:
        resp = http.post("/v1/completions", json=OK | {"user": "u", "suffix": None, "foo": [1]})
        assert resp.status_code == 200, resp.text
        chat = CHAT_OK | {"tools": [], "parallel_tool_calls": False, "model": MODEL_NAME}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200


def test_chat_template_errors_are_400(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """No template at all, and a template that calls raise_exception, both name `messages`."""
    tokenizer = server.engine.tokenizer
    with server.client() as http:
        monkeypatch.setattr(tokenizer, "chat_templates", {})
        err = check_error(http.post("/v1/chat/completions", json=CHAT_OK), 400, "messages")
        assert "chat template" in err["message"] and "--chat-template" in err["message"]
        monkeypatch.undo()
        bad = "{{ raise_exception('system messages are not supported') }}"
        monkeypatch.setattr(server.state, "chat_template", bad)
        err = check_error(http.post("/v1/chat/completions", json=CHAT_OK), 400, "messages")
        assert "system messages are not supported" in err["message"]


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p"])
@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_non_finite_numbers(server: LiveServer, field: str, value: str) -> None:
    raw = f'{{"prompt": "Hi", "max_tokens": 2, "{field}": {value}}}'.encode()
    with server.client() as http:
        resp = http.post(
            "/v1/completions", content=raw, headers={"content-type": "application/json"}
        )
    check_error(resp, 400, field)
