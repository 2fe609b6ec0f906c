"""Tiny, deterministic Hugging Face tokenizer folders for tests (no downloads).

`make_tokenizer_dir(tmp_path)` trains a small BPE on a fixed corpus (English, CJK, emoji) and
writes `tokenizer.json` + `tokenizer_config.json` (+ `generation_config.json` when given), so
any test can build a model folder that `runtime.tokenizer.Tokenizer.from_dir` loads.

- kind="bytelevel": GPT-2/Qwen style (ByteLevel pre-tokenizer and decoder), no BOS,
  specials `<|endoftext|>` (eos), `<|im_start|>`, `<|im_end|>`.
- kind="metaspace": Llama/Mistral style (Metaspace pre-tokenizer, byte fallback `<0xXX>`
  tokens, `▁`→space decoder), specials `<unk>`, `<s>` (bos, added by the post-processor), `</s>`.

The vocabulary is padded with `<unused_N>` tokens to exactly `vocab_size`, so a test model
config can use the same number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "Large language models generate text one token at a time.",
    "Batching many requests together keeps the accelerator busy.",
    "The key value cache stores attention keys and values for every layer.",
    "Orca schedules at the granularity of a single iteration.",
    "BATON embeds the new query's cache into the running batch.",
    "Numbers like 12345 and 3.14159 appear in text, too.",
    "Emoji are fun 😀 🚀 🎉 and so are hearts ❤️ and flags.",
    "日本語のテキストも少し含めます。東京は大きな都市です。",
    "中文文本也包括在内，你好世界。",
    "Ünïcödé àccents, naïve café, and the euro sign €.",
    "def main():\n    print('hello world')\n    return 0\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
    "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n",
)

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIALS = {
    "bytelevel": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "metaspace": ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
}


def build_tokenizer(
    kind: Literal["bytelevel", "metaspace"] = "bytelevel", vocab_size: int = 512
) -> Tokenizer:
    """Train the tiny tokenizer in memory; the same arguments always give the same JSON."""
    if kind not in _SPECIALS:
        raise ValueError(f"kind must be 'bytelevel' or 'metaspace', got {kind!r}")
    specials = _SPECIALS[kind]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        budget = vocab_size
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
        budget = vocab_size - 256  # room for the <0xXX> byte-fallback tokens
    trainer = trainers.BpeTrainer(
        vocab_size=budget, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    ordered = sorted(vocab, key=vocab.__getitem__)
    if kind == "metaspace":
        n = len(specials)
        ordered = ordered[:n] + [f"<0x{b:02X}>" for b in range(256)] + ordered[n:]
        data["model"]["byte_fallback"] = True
    if len(ordered) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is too small for a {kind} tokenizer")
    ordered += [f"<unused_{i}>" for i in range(vocab_size - len(ordered))]
    data["model"]["vocab"] = {t: i for i, t in enumerate(ordered)}
    ids = data["model"]["vocab"]
    for added in data["added_tokens"]:
        added["id"] = ids[added["content"]]
    out = Tokenizer.from_str(json.dumps(data))
    if kind == "metaspace":
        out.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
        out.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["<s>"])]
        )
    else:
        out.post_processor = processors.ByteLevel(trim_offsets=False)
    return out


def make_tokenizer_dir(
    path: str | Path,
    kind: Literal["bytelevel", "metaspace"] = "bytelevel",
    chat_template: str | list[dict[str, str]] | None = DEFAULT_CHAT_TEMPLATE,
    vocab_size: int = 512,
    generation_config: dict[str, Any] | None = None,
    tokenizer_config: dict[str, Any] | None = None,
) -> Path:
    """Write a loadable tokenizer folder at `path` (created if needed) and return it.

    `chat_template=None` leaves the template out; `tokenizer_config` entries override the
    written `tokenizer_config.json` keys; `generation_config` is written as is when given.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(kind, vocab_size).save(str(folder / "tokenizer.json"))
    if kind == "bytelevel":
        config: dict[str, Any] = {"bos_token": None, "eos_token": "<|endoftext|>"}
    else:
        config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template is not None:
        config["chat_template"] = chat_template
    config.update(tokenizer_config or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return folder
