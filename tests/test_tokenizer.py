"""Tokenizer loading, encode/decode, special tokens, generation config and chat templates."""

from __future__ import annotations

import json

import pytest

from runtime.tokenizer import ChatTemplateError, Tokenizer, TokenizerLoadError
from tests.tokenizer_factory import DEFAULT_CHAT_TEMPLATE, build_tokenizer, make_tokenizer_dir

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello 😀"},
]


@pytest.fixture(scope="module", params=["bytelevel", "metaspace"])
def tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = make_tokenizer_dir(tmp_path_factory.mktemp(request.param), kind=request.param)
    return Tokenizer.from_dir(folder)


def test_factory_is_deterministic_and_sized() -> None:
    for kind in ("bytelevel", "metaspace"):
        assert build_tokenizer(kind, 400).to_str() == build_tokenizer(kind, 400).to_str()
        assert build_tokenizer(kind, 400).get_vocab_size() == 400


def test_missing_tokenizer_json_names_folder(tmp_path) -> None:
    with pytest.raises(TokenizerLoadError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


def test_roundtrip_unicode(tok: Tokenizer) -> None:
    text = "Hello world, 日本語 and 🚀 café!"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 512
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_bos_handling(tmp_path) -> None:
    ms = Tokenizer.from_dir(make_tokenizer_dir(tmp_path / "ms", kind="metaspace"))
    assert ms.bos_token_id == ms.token_to_id("<s>")
    assert ms.encode("hi")[0] == ms.bos_token_id
    assert ms.encode("hi", add_special_tokens=False)[0] != ms.bos_token_id
    no_bos = Tokenizer.from_dir(
        make_tokenizer_dir(
            tmp_path / "nb", kind="metaspace", tokenizer_config={"add_bos_token": False}
        )
    )
    assert no_bos.encode("hi") == ms.encode("hi")[1:]
    bl = Tokenizer.from_dir(
        make_tokenizer_dir(
            tmp_path / "bl",
            tokenizer_config={"bos_token": "<|im_start|>", "add_bos_token": True},
        )
    )
    assert bl.encode("hi")[0] == bl.token_to_id("<|im_start|>")
    assert bl.encode("hi")[1:] == bl.encode("hi", add_special_tokens=False)


def test_decode_skips_special_tokens(tok: Tokenizer) -> None:
    eos = tok.eos_token_ids[0]
    ids = [*tok.encode("ok", add_special_tokens=False), eos]
    assert tok.decode(ids) == "ok"
    assert tok.decode(ids, skip_special_tokens=False).endswith(tok.eos_token)
    assert eos in tok.special_token_ids


def test_generation_config_eos_list_and_defaults(tmp_path) -> None:
    gen = {"eos_token_id": [7, 9], "temperature": 0.6, "top_p": 0.9, "top_k": 20, "do_sample": True}
    folder = make_tokenizer_dir(tmp_path, generation_config=gen)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 11}))
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_token_ids == (7, 9, 11, tok.token_to_id("<|endoftext|>"))
    assert tok.generation_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}


def test_generation_config_eos_int_dedup(tmp_path) -> None:
    folder = make_tokenizer_dir(tmp_path, kind="metaspace", generation_config={"eos_token_id": 2})
    tok = Tokenizer.from_dir(folder)
    assert tok.token_to_id("</s>") == 2
    assert tok.eos_token_ids == (2,)
    assert tok.generation_defaults == {}


def test_chat_template_renders(tok: Tokenizer) -> None:
    out = tok.apply_chat_template(MESSAGES)
    assert out == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello 😀<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tok.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith(
        "assistant\n"
    )


def test_chat_template_context_and_filters(tok: Tokenizer) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "  {% if m %}{{ m | tojson }}{% endif %}|\n"
        "{% endfor %}{{ eos_token }}{{ extra }}"
    )
    out = tok.apply_chat_template(MESSAGES[1:], chat_template=template, extra="!")
    # trim_blocks/lstrip_blocks remove the block newlines and indentation; tojson keeps emoji.
    assert (
        out == f'{tok.bos_token or ""}{{"role": "user", "content": "Hello 😀"}}|\n{tok.eos_token}!'
    )


def test_raise_exception_is_chat_template_error(tok: Tokenizer) -> None:
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        tok.apply_chat_template(MESSAGES, chat_template=template)
    assert isinstance(ChatTemplateError("x"), ValueError)


def test_sandbox_blocks_unsafe_access(tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template(MESSAGES, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template(MESSAGES, chat_template="{% set x = messages.append(1) %}")


def test_missing_template_mentions_option(tmp_path) -> None:
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, chat_template=None))
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="--chat-template"):
        tok.apply_chat_template(MESSAGES)


def test_named_templates_pick_default(tmp_path) -> None:
    named = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": DEFAULT_CHAT_TEMPLATE},
    ]
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path / "a", chat_template=named))
    assert tok.apply_chat_template(MESSAGES).startswith("<|im_start|>system")
    assert tok.chat_templates["tool_use"] == "TOOLS"
    only_named = Tokenizer.from_dir(make_tokenizer_dir(tmp_path / "b", chat_template=named[:1]))
    with pytest.raises(ChatTemplateError, match="tool_use"):
        only_named.apply_chat_template(MESSAGES)


def test_jinja_file_and_option_override(tmp_path) -> None:
    folder = make_tokenizer_dir(tmp_path / "m")
    (folder / "chat_template.jinja").write_text("FILE{{ messages | length }}")
    assert Tokenizer.from_dir(folder).apply_chat_template(MESSAGES) == "FILE2"
    assert (
        Tokenizer.from_dir(folder, chat_template="OPT{{ 1 + 1 }}").chat_template == "OPT{{ 1 + 1 }}"
    )
    path = tmp_path / "t.jinja"
    path.write_text("PATH")
    assert (
        Tokenizer.from_dir(folder, chat_template=str(path)).apply_chat_template(MESSAGES) == "PATH"
    )
    with pytest.raises(TokenizerLoadError, match="not found"):
        Tokenizer.from_dir(folder, chat_template="no/such/file.jinja")


def test_template_syntax_error(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    folder = make_tokenizer_dir(tmp_path, chat_template="{% for %}")
    tok = Tokenizer.from_dir(folder)  # completions still work
    assert "unusable" in caplog.text
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        tok.apply_chat_template(MESSAGES)
    with pytest.raises(TokenizerLoadError, match="--chat-template"):
        Tokenizer.from_dir(folder, chat_template="{{ x ")


def test_matches_transformers(tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tok.name)
    for text in ["Hello world 😀 日本語", "<|im_end|> hi", " lead", ""]:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(MESSAGES) == expected
    assert tok.bos_token == hf.bos_token and tok.bos_token_id == hf.bos_token_id
    assert hf.eos_token_id in tok.eos_token_ids


def test_bos_id_from_generation_config_when_config_has_none(tmp_path) -> None:
    folder = make_tokenizer_dir(tmp_path, generation_config={"bos_token_id": 0})
    tok = Tokenizer.from_dir(folder)
    assert tok.bos_token_id == 0 and tok.bos_token is None  # templates see no bos_token
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
