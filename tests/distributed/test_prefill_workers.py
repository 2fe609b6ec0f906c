"""`--replicas 1 --prefill-workers 1`: the prompts' K/V come from the worker through Ray's
object store, the greedy tokens are the single-process BATON run's, and a killed worker
costs no request (the replica prefills itself meanwhile) while /health says degraded."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from runtime.bootstrap import create_engine
from runtime.sampling_params import SamplingParams
from tests.distributed.conftest import health, pool_of, serve_config, start_replicas, wait_for
from tests.distributed.test_replicas import metric, scrape
from tests.server.conftest import LiveServer

PROMPTS = ["In the beginning", "And God said", "Hello there, my friend", "a", "The light",
           "Once upon a time in a land far away there lived"]
LENGTHS = [5, 17, 9, 30, 1, 23]


@pytest.fixture(scope="module")
def live(ray_local, model_dir: Path):
    server = start_replicas(model_dir, replicas=1, prefill_workers=1)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def baton(model_dir: Path):
    """The single-process BATON engine, float64: each request alone."""
    engine = create_engine(serve_config(model_dir))

    def solo(prompt: str, max_tokens: int, **params) -> tuple[str, int]:
        req = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                        **({"temperature": 0.0} | params)))
        while engine.has_unfinished():
            engine.step()
        return req.output_text, req.prompt_len

    return solo


def complete(live: LiveServer, prompt: str, max_tokens: int, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True} | extra
    resp = httpx.post(live.base_url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def run_all(live: LiveServer) -> list[dict]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda a: complete(live, *a), zip(PROMPTS, LENGTHS, strict=True)))


def stats(ray, handle) -> dict:
    return ray.get(handle.stats.remote(), timeout=30)


def test_greedy_tokens_equal_baton_and_the_kv_comes_from_the_worker(live: LiveServer,
                                                                    ray_local, baton) -> None:
    pool = pool_of(live)
    bodies = run_all(live)
    for prompt, n, body in zip(PROMPTS, LENGTHS, bodies, strict=True):
        assert body["choices"][0]["text"] == baton(prompt, n)[0], prompt
        assert body["usage"]["completion_tokens"] == n
    seeded = complete(live, "And God said", 10, temperature=0.8, seed=3)
    assert seeded["choices"][0]["text"] == baton("And God said", 10, temperature=0.8, seed=3)[0]
    replica = stats(ray_local, pool.slots[0].handle)
    worker = stats(ray_local, pool.prefill.workers[0].handle)
    n = len(PROMPTS) + 1
    assert replica["prefilled"] == n and replica["fallbacks"] == 0, replica
    assert set(replica["passes"]) == {"decode"}, "the replica never ran a prompt pass"
    prompt_tokens = sum(baton(p, 1)[1] for p in PROMPTS) + baton("And God said", 1)[1]
    assert worker["requests"] == n and worker["tokens"] == prompt_tokens, worker
    assert metric(scrape(live), "runtime:prefilled_requests_total", replica="0") == n
    status, body = health(live)
    assert status == 200 and body["status"] == "ok" and body["prefill_workers"][0]["up"]


def test_a_killed_worker_costs_no_request(live: LiveServer, ray_local, baton) -> None:
    pool = pool_of(live)
    ray_local.kill(pool.prefill.workers[0].handle, no_restart=False)
    bodies = run_all(live)  # the replica falls back to its own prefill meanwhile
    for prompt, n, body in zip(PROMPTS, LENGTHS, bodies, strict=True):
        assert body["choices"][0]["text"] == baton(prompt, n)[0], prompt
    replica = stats(ray_local, pool.slots[0].handle)
    assert replica["passes"].keys() - {"decode"}, "the replica prefilled itself"
    wait_for(lambda: health(live)[1]["status"] == "degraded", 15, "/health to say degraded")
    status, body = health(live)
    assert status == 200 and not body["prefill_workers"][0]["up"] and body["replicas"][0]["up"]
    wait_for(lambda: health(live)[1]["status"] == "ok", 60, "the worker to come back")
    before = stats(ray_local, pool.slots[0].handle)["prefilled"]
    for prompt, n, body in zip(PROMPTS, LENGTHS, run_all(live), strict=True):
        assert body["choices"][0]["text"] == baton(prompt, n)[0], prompt
    assert stats(ray_local, pool.slots[0].handle)["prefilled"] == before + len(PROMPTS)
    assert stats(ray_local, pool.prefill.workers[0].handle)["requests"] == len(PROMPTS)


def test_a_scheduler_without_insert_prefilled_is_refused_at_start(ray_local,
                                                                  model_dir: Path) -> None:
    """The server never turns ready: its load error names the scheduler and the missing
    method, /health is 503 with it, and the actors it launched are gone."""
    free = ray_local.available_resources().get("CPU", 0)
    server = start_replicas(model_dir, wait_ready=False, scheduler="orca", replicas=1,
                            prefill_workers=1)
    try:
        wait_for(lambda: server.state.load_error is not None, 120, "the start to fail")
        message = str(server.state.load_error)
        assert "scheduler 'orca' cannot take prefilled K/V" in message, message
        assert "insert_prefilled" in message, message
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 503
    finally:
        server.stop()
    wait_for(lambda: ray_local.available_resources().get("CPU", 0) == free, 30,
             "the launched actors to be killed (their CPUs back)")
