"""Stop strings: earliest match, spanning deltas, truncation and streaming hold-back."""

from __future__ import annotations

import pytest

from runtime.detokenizer import IncrementalDetokenizer
from runtime.stop import StopChecker, find_stop_string, stop_holdback
from runtime.tokenizer import Tokenizer
from tests.tokenizer_factory import make_tokenizer_dir


def test_find_earliest_stop() -> None:
    assert find_stop_string("abc STOP x END", 14, ["END", "STOP"]) == (4, "STOP")
    assert find_stop_string("abcdef", 6, ["zz"]) is None
    assert find_stop_string("xxSTOP", 1, ["STOP"]) == (2, "STOP")  # spans older text
    assert find_stop_string("STOPxx", 1, ["STOP"]) is None  # checked at an earlier step


def test_holdback_is_longest_stop_prefix() -> None:
    assert stop_holdback("hello wor", ["world"]) == 3
    assert stop_holdback("hello", ["world"]) == 0
    assert stop_holdback("abc<", ["<|end|>", "c<|"]) == 2
    assert stop_holdback("abc", []) == 0
    assert stop_holdback("world", ["world"]) == 0  # a full match is the stop's job, not ours


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
