"""Chat-template rendering as `transformers` does it: Jinja2 in an immutable sandbox, because
templates shipped with model folders are untrusted code."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "compile_chat_template", "render_chat_template"]


class ChatTemplateError(ValueError):
    """The chat template rejected the messages or is unusable; the server answers 400."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Jinja's own `tojson` HTML-escapes; templates expect plain JSON (as in transformers)."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, closing a sandbox escape route."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's trick: a "self" key stays usable
        self, args = args[0], args[1:]
        for key in dict(*args, **kwargs):
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Parse once per distinct template text; a syntax error raises ChatTemplateError."""
    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"invalid chat template (line {e.lineno}): {e.message}") from e


def render_chat_template(template: str, **context: Any) -> str:
    """Render with `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, ... in context."""
    compiled = compile_chat_template(template)
    try:
        return compiled.render(**context)
    except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined, security
        raise ChatTemplateError(str(e) or type(e).__name__) from e
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
        raise ChatTemplateError(f"chat template failed on these messages: {e}") from e
