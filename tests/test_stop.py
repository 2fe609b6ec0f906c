"""Stop strings: earliest match, spanning deltas, truncation and streaming hold-back."""

from __future__ import annotations

import random

import pytest

from runtime.detokenizer import IncrementalDetokenizer
from runtime.stop import StopChecker, compile_stops
from runtime.tokenizer import Tokenizer
from tests.tokenizer_factory import make_tokenizer_dir


def naive_stream(deltas: list[str], stop: list[str]) -> tuple[list[str], str, str | None]:
    """The rule, written the slow way: earliest match ending in the newest delta (ties to the
    first listed), else hold back the longest tail that is a proper prefix of a stop string."""
    text, emitted, out = "", 0, []
    for d in deltas:
        old = len(text)
        text += d
        hits = [(text.find(s, max(0, old - len(s) + 1)), i) for i, s in enumerate(stop)]
        hits = [h for h in hits if h[0] != -1]
        if hits:
            idx, i = min(hits)
            text = text[:idx]
            out.append(text[emitted:])
            return out, text, stop[i]
        hold = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        upto = max(emitted, len(text) - hold)
        out.append(text[emitted:upto])
        emitted = upto
    out.append(text[emitted:])
    return out, text, None


def test_earliest_match_and_ties() -> None:
    _, checker = _run(["abc STOP x END"], ["END", "STOP"])
    assert checker.matched == "STOP" and checker.text == "abc "
    _, checker = _run(["xabcd"], ["bc", "abcd"])  # a longer stop that starts earlier wins
    assert checker.matched == "abcd" and checker.text == "x"
    _, checker = _run(["xxab"], ["ab", "ab"])
    assert checker.matched == "ab" and checker.text == "xx"
    _, checker = _run(["STOPxx"], ["STOP", "xx"])
    assert checker.matched == "STOP"


def test_holdback_is_longest_stop_prefix() -> None:
    assert _run(["hello wor"], ["world"])[0][0] == "hello "
    assert _run(["abc<"], ["<|end|>", "c<|"])[0][0] == "ab"
    assert _run(["hello"], ["world"])[0][0] == "hello"


def test_matches_the_naive_rule_on_random_streams() -> None:
    rng = random.Random(0)
    for _ in range(400):
        stop = ["".join(rng.choices("ab", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(1, 30)))
        cuts = sorted(rng.sample(range(1, len(text) + 1), min(len(text), rng.randint(1, 6))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], cuts, strict=False) if text[i:j]]
        out, checker = _run(deltas, stop)
        ref_out, ref_text, ref_match = naive_stream(deltas, stop)
        assert (out, checker.text, checker.matched) == (ref_out, ref_text, ref_match), (
            deltas, stop)


def test_matching_work_is_linear_in_the_output() -> None:
    """A long stop string that almost matches everywhere ("aaa...ab" over "aaaa..."), checked
    one character at a time: rescanning would cost output x stop length per token; the
    automaton makes at most two trie lookups per output character whatever the stop strings."""
    stops = ["a" * 1999 + "b", "a" * 1000 + "c", *(f"x{i}y" for i in range(30))]
    for length in (2_000, 8_000):
        checker = StopChecker(stops)
        for _ in range(length):
            assert checker.append("a") in ("", "a")
        assert not checker.stopped and checker.num_lookups <= 2 * length
    assert compile_stops(tuple(stops)) is compile_stops(tuple(stops))  # built once, shared


def _run(deltas: list[str], stop: list[str]) -> tuple[list[str], StopChecker]:
    checker = StopChecker(stop)
    out = []
    for d in deltas:
        out.append(checker.append(d))
        if checker.stopped:
            break
    else:
        out.append(checker.flush())
    return out, checker


def test_stop_spanning_deltas_truncates_and_never_leaks() -> None:
    out, checker = _run(["The ans", "wer is 4", "2.\n\nUs", "er: more"], ["\n\nUser:"])
    assert checker.stopped and checker.matched == "\n\nUser:"
    assert "".join(out) == checker.text == "The answer is 42."
    assert all("\n" not in chunk for chunk in out)  # "\n\nUs" was held back, never streamed


def test_false_start_is_released() -> None:
    out, checker = _run(["a <", "|e", "x", "tra"], ["<|end|>"])
    assert not checker.stopped
    assert out == ["a ", "", "<|ex", "tra", ""]
    assert checker.text == "a <|extra"


def test_flush_releases_tail_when_finished_otherwise() -> None:
    out, checker = _run(["foo ST"], ["STOP"])
    assert out == ["foo ", "ST"] and not checker.stopped


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_stop_string_over_tokens(tmp_path, kind: str) -> None:
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, kind=kind))
    ids = tok.encode("Hello world 😀 the quick brown fox", add_special_tokens=False)
    detok, checker = IncrementalDetokenizer(tok, []), StopChecker(["😀 the qu", "zzz"])
    streamed = []
    for t in ids:
        streamed.append(checker.append(detok.add_tokens([t])))
        if checker.stopped:
            break
    assert checker.stopped
    assert "".join(streamed) == checker.text == "Hello world "
