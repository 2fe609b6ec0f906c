"""Large and abusive requests are refused before they cost other clients anything: bodies over
the size limit (413), prompts over the character limit (400, before tokenizing), more choices
than the queue could ever hold (400, not a retryable 503), stop lists over their limits (400);
and preparing a large request happens off the event loop, so `/health` keeps answering."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import MODEL_NAME, LiveServer, start_server

HEALTH_BOUND = 0.5  # seconds /health may take while a large request is being prepared


@pytest.fixture(scope="module")
def limited(model_dir: Path) -> Iterator[LiveServer]:
    live = start_server(model_dir, max_queued_requests=8, max_prompt_chars=1_000_000)
    yield live
    live.stop()


POLLER = """
import http.client, json, select, sys, time
host, port = sys.argv[1], int(sys.argv[2])
latencies, statuses = [], set()
while not select.select([sys.stdin], [], [], 0.02)[0]:  # until the parent closes our stdin
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/health")
    statuses.add(conn.getresponse().status)
    conn.close()
    latencies.append(time.monotonic() - started)
print(json.dumps({"latencies": latencies, "statuses": sorted(statuses)}))
"""


class HealthPoller:
    """Polls /health from another process (a thread of ours would stall with the server's
    GIL and not see it) and records each answer's latency."""

    def __init__(self, base_url: str) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self._args = [sys.executable, "-c", POLLER, host, port]
        self.latencies: list[float] = []
        self.statuses: set[int] = set()

    def __enter__(self) -> HealthPoller:
        self._proc = subprocess.Popen(
            self._args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        time.sleep(0.3)  # the poller is running
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self._proc.communicate(timeout=60)
        result = json.loads(out)
        self.latencies, self.statuses = result["latencies"], set(result["statuses"])


def error_of(resp: httpx.Response, status: int, param: str | None) -> str:
    assert resp.status_code == status, resp.text[:300]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert err["param"] == param, err
    return err["message"]


def test_large_requests_are_refused_while_health_keeps_answering(limited: LiveServer) -> None:
    """A 9 MiB body (413 from Content-Length), a prompt over --max-prompt-chars (400 before
    tokenizing), a 900k-character prompt that is tokenized (about a second of CPU) and then
    over the context, the same as a chat message, and a batch of 300,000 one-character
    prompts: each is answered 4xx while /health, polled meanwhile, answers within 0.5 s."""
    word = "the quick brown fox jumps over the lazy dog "
    with HealthPoller(limited.base_url) as poller, limited.client() as http:
        huge = {"prompt": "x" * (9 * 1024 * 1024), "max_tokens": 1}
        assert "--max-request-body-bytes" in error_of(
            http.post("/v1/completions", json=huge), 413, None
        )
        over = {"prompt": word * 23_000, "max_tokens": 1}  # 1,012,000 characters
        assert "--max-prompt-chars" in error_of(http.post("/v1/completions", json=over), 400, "prompt")
        long = {"prompt": word * 20_000, "max_tokens": 1}  # 880,000 characters, tokenized
        assert "maximum context length" in error_of(
            http.post("/v1/completions", json=long), 400, "prompt"
        )
        chat = {"messages": [{"role": "user", "content": word * 20_000}], "max_tokens": 1}
        assert "maximum context length" in error_of(
            http.post("/v1/chat/completions", json=chat), 400, "messages"
        )
        batch = {"prompt": ["a"] * 300_000, "max_tokens": 1}
        assert "prompts x n" in error_of(http.post("/v1/completions", json=batch), 400, "prompt")
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
    assert poller.statuses == {200} and len(poller.latencies) > 10
    assert max(poller.latencies) < HEALTH_BOUND, sorted(poller.latencies)[-5:]


def test_choices_beyond_the_queue_are_400_not_503(limited: LiveServer) -> None:
    """`n` or a prompt batch larger than the whole queue (8 here) could never be admitted: a
    400 at once, which the official client does not retry (it retries a 503 forever)."""
    client = openai.OpenAI(base_url=limited.base_url + "/v1", api_key="x", max_retries=3)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt="Hello", n=9, max_tokens=2)
    assert info.value.status_code == 400 and info.value.body["param"] == "n"
    with limited.client() as http:
        batch = {"prompt": ["a", "b", "c", "d", "e"], "n": 2, "max_tokens": 2}
        assert "--max-queued-requests" in error_of(
            http.post("/v1/completions", json=batch), 400, "prompt"
        )
        chat = {"messages": [{"role": "user", "content": "Hi"}], "n": 9, "max_tokens": 2}
        error_of(http.post("/v1/chat/completions", json=chat), 400, "n")
        ok = {"prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 2}  # exactly the queue
        assert len(http.post("/v1/completions", json=ok).json()["choices"]) == 8


def test_stop_lists_over_the_limits_are_400(limited: LiveServer) -> None:
    with limited.client() as http:
        for path, base in (
            ("/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        ):
            many = base | {"stop": [f"s{i}" for i in range(33)]}
            assert "--max-stop-strings" in error_of(http.post(path, json=many), 400, "stop")
            long = base | {"stop": ["x" * 513]}
            assert "--max-stop-string-chars" in error_of(http.post(path, json=long), 400, "stop")
            at_limit = base | {"stop": ["x" * 512] * 32, "max_tokens": 2}
            assert http.post(path, json=at_limit).status_code == 200


def test_long_stop_string_on_a_long_output_is_linear(
    limited: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Count the matcher's work on a real request: 32 stop strings of 512 characters that
    never match, over a whole context of output, cost at most two lookups per output char."""
    seen = []
    processor = limited.engine.processor
    start = processor.start

    def recording_start(req) -> None:
        start(req)
        seen.append(req)

    monkeypatch.setattr(processor, "start", recording_start)
    stops = [("the " * 200)[:511] + "#", *(chr(0x4E00 + i) * 512 for i in range(31))]
    body = {"prompt": "Hello", "max_tokens": 120, "stop": stops, "temperature": 0}
    with limited.client() as http:
        out = http.post("/v1/completions", json=body).json()
    text = out["choices"][0]["text"]
    assert out["choices"][0]["finish_reason"] == "length" and len(text) > 150
    checker = seen[0].stop_checker
    assert seen[0].output_text == text and 0 < checker.num_lookups <= 2 * len(text)


def test_body_limit_counts_a_chunked_body(limited: LiveServer) -> None:
    """No Content-Length to trust: the bytes read are counted."""

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(9):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    with limited.client() as http:
        resp = http.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        error_of(resp, 413, None)
        ok = http.post("/v1/completions", content=iter([json.dumps({"prompt": "Hi"}).encode()]))
        assert ok.status_code == 200
