"""64 concurrent streaming clients per installed scheduler, then overload against the queue bound."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runtime.server.errors import QUEUE_FULL_STATUS
from tests.server.conftest import LiveServer, require_scheduler, start_server
from tests.server.test_streaming import slow_model

NUM_CLIENTS = 64
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "world",
    "batching",
    "keeps",
    "busy",
]


@pytest.fixture(params=["static", "orca", "baton"])
def loaded_server(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[LiveServer]:
    require_scheduler(request.param)
    live = start_server(model_dir, request.param, max_num_seqs=16)
    yield live
    live.stop()


async def one_stream(http: httpx.AsyncClient, i: int) -> tuple[int, str, dict]:
    """Stream one request; return (max_tokens, finish reason, usage); any error is a failure."""
    rng = random.Random(i)
    max_tokens = rng.randint(4, 12)
    body = {
        "prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 12))),
        "max_tokens": max_tokens,
        "temperature": rng.choice([0.0, 0.8]),
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reason, usage, done = None, None, False
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                reason = choice["finish_reason"] or reason
            usage = chunk.get("usage") or usage
    assert done, "stream did not end with [DONE]"
    return max_tokens, reason, usage


async def many_streams(base_url: str, n: int) -> list[tuple[int, str, dict]]:
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits) as http:
        return await asyncio.gather(*(one_stream(http, i) for i in range(n)))


async def burst(base_url: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits) as http:
        body = {"prompt": "Hello world", "max_tokens": 8}
        return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(n)))


def test_concurrent_streams_then_overload(loaded_server: LiveServer, monkeypatch) -> None:
    server = loaded_server
    started = time.monotonic()
    results = asyncio.run(asyncio.wait_for(many_streams(server.base_url, NUM_CLIENTS), 60))
    elapsed = time.monotonic() - started
    assert len(results) == NUM_CLIENTS
    for max_tokens, reason, usage in results:
        assert reason == "length"  # the test model never emits EOS
        assert usage["completion_tokens"] == max_tokens
    assert elapsed < 60
    server.wait_idle()

    # Overload: a slow engine and a queue bound of 4 -> some requests are rejected at once.
    slow_model(server, monkeypatch, 0.005)
    server.state.engine.max_queued_requests = 4
    responses = asyncio.run(asyncio.wait_for(burst(server.base_url, 40), 60))
    codes = [r.status_code for r in responses]
    rejected = [r for r in responses if r.status_code == QUEUE_FULL_STATUS]
    assert rejected and codes.count(200) >= 4 and set(codes) <= {200, QUEUE_FULL_STATUS}
    err = rejected[0].json()["error"]
    assert err["type"] == "ServiceUnavailableError" and "queue is full" in err["message"]
    assert rejected[0].headers["retry-after"] == "1"
    server.wait_idle()
    with server.client() as http:
        metrics = http.get("/metrics").text
        line = next(
            x for x in metrics.splitlines() if x.startswith("runtime:num_requests_rejected")
        )
        assert float(line.rsplit(" ", 1)[1]) == len(rejected)
        ok = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
        assert ok.status_code == 200, "the server recovers once the queue drains"
