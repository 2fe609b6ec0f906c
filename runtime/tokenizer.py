"""Tokenizer of a Hugging Face model folder: `tokenizer.json` through the `tokenizers` library,
special tokens and chat template from `tokenizer_config.json`, stop ids and sampling defaults
from `generation_config.json` / `config.json`. No `transformers` at serving time."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from runtime.chat_template import ChatTemplateError, compile_chat_template, render_chat_template
from runtime.detokenizer import IncrementalDetokenizer

__all__ = [
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "Tokenizer",
    "TokenizerLoadError",
    "load_chat_template",
]

logger = logging.getLogger(__name__)

# Longer texts are encoded without holding the GIL, so a server tokenizing a long prompt on a
# worker thread keeps its event loop (other streams, /health) running meanwhile.
_GIL_FREE_CHARS = 4096

# generation_config.json keys we expose as request defaults (vLLM's subset we support).
_GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p")


class TokenizerLoadError(ValueError):
    """The model folder has no usable tokenizer (message names the folder and the file)."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerLoadError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def load_chat_template(value: str) -> str:
    """Resolve a `--chat-template` value: a path to a file, or the template text itself."""
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:  # e.g. a long template string is not a valid file name
        pass
    if "{{" in value or "{%" in value:
        return value
    raise TokenizerLoadError(f"chat template file not found: {value}")


def _pick_templates(raw: Any) -> dict[str, str]:
    """tokenizer_config `chat_template` is a string or a list of {"name", "template"}."""
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list):
        return {
            t["name"]: t["template"]
            for t in raw
            if isinstance(t, dict) and isinstance(t.get("name"), str) and "template" in t
        }
    return {}


class Tokenizer:
    """Encode, decode and chat-template rendering for one model folder."""

    def __init__(
        self,
        hf: _HFTokenizer,
        *,
        bos_token: str | None = None,
        bos_token_id: int | None = None,
        eos_token: str | None = None,
        add_bos_token: bool | None = None,
        chat_templates: dict[str, str] | None = None,
        extra_eos_token_ids: tuple[int, ...] = (),
        generation_defaults: dict[str, Any] | None = None,
        name: str = "",
    ) -> None:
        self._hf = hf
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self.chat_templates = dict(chat_templates or {})
        if bos_token is not None:
            bos_token_id = self.token_to_id(bos_token)
        self.bos_token_id = bos_token_id
        eos_ids = list(extra_eos_token_ids)
        if eos_token is not None and (eid := self.token_to_id(eos_token)) is not None:
            eos_ids.append(eid)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_ids))
        self.generation_defaults: dict[str, Any] = dict(generation_defaults or {})
        self._special_ids = frozenset(
            idx for idx, tok in hf.get_added_tokens_decoder().items() if tok.special
        )

    @classmethod
    def from_dir(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        """Load a HF folder; `chat_template` (text or file, the `--chat-template` option)
        overrides the folder's template."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerLoadError(
                f"no tokenizer.json in model folder {folder} (only fast HF tokenizers are supported)"
            )
        try:
            hf = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises plain Exception
            raise TokenizerLoadError(f"cannot load {tok_file}: {e}") from e
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        gen_cfg = _read_json(folder / "generation_config.json")
        model_cfg = _read_json(folder / "config.json")

        templates = _pick_templates(tok_cfg.get("chat_template"))
        template_json = _read_json(folder / "chat_template.json").get("chat_template")
        templates.update(_pick_templates(template_json))
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            templates["default"] = jinja_file.read_text(encoding="utf-8")
        for tname, text in templates.items():  # completions still work: warn, fail on chat
            try:
                compile_chat_template(text)
            except ChatTemplateError as e:
                logger.warning("chat template %r of %s is unusable: %s", tname, folder, e)
        if chat_template is not None:  # an explicit --chat-template must be valid at start
            templates["default"] = load_chat_template(chat_template)
            try:
                compile_chat_template(templates["default"])
            except ChatTemplateError as e:
                raise TokenizerLoadError(f"--chat-template {chat_template!r}: {e}") from e

        eos_ids = _as_id_list(gen_cfg.get("eos_token_id")) + _as_id_list(
            model_cfg.get("eos_token_id")
        )
        # The template's bos_token text comes only from tokenizer_config (as in transformers);
        # the id falls back to generation_config / config.json for information.
        bos_ids = _as_id_list(gen_cfg.get("bos_token_id")) or _as_id_list(
            model_cfg.get("bos_token_id")
        )
        add_bos = tok_cfg.get("add_bos_token")
        return cls(
            hf,
            bos_token=_token_content(tok_cfg.get("bos_token")),
            bos_token_id=bos_ids[0] if bos_ids else None,
            eos_token=_token_content(tok_cfg.get("eos_token")),
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
            chat_templates=templates,
            extra_eos_token_ids=tuple(eos_ids),
            generation_defaults={k: gen_cfg[k] for k in _GENERATION_DEFAULT_KEYS if k in gen_cfg},
            name=str(folder),
        )

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included (the model may pad beyond it)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; an explicit `add_bos_token` adds or drops the BOS that the
        tokenizer.json post-processor would (transformers 4 Llama/Gemma behaviour; transformers 5
        ignores the key, real folders agree with their post-processor anyway).

        Prompts rendered by a chat template usually contain the BOS text already: encode them
        with `add_special_tokens=False` (as vLLM does) to avoid a double BOS.
        """
        if len(text) > _GIL_FREE_CHARS:  # `encode` holds the GIL, `encode_batch` releases it
            enc = self._hf.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        else:
            enc = self._hf.encode(text, add_special_tokens=add_special_tokens)
        ids = list(enc.ids)
        bos = self.bos_token_id
        if not add_special_tokens or bos is None or self.add_bos_token is None:
            return ids
        added_by_post_processor = bool(ids) and ids[0] == bos and enc.special_tokens_mask[0] == 1
        if self.add_bos_token and not added_by_post_processor:
            ids.insert(0, bos)
        elif not self.add_bos_token and added_by_post_processor:
            ids.pop(0)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **extra_context: Any,
    ) -> str:
        """Render `messages` to a prompt string; template errors raise ChatTemplateError (a 400)."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            if self.chat_templates:
                names = ", ".join(sorted(self.chat_templates))
                raise ChatTemplateError(
                    f"this model has several chat templates ({names}) and none named 'default'; "
                    "pass one with the --chat-template option"
                )
            raise ChatTemplateError(
                "this model has no chat template (no chat_template in tokenizer_config.json and "
                "no chat_template.jinja); supply one with the --chat-template option, "
                "or use /v1/completions"
            )
        return render_chat_template(
            template,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **extra_context,
        )

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token_ids})"
