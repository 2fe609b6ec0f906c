"""The official `openai` client against a live server: completions and chat, streaming or not."""

from __future__ import annotations

import re

import pytest

from tests.server.conftest import MODEL_NAME, LiveServer

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Hello there, how are you today?"}]


def stream_text(chunks) -> tuple[list[str], list[str | None], list]:
    """Texts and finish reasons per choice index, plus the raw chunks."""
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    seen = []
    for chunk in chunks:
        seen.append(chunk)
        for c in chunk.choices:
            piece = getattr(c, "text", None)
            if piece is None:
                piece = c.delta.content or ""
            texts[c.index] = texts.get(c.index, "") + piece
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    n = max(texts) + 1 if texts else 0
    return [texts[i] for i in range(n)], [reasons[i] for i in range(n)], seen


def test_completion(server: LiveServer) -> None:
    client = server.openai()
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion"
    assert out.model == MODEL_NAME and len(out.choices) == 1
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == len(server.engine.tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens <= 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat(server: LiveServer) -> None:
    client = server.openai()
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert 0 < out.usage.completion_tokens <= 6


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_streamed_text_equals_non_streamed_greedy(server: LiveServer, kind: str) -> None:
    client = server.openai()
    if kind == "chat":
        call = client.chat.completions.create
        args = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0)
        whole = call(**args).choices[0]
        text, reason = whole.message.content, whole.finish_reason
    else:
        call = client.completions.create
        args = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
        whole = call(**args).choices[0]
        text, reason = whole.text, whole.finish_reason
    texts, reasons, chunks = stream_text(call(stream=True, **args))
    assert texts == [text] and reasons == [reason]
    assert len(chunks) >= 2 and all(c.usage is None for c in chunks)
    if kind == "chat":
        assert chunks[0].choices[0].delta.role == "assistant"


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_include_usage(server: LiveServer, kind: str) -> None:
    client = server.openai()
    common = dict(model=MODEL_NAME, max_tokens=5, temperature=0, stream=True)
    common["stream_options"] = {"include_usage": True}
    if kind == "chat":
        chunks = list(client.chat.completions.create(messages=MESSAGES, **common))
    else:
        chunks = list(client.completions.create(prompt=PROMPT, **common))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert 0 < last.usage.completion_tokens <= 5
    assert all(c.usage is None for c in chunks[:-1])


def test_n2_seeded_choices_are_distinct_and_reproducible(server: LiveServer) -> None:
    client = server.openai()
    args = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=1.0, n=2, seed=7)
    first = client.completions.create(**args)
    second = client.completions.create(**args)
    assert [c.index for c in first.choices] == [0, 1]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in second.choices], "a seed must reproduce"
    assert texts[0] != texts[1], "choices get derived seeds, so they differ"
    assert first.usage.prompt_tokens == len(server.engine.tokenizer.encode(PROMPT))
    assert 2 <= first.usage.completion_tokens <= 20
    streamed, _, _ = stream_text(client.completions.create(stream=True, **args))
    assert streamed == texts, "streaming the same seeded request gives the same choices"
    chat = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=3, n=2)
    a = [c.message.content for c in client.chat.completions.create(**chat).choices]
    b, _, _ = stream_text(client.chat.completions.create(stream=True, **chat))
    assert a == b and len(a) == 2


def test_stop_string_spanning_tokens(server: LiveServer) -> None:
    """Take a stop string that straddles two tokens of the greedy output: the text ends right
    before it, streamed or not, and the finish reason is `stop`."""
    client = server.openai()
    args = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    full = client.completions.create(logprobs=0, **args).choices[0]
    req_text = full.text
    cut = next(
        (
            b
            for b in _token_boundaries(full)
            if 1 <= b < len(req_text) - 1 and _clean(req_text[b - 1 : b + 1])
        ),
        None,
    )
    if cut is None:
        pytest.skip("greedy output has no printable token boundary to stop on")
    stop = req_text[cut - 1 : cut + 1]
    expected = req_text[: req_text.index(stop)]
    out = client.completions.create(stop=[stop], **args).choices[0]
    assert (out.text, out.finish_reason) == (expected, "stop")
    texts, reasons, _ = stream_text(client.completions.create(stop=stop, stream=True, **args))
    assert (texts, reasons) == ([expected], ["stop"])


def _clean(s: str) -> bool:
    return bool(re.fullmatch(r"[\x21-\x7e]+", s))


def _token_boundaries(choice) -> list[int]:
    """Offsets in the text where one output token ends and the next begins, as far as the
    tokens' own strings concatenate to the text (a split UTF-8 character stops the walk)."""
    out, text, pos = [], choice.text, 0
    for token in choice.logprobs.tokens:
        if not text.startswith(token, pos):
            break
        pos += len(token)
        out.append(pos)
    return out


def test_batch_of_prompts_and_token_ids(server: LiveServer) -> None:
    client = server.openai()
    ids = server.engine.tokenizer.encode(PROMPT)
    single = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    for prompt in ([PROMPT, "Hello world"], ids, [ids, ids]):
        out = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0
        )
        assert [c.index for c in out.choices] == list(range(len(out.choices)))
        assert out.choices[0].text == single.choices[0].text
    out = client.completions.create(
        model=MODEL_NAME, prompt=[PROMPT, "Hello world"], n=2, max_tokens=3, temperature=0
    )
    assert len(out.choices) == 4 and out.choices[0].text == out.choices[1].text


def test_logprobs(server: LiveServer) -> None:
    client = server.openai()
    out = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == out.usage.completion_tokens
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_models_health_and_metrics(server: LiveServer) -> None:
    client = server.openai()
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    with server.client() as http:
        assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 128
        assert http.get("/health").status_code == 200
        before = _metric(http.get("/metrics").text, "runtime:time_to_first_token_seconds_count")
        gen_before = _metric(http.get("/metrics").text, "runtime:generation_tokens_total")
        out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5)
        server.wait_idle()
        text = http.get("/metrics").text
    assert _metric(text, "runtime:time_to_first_token_seconds_count") == before + 1
    assert _metric(text, "runtime:generation_tokens_total") == gen_before + (
        out.usage.completion_tokens
    )
    assert 'scheduler="static"' in text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "num_preemptions_total",
        "prompt_tokens_total",
        "e2e_request_latency_seconds",
        "inter_token_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert f"runtime:{name}" in text
    assert _metric(text, "runtime:num_requests_running") == 0


def _metric(text: str, name: str) -> float:
    """The value of the first sample of `name` (labels ignored)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
