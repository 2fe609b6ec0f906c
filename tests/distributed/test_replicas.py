"""`--replicas 2` behind the one front end: the official client, streaming and not, the same
tokens and errors as one process, load spread over both replicas, metrics per replica, a
killed replica that fails only its own requests and comes back, and a drain on SIGTERM."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from runtime.bootstrap import create_engine
from runtime.sampling_params import SamplingParams
from tests.distributed.conftest import (
    health,
    pool_of,
    serve_config,
    start_replicas,
    wait_for,
)
from tests.server.conftest import MODEL_NAME, LiveServer, start_server
from tests.server.test_streaming import events

LONG = 300  # tokens: a request still running well after the kill
PROMPTS = ["In the beginning", "And God said", "Hello there, my friend", "a", "The light",
           "Once upon a time in a land far away there lived"]


@pytest.fixture(scope="module")
def live(ray_local, long_model_dir: Path):
    server = start_replicas(long_model_dir, max_num_seqs=2, shutdown_timeout=30.0)
    yield server
    if server.thread.is_alive():
        server.stop()


@pytest.fixture(scope="module")
def reference(long_model_dir: Path):
    """The single-process engine on the same model, float64: what each request gets alone."""
    engine = create_engine(serve_config(long_model_dir))

    def solo(prompt: str, max_tokens: int, **params) -> str:
        req = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                        **({"temperature": 0.0} | params)))
        while engine.has_unfinished():
            engine.step()
        return req.output_text

    return solo


def complete(live: LiveServer, prompt: str, max_tokens: int, **extra) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True} | extra
    resp = httpx.post(live.base_url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(live: LiveServer) -> str:
    return httpx.get(live.base_url + "/metrics", timeout=10).text


def test_openai_client_streaming_and_not(live: LiveServer, reference) -> None:
    client = live.openai()
    extra = {"ignore_eos": True}
    for prompt in PROMPTS[:3]:
        want = reference(prompt, 12)
        plain = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12,
                                          temperature=0, extra_body=extra)
        assert plain.choices[0].text == want and plain.choices[0].finish_reason == "length"
        assert plain.usage.completion_tokens == 12
        chunks = list(client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].usage.completion_tokens == 12
    messages = [{"role": "user", "content": "Who made the light?"}]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10,
                                          temperature=0, extra_body=extra)
    streamed = client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                              max_tokens=10, temperature=0, stream=True,
                                              extra_body=extra)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content and text


def test_greedy_tokens_equal_single_process_under_concurrency(live: LiveServer,
                                                              reference) -> None:
    lengths = [5, 17, 9, 30, 1, 23]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda a: complete(live, *a, logprobs=0), zip(PROMPTS, lengths,
                                                                           strict=True)))
    for prompt, n, body in zip(PROMPTS, lengths, got, strict=True):
        choice = body["choices"][0]
        assert choice["text"] == reference(prompt, n), prompt
        assert len(choice["logprobs"]["tokens"]) == n == body["usage"]["completion_tokens"]


def test_seeded_choices_are_reproducible(live: LiveServer, reference) -> None:
    body = complete(live, "And God said", 12, temperature=0.9, seed=7, n=2)
    texts = [c["text"] for c in body["choices"]]
    assert texts == [reference("And God said", 12, temperature=0.9, seed=7 + i)
                     for i in range(2)]


def test_requests_spread_over_both_replicas_and_metrics_add_up(live: LiveServer) -> None:
    before = scrape(live)
    with ThreadPoolExecutor(6) as pool:
        bodies = list(pool.map(lambda p: complete(live, p, 40), PROMPTS))
    after = scrape(live)
    per_replica = [metric(after, "runtime:request_success_total", replica=str(i))
                   - metric(before, "runtime:request_success_total", replica=str(i))
                   for i in range(2)]
    assert all(n > 0 for n in per_replica) and sum(per_replica) == 6, per_replica
    generated = (metric(after, "runtime:generation_tokens_total")
                 - metric(before, "runtime:generation_tokens_total"))
    assert generated == sum(b["usage"]["completion_tokens"] for b in bodies) == 240
    for name in ("runtime:num_requests_running", "runtime:kv_cache_usage_perc",
                 "runtime:time_to_first_token_seconds_count"):
        assert re.search(rf'^{name}{{.*replica="1"', after, re.M), name
    assert after.count("# TYPE runtime:generation_tokens_total counter") == 1
    assert metric(after, "runtime:replica_up") == 2


def test_health_models_and_errors_match_one_process(live: LiveServer,
                                                    long_model_dir: Path) -> None:
    status, body = health(live)
    assert status == 200 and body["status"] == "ok"
    assert [r["up"] for r in body["replicas"]] == [True, True]
    card = httpx.get(live.base_url + "/v1/models").json()["data"][0]
    assert card["id"] == MODEL_NAME and card["max_model_len"] == 2048
    single = start_server(long_model_dir, "baton", dtype="float64")
    try:
        bad = [{"prompt": "x", "temperature": 3}, {"prompt": "x", "model": "nope"},
               {"prompt": "x", "max_tokens": 0}, {"prompt": "x " * 3000},
               {"prompt": "x", "max_tokens": 2048}, {"messages": []}]
        for body in bad:
            route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            one = httpx.post(single.base_url + route, json=body, timeout=30)
            many = httpx.post(live.base_url + route, json=body, timeout=30)
            assert (many.status_code, many.json()) == (one.status_code, one.json()), body
            assert many.status_code in (400, 404)
    finally:
        single.stop()


def _stream(live: LiveServer, max_tokens: int, started: threading.Event, out: list) -> None:
    body = {"prompt": "In the beginning", "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with live.client(timeout=120) as http, http.stream("POST", "/v1/completions",
                                                       json=body) as resp:
        for event in events(resp):
            out.append(event)
            started.set()


def test_a_killed_replica_fails_only_its_own_requests_and_comes_back(
        live: LiveServer, ray_local, reference) -> None:
    pool = pool_of(live)
    streams = [([], threading.Event()) for _ in range(4)]
    threads = [threading.Thread(target=_stream, args=(live, LONG, ev, out))
               for out, ev in streams]
    for (_, ev), thread in zip(streams, threads, strict=True):
        thread.start()
        assert ev.wait(30), "a long stream did not start"
    slot_of = {out[0]["id"]: pool._where[out[0]["id"] + "-0"].slot.index for out, _ in streams}
    assert sorted(slot_of.values()) == [0, 0, 1, 1], "two long requests on each replica"
    waiting: dict = {}
    queued = threading.Thread(target=lambda: waiting.update(
        body=httpx.post(live.base_url + "/v1/completions", timeout=120, json={
            "prompt": "And God said", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True})))
    queued.start()  # both replicas' rows are taken: it waits, with no output yet
    wait_for(lambda: len(pool._where) == 5, 10, "the queued request to be routed")
    victim = next(t.slot for t in pool._where.values() if not t.started)
    ray_local.kill(victim.handle, no_restart=False)
    killed = time.monotonic()
    wait_for(lambda: health(live)[1]["status"] == "degraded", 15, "/health to say degraded")
    status, body = health(live)
    assert status == 200 and not body["replicas"][victim.index]["up"], body
    assert body["replicas"][1 - victim.index]["up"]

    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a stream hung after the kill"
    for out, _ in streams:
        if slot_of[out[0]["id"]] == victim.index:
            assert out[-1] == "[DONE]" and out[-2]["error"]["code"] == 500, out[-3:]
            assert "".join(e["choices"][0]["text"] for e in out[:-2]), "kept what it streamed"
        else:
            assert out[-1] == "[DONE]" and out[-2]["choices"][0]["finish_reason"] == "length"
    queued.join(60)
    retried = waiting["body"]
    assert retried.status_code == 200, retried.text  # retried once on the other replica
    assert retried.json()["choices"][0]["text"] == reference("And God said", 8)

    wait_for(lambda: health(live)[1]["status"] == "ok", 60, "the replica to come back")
    back = time.monotonic() - killed
    status, body = health(live)
    assert status == 200 and body["replicas"][victim.index]["restarts"] == 1, body
    assert back < 60
    text = scrape(live)
    assert metric(text, "runtime:num_requests_retried_total") == 1
    assert metric(text, "runtime:replica_restarts_total", replica=str(victim.index)) == 1
    with ThreadPoolExecutor(4) as ex:  # both replicas serve again
        assert all(b["choices"][0]["finish_reason"] == "length"
                   for b in ex.map(lambda p: complete(live, p, 30), PROMPTS[:4]))
    assert metric(scrape(live), "runtime:request_success_total", replica=str(victim.index)) > 0


def test_sigterm_drains_every_replica(live: LiveServer, ray_local) -> None:
    pool = pool_of(live)
    handles = [s.handle for s in pool.slots]
    streams = [([], threading.Event()) for _ in range(2)]
    threads = [threading.Thread(target=_stream, args=(live, 200, ev, out)) for out, ev in streams]
    for (_, ev), thread in zip(streams, threads, strict=True):
        thread.start()
        assert ev.wait(30)
    assert {t.slot.index for t in pool._where.values()} == {0, 1}
    live.server.should_exit = True  # what SIGTERM does
    for thread in threads:
        thread.join(60)
    for out, _ in streams:
        assert out[-1] == "[DONE]" and out[-2]["choices"][0]["finish_reason"] == "length"
    live.thread.join(60)
    assert not live.thread.is_alive()
    for handle in handles:  # the actors are gone, not restarting
        assert actor_dies(ray_local, handle, within=60)


def actor_dies(ray_module, handle, within: float) -> bool:
    """True once a call on `handle` fails with RayActorError: a killed actor's death reaches
    Ray asynchronously, so a call made right after the kill may still be served."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            ray_module.get(handle.start.remote(), timeout=10)
        except ray_module.exceptions.RayActorError:
            return True
        except ray_module.exceptions.GetTimeoutError:
            pass  # still alive and busy: ask again
        time.sleep(0.5)
    return False
