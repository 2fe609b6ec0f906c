"""Incremental detokenization: deltas add up to the full decode, never a broken character."""

from __future__ import annotations

import random

import pytest

from runtime.detokenizer import IncrementalDetokenizer
from runtime.tokenizer import Tokenizer
from tests.tokenizer_factory import make_tokenizer_dir

TEXTS = [
    "Hello world! 😀🚀🎉 done.",
    "日本語のテキスト、新しい🧪実験 and ❤️ ok",
    "  leading spaces,\ttabs\nand newlines  ",
    "Ünïcödé 中文 emoji🙂end",
    "".join(random.Random(0).choices("ab cé日本😀🚀\n€ ", k=200)),
]


@pytest.fixture(scope="module", params=["bytelevel", "metaspace"])
def tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(make_tokenizer_dir(tmp_path_factory.mktemp("d"), kind=request.param))


def _stream(tok: Tokenizer, prompt: list[int], output: list[int], **kw) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, **kw)
    deltas = [detok.add_tokens([t]) for t in output]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_match_full_decode_without_prompt(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, [], ids)
    assert "".join(deltas) == tok.decode(ids)
    if tok.bos_token is None:  # byte-level is lossless; Metaspace drops one leading space
        assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_continue_the_prompt(tok: Tokenizer, text: str) -> None:
    prompt = tok.encode("The prompt 日本 says:")
    output = tok.encode(" " + text, add_special_tokens=False)
    deltas = _stream(tok, prompt, output)
    # The output reads as a continuation of the prompt: its leading space is kept.
    full = tok.decode(prompt + output)
    assert "".join(deltas) == full[len(tok.decode(prompt)) :]
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_char_waits_for_all_its_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("a🧪", add_special_tokens=False)  # 🧪 is not in the corpus: split in bytes
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.add_tokens([t]) for t in ids]
    assert len(ids) >= 3
    assert deltas[-1].endswith("🧪")
    assert all(d == "" for d in deltas[1:-1])
    assert detok.num_pending_tokens == 0


def test_several_tokens_per_call_and_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("Hi 😀 there", add_special_tokens=False)
    eos = tok.eos_token_ids[-1]
    prompt = tok.encode("x")
    detok = IncrementalDetokenizer(tok, prompt)
    expected = tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    assert expected.strip() == "Hi 😀 there"
    assert detok.add_tokens(ids) + detok.add_tokens([eos]) == expected
    keep = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert (keep.add_tokens(ids + [eos]) + keep.flush()).endswith(tok.eos_token)


def test_flush_emits_incomplete_bytes() -> None:
    class Bytes:  # a byte-per-token decoder, like byte-level BPE on invalid output
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    detok = IncrementalDetokenizer(Bytes(), [])
    emoji = "😀".encode()
    assert [detok.add_tokens([b]) for b in emoji] == ["", "", "", "😀"]
    assert detok.add_tokens([0xF0, 0x9F]) == ""  # an unfinished character is held back
    assert detok.flush() == "\ufffd"
    assert detok.text == "😀\ufffd"
