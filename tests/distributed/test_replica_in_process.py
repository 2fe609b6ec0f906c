"""The pieces of scale-out that need no Ray: a replica driven in process (specs in, deltas
out, prefilled K/V from an awaitable, fallback), the router, the metrics merge, the config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runtime.bootstrap import create_engine
from runtime.config import ConfigError, RuntimeConfig, build_config
from runtime.distributed.metrics import FrontMetrics
from runtime.distributed.protocol import Load, RequestSpec
from runtime.distributed.replica import ReplicaServer
from runtime.distributed.router import Candidate, choose
from runtime.prefill import prefill_kv
from runtime.request import Request
from runtime.sampling_params import SamplingParams
from runtime.server.metrics import ServerMetrics
from tests.distributed.conftest import serve_config

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 9, 33, 7], [100, 200, 300, 12, 14, 15, 16, 17], [42]]


def spec(i: int, prompt: list[int], max_tokens: int = 6, **params) -> RequestSpec:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **({"temperature": 0.0} | params))
    return RequestSpec.of(Request(f"r{i}", prompt, sp))


async def collect(replica: ReplicaServer, n: int) -> dict[str, list[int]]:
    """Poll until `n` requests finished; each request's tokens, checked for order and ends."""
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()
    cursor = 0
    while len(finished) < n:
        report = await replica.poll(cursor, 1.0)
        again = await replica.poll(cursor, 0.0)  # an unacknowledged poll repeats itself
        assert again.deltas == report.deltas and again.cursor == report.cursor
        cursor = report.cursor
        for d in report.deltas:
            assert d.request_id not in finished, "a delta after the final one"
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finished:
                assert d.finish_reason == "length", d
                finished.add(d.request_id)
    return tokens


def reference(model_dir: Path, prompts: list[list[int]], **params) -> list[list[int]]:
    engine = create_engine(serve_config(model_dir))
    return [r.output_token_ids for r in engine.generate(
        prompts, SamplingParams(max_tokens=6, ignore_eos=True, **({"temperature": 0.0} | params)))]


def test_a_replica_streams_deltas_equal_to_one_engine(model_dir: Path) -> None:
    async def run() -> dict:
        replica = ReplicaServer(serve_config(model_dir), 0, "tiny")
        info = await replica.start()
        assert info.accepts_prefilled and info.max_num_seqs == 8
        await replica.submit([spec(i, p) for i, p in enumerate(PROMPTS)])
        try:
            return await collect(replica, len(PROMPTS))
        finally:
            await replica.loop.stop()

    got = asyncio.run(run())
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == reference(model_dir, PROMPTS)


def test_prefilled_payloads_and_a_failed_worker_fall_back(model_dir: Path) -> None:
    model = create_engine(serve_config(model_dir)).model

    async def payload(prompt: list[int], fail: bool):
        await asyncio.sleep(0.05)  # the batch keeps decoding meanwhile
        if fail:
            raise RuntimeError("the worker died")
        return prefill_kv(model, [prompt])

    async def run_ok() -> tuple[dict, dict]:
        replica = ReplicaServer(serve_config(model_dir, prefill_workers=1), 0, "tiny")
        await replica.start()
        for i, prompt in enumerate(PROMPTS):
            task = asyncio.ensure_future(payload(prompt, fail=i == 1))
            await replica.submit_prefilled(spec(i, prompt), [task])
        try:
            return await collect(replica, len(PROMPTS)), replica.stats()
        finally:
            await replica.loop.stop()

    got, stats = asyncio.run(run_ok())
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == reference(model_dir, PROMPTS)
    assert stats["prefilled"] == 2 and stats["fallbacks"] == 1


def test_an_aborted_prefilling_request_ends_with_an_abort_delta(model_dir: Path) -> None:
    async def run():
        replica = ReplicaServer(serve_config(model_dir, prefill_workers=1), 0, "tiny")
        await replica.start()
        never: asyncio.Future = asyncio.Future()
        await replica.submit_prefilled(spec(0, [1, 2, 3]), [never])
        replica.abort(["r0"])
        report = await replica.poll(0, 1.0)
        await replica.loop.stop()
        return report

    report = asyncio.run(run())
    assert [(d.request_id, d.finished, d.finish_reason) for d in report.deltas] == \
        [("r0", True, "abort")]
    assert report.load == Load(0, 0, 0.0)


def test_a_scheduler_without_insert_prefilled_refuses_prefill_workers(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="prefill_workers: scheduler 'orca' cannot take "
                                          "prefilled K/V"):
        ReplicaServer(serve_config(model_dir, scheduler="orca", prefill_workers=1), 0, "tiny")


def test_router_prefers_the_least_loaded_replica() -> None:
    idle, busy = Load(), Load(running=4, waiting=0, kv_usage=0.5)
    assert choose([]) is None
    assert choose([Candidate(0, 0, idle, 8), Candidate(1, 0, idle, 8)]) == 0  # ties: lower index
    assert choose([Candidate(0, 4, busy, 8), Candidate(1, 1, idle, 8)]) == 1
    # same requests in flight, but replica 0's cache is nearly full: go to 1
    full = Load(running=2, kv_usage=0.95)
    assert choose([Candidate(0, 2, full, 8), Candidate(1, 3, Load(running=3), 8)]) == 1
    # requests queued behind a full batch weigh twice
    assert choose([Candidate(0, 6, Load(running=2), 8), Candidate(1, 5, Load(running=5), 8)]) == 1


def test_front_metrics_merge_replica_families_under_one_header() -> None:
    from prometheus_client import generate_latest

    front = FrontMetrics("tiny", "baton")
    for i, tokens in enumerate((5, 7)):
        replica = ServerMetrics("tiny", "baton", extra_labels={"replica": str(i)})
        replica.generation_tokens.inc(tokens)
        replica.rejected.inc(100)  # a replica never rejects; the front's counter is the one
        front.replicas.texts[i] = generate_latest(replica.registry).decode()
    front.rejected.inc()
    front.replica_up(0, True)
    text = generate_latest(front.registry).decode()
    assert text.count("# TYPE runtime:generation_tokens_total counter") == 1
    assert 'replica="0",scheduler="baton"} 5.0' in text and 'replica="1",scheduler="baton"} 7.0' in text
    rejected = [line for line in text.splitlines() if line.startswith("runtime:num_requests_rej")]
    assert rejected == ['runtime:num_requests_rejected_total{model_name="tiny",scheduler="baton"} 1.0']


@pytest.mark.parametrize(("values", "message"), [
    ({"replicas": 0}, "replicas: must be >= 1"),
    ({"prefill_workers": 1}, "prefill_workers: needs replicas"),
    ({"replicas": 1, "prefill_workers": -1}, "prefill_workers: must be >= 0"),
    ({"ray_address": "auto"}, "ray_address: needs replicas"),
])
def test_scale_out_config_errors_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RuntimeConfig(**values)


def test_scale_out_keys_from_yaml_and_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("replicas: 2\nprefill-workers: 1\nray_address: 10.0.0.1:6379\n")
    config = build_config(path, {"replicas": 3})
    assert (config.replicas, config.prefill_workers, config.ray_address) == \
        (3, 1, "10.0.0.1:6379")
    assert RuntimeConfig().replicas is None and RuntimeConfig().prefill_workers == 0
