"""The policy itself: shortest prompt first, the aging guard, the prefill cap, the options."""

from __future__ import annotations

import pytest
from sjf_scheduler import ShortestPromptFirst

from runtime.api import Request, SamplingParams, SchedulingBudget
from runtime.config import build_config
from runtime.plugins import PluginError, instantiate_scheduler
from runtime.testing import make_engine, tiny_model

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def req(name: str, prompt_len: int, max_tokens: int = 4) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return Request(name, [1] * prompt_len, params)


def budget(rows: int = 8, free: int = 10_000) -> SchedulingBudget:
    return SchedulingBudget(
        max_num_seqs=rows, max_model_len=256, kv_cache_tokens=10_000, kv_free_tokens=free
    )


def admitted(sched: ShortestPromptFirst, waiting, running=(), **kw) -> list[str]:
    decision = sched.admit_requests(
        waiting=tuple(waiting), running=tuple(running), budget=budget(**kw)
    )
    return [r.request_id for r in decision.admit]


def test_shortest_prompts_first_ties_in_arrival_order() -> None:
    waiting = [req("long", 30), req("short", 3), req("mid", 10), req("short2", 3)]
    assert admitted(ShortestPromptFirst(), waiting, rows=3) == ["short", "short2", "mid"]


def test_backfills_past_a_request_that_does_not_fit() -> None:
    waiting = [req("short-but-long-output", 2, max_tokens=60), req("mid", 10)]
    assert admitted(ShortestPromptFirst(), waiting, free=20) == ["mid"]


def test_aging_bounds_the_wait_of_a_long_prompt() -> None:
    sched = ShortestPromptFirst(max_wait_steps=3)
    long = req("long", 50)
    rounds = []
    for i in range(6):  # a fresh short request arrives every round; one row frees per round
        rounds.append(admitted(sched, [long, req(f"s{i}", 2)], rows=1))
        if rounds[-1] == ["long"]:
            break
    assert rounds == [["s0"], ["s1"], ["s2"], ["long"]]


def test_an_aged_request_that_does_not_fit_blocks_younger_ones() -> None:
    sched = ShortestPromptFirst(max_wait_steps=1)
    big, small = req("big", 40), req("small", 2)
    assert admitted(sched, [big], free=10) == []
    assert admitted(sched, [big, small], free=10) == []  # big is aged: small may not overtake
    assert admitted(ShortestPromptFirst(max_wait_steps=5), [big, small], free=10) == ["small"]


def test_prefill_cap_always_allows_the_first_request() -> None:
    sched = ShortestPromptFirst(max_prefill_tokens=8)
    assert admitted(sched, [req("a", 5), req("b", 3), req("c", 20)]) == ["b", "a"]
    assert admitted(ShortestPromptFirst(max_prefill_tokens=8), [req("c", 20)]) == ["c"]


def test_engine_runs_shortest_first_on_the_default_cache() -> None:
    engine = make_engine(tiny_model(seed=1), ShortestPromptFirst(), name="sjf", max_num_seqs=1)
    reqs = [engine.add_request([7] * n, PARAMS) for n in (9, 2, 5)]
    while engine.has_unfinished():
        engine.step()
    order = sorted(reqs, key=lambda r: r.first_scheduled_time)
    assert [r.prompt_len for r in order] == [2, 5, 9]
    assert type(engine.kv_cache).__name__ == "PerRequestKVCache"  # the built-in layout


def test_options_come_from_yaml(tmp_path) -> None:
    path = tmp_path / "sjf.yaml"
    path.write_text(
        "scheduler: sjf\nscheduler_options:\n  max_wait_steps: 5\n  max_prefill_tokens: 512\n"
    )
    config = build_config(path)
    sched = instantiate_scheduler(config.scheduler, config.scheduler_options)
    assert isinstance(sched, ShortestPromptFirst)
    assert (sched.max_wait_steps, sched.max_prefill_tokens) == (5, 512)


def test_bad_options_name_the_option() -> None:
    with pytest.raises(PluginError, match="scheduler_options.max_wait_steps must be an integer"):
        instantiate_scheduler("sjf", {"max_wait_steps": "soon"})
    with pytest.raises(PluginError, match=r"scheduler 'sjf' \(baton-scheduler-template 0.1.0\): "
                                          "bad scheduler_options"):
        instantiate_scheduler("sjf", {"max_wait": 3})
