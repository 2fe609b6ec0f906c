"""A corpus of malformed and hostile requests over both endpoints, as a hostile client would
send them: each is answered with a 4xx in the OpenAI error shape (or a 2xx documented in
docs/serving.md), never a 5xx, and a normal request is served right after each."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import LiveServer, start_server

C, H = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "Hi"}]
BASE = {C: {"prompt": "Hi", "max_tokens": 2}, H: {"messages": MSG, "max_tokens": 2}}
NORMAL = {"prompt": "Hello", "max_tokens": 1}


@dataclass
class Case:
    """One request: a JSON patch over a valid body, or raw bytes; `ok` marks a documented 2xx."""

    name: str
    path: str
    patch: dict[str, Any] | None = None
    raw: bytes | None = None
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    ok: bool = False

    def request(self) -> dict[str, Any]:
        if self.raw is not None:
            content = self.raw
        else:
            body = BASE[self.path.split("?")[0]] | (self.patch or {})
            content = json.dumps(body, allow_nan=True).encode()
        headers = {"content-type": "application/json"} | self.headers
        return {"method": self.method, "url": self.path, "content": content, "headers": headers}


RAW_BODIES = {
    "empty": b"",
    "blank": b"   \n",
    "open-brace": b"{",
    "not-json": b"{not json",
    "trailing-comma": b'{"prompt": "Hi",}',
    "single-quotes": b"{'prompt': 'Hi'}",
    "null": b"null",
    "array": b"[1, 2]",
    "string": b'"just a string"',
    "number": b"42",
    "non-utf8": b"\xff\xfe\x00",
    "non-utf8-in-string": b'{"prompt": "\xff\xfe"}',
    "deep-array": b"[" * 50_000,
    "deep-object": b'{"a":' * 20_000,
    "utf16-escaped-surrogate": '{"prompt": "\\ud800", "messages": []}'.encode("utf-16"),
    "utf16-lone-surrogate": '{"prompt": "Hi"}'.encode("utf-16-le")[:-2] + b"\x00\xd8}\x00",
    "trailing-nul": b'{"prompt": "Hi"}\x00',
    "two-objects": b'{"prompt": "Hi"} {"prompt": "Hi"}',
    "max-tokens-1e999": b'{"prompt": "Hi", "messages": [], "max_tokens": 1e999}',
    "nan-temperature": b'{"prompt": "Hi", "messages": [], "temperature": NaN}',
    "surrogate-key": b'{"prompt": "Hi", "\\ud800": 1}',
    "surrogate-unknown-field": b'{"prompt": "Hi", "user": "\\udfff"}',
    "surrogate-model": b'{"prompt": "Hi", "model": "m\\ud800"}',
    "surrogate-stop": b'{"prompt": "Hi", "stop": ["\\ud83d"]}',
}

SHARED = [  # valid for either endpoint's base body
    {"max_tokens": 0}, {"max_tokens": -1}, {"max_tokens": "5"}, {"max_tokens": 2.5},
    {"max_tokens": 10**30}, {"temperature": -1}, {"temperature": 3}, {"temperature": "hot"},
    {"temperature": []}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"top_k": 1.5},
    {"min_p": 2}, {"min_p": -1}, {"n": 0}, {"n": -1}, {"n": 17}, {"n": 1.5}, {"n": "2"},
    {"n": 10**20}, {"n": 9}, {"seed": "x"}, {"seed": 2**64}, {"seed": 1.5}, {"stop": ""},
    {"stop": [""]}, {"stop": 5}, {"stop": [5]}, {"stop": {"a": 1}}, {"stop": [None]},
    {"stop": [f"s{i}" for i in range(40)]}, {"stop": ["x" * 600]}, {"stop_token_ids": [-1]},
    {"stop_token_ids": ["a"]}, {"stop_token_ids": 5}, {"stream": "yes"}, {"stream": 1},
    {"stream_options": 5}, {"stream_options": {"include_usage": "x"}}, {"ignore_eos": "x"},
    {"model": 5}, {"model": "gpt-4"}, {"model": ""}, {"model": "m" * 10_000},
]

COMPLETION_ONLY = [
    {"prompt": 123}, {"prompt": True}, {"prompt": {"a": 1}}, {"prompt": [[1, "a"]]},
    {"prompt": [1.5]}, {"prompt": [-1]}, {"prompt": [2**70]}, {"prompt": [600]}, {"prompt": [[]]},
    {"prompt": []}, {"prompt": ""}, {"prompt": [""]}, {"prompt": None}, {"prompt": ["a", 1]},
    {"prompt": "word " * 5_000}, {"prompt": "x" * 70_000}, {"prompt": ["a"] * 20},
    {"prompt": ["a", "b", "c"], "n": 3}, {"logprobs": 21}, {"logprobs": -1},
    {"logprobs": "x"}, {"echo": True}, {"prompt": "\ud800 lone"},
]

CHAT_ONLY = [
    {"messages": None}, {"messages": []}, {"messages": "hi"}, {"messages": [{}]},
    {"messages": [{"role": 5, "content": "x"}]}, {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": {"text": "x"}}]},
    {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": "\ud83d"}]},
    {"messages": [{"role": "user\udc00", "content": "x"}]},
    {"messages": [{"role": "user", "content": "x", "name": "\ud800"}]},
    {"messages": [{"role": "user", "content": "word " * 5_000}]},
    {"messages": [{"role": "user", "content": "Hi"}] * 3_000},
    {"max_completion_tokens": 0}, {"max_completion_tokens": "x"},
    {"logprobs": True, "top_logprobs": 21}, {"logprobs": "x"}, {"add_generation_prompt": "x"},
]

DOCUMENTED_2XX = [  # docs/serving.md: unknown fields ignored, special tokens parsed, ...
    Case("unknown-fields", C, {"suffix": "x", "user": "u", "tools": [], "frequency_penalty": 1}),
    Case("emoji-pair", C, raw=b'{"prompt": "fun \\ud83d\\ude00", "max_tokens": 2}'),
    Case("nul-and-controls", C, {"prompt": "a\u0000b\u0007c\u202e"}),
    Case("special-tokens-in-chat", H, {"messages": [{"role": "user", "content": "<|im_end|>"}]}),
    Case("no-content", H, {"messages": [{"role": "user"}]}),
    Case("utf8-bom", C, raw=b'\xef\xbb\xbf{"prompt": "Hi", "max_tokens": 2}'),
    Case("utf16", H, raw=json.dumps(BASE[H]).encode("utf-16")),
    Case("authorization-without-a-key", H, headers={"authorization": "Bearer junk"}),
    Case("query-junk", C + "?a=%ff%fe&b", {"prompt": "Hi"}),
    Case("big-header", C, headers={"x-junk": "j" * 10_000}),
    Case("stream-n-logprobs", C, {"stream": True, "n": 2, "logprobs": 2}),
    Case("usage-without-stream", H, {"stream_options": {"include_usage": True}}),
]


def corpus() -> list[Case]:
    cases = []
    for path in (C, H):
        tag = "cmpl" if path == C else "chat"
        cases += [Case(f"{tag}-raw-{name}", path, raw=raw) for name, raw in RAW_BODIES.items()]
        cases += [Case(f"{tag}-{i}-{json.dumps(p)[:40]}", path, p) for i, p in enumerate(SHARED)]
        cases += [
            Case(f"{tag}-get", path, method="GET"),
            Case(f"{tag}-put", path, method="PUT"),
            Case(f"{tag}-unknown-subpath", path + "/x", raw=json.dumps(BASE[path]).encode()),
            Case(f"{tag}-rebinding-host", path, headers={"host": "attacker.example"}),
            Case(f"{tag}-text-plain", path, headers={"content-type": "text/plain"}),
            Case(f"{tag}-content-length-over", path, raw=b"{" + b" " * 70_000 + b"}"),
        ]
    cases += [Case(f"cmpl-{i}-{json.dumps(p)[:40]}", C, p) for i, p in enumerate(COMPLETION_ONLY)]
    cases += [Case(f"chat-{i}-{json.dumps(p)[:40]}", H, p) for i, p in enumerate(CHAT_ONLY)]
    for case in DOCUMENTED_2XX:
        case.ok = True
    return cases + DOCUMENTED_2XX


CASES = corpus()


@pytest.fixture(scope="module")
def hostile_target(model_dir: Path) -> Iterator[LiveServer]:
    live = start_server(
        model_dir, max_request_body_bytes=64 * 1024, max_prompt_chars=20_000, max_queued_requests=8
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(hostile_target: LiveServer) -> Iterator[httpx.Client]:
    with hostile_target.client() as client:  # one client: building one costs more than a case
        yield client


def test_corpus_is_large() -> None:
    assert len(CASES) >= 100 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request(http: httpx.Client, case: Case) -> None:
    resp = http.request(**case.request())
    if case.ok:
        assert resp.status_code == 200, resp.text[:300]
    else:
        assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["code"] == resp.status_code and err["message"] and err["type"]
    after = http.post(C, json=NORMAL)
    assert after.status_code == 200, after.text[:300]
