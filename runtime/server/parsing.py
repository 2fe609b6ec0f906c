"""Request bodies, parsed on a worker thread: JSON, then strings UTF-8 cannot carry, then the
endpoint's pydantic model. FastAPI would parse on the event loop, where a large body stalls
every stream and `/health`; errors keep FastAPI's shape (`RequestValidationError` -> 400).
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from runtime.server.errors import APIError

Body = TypeVar("Body", bound=BaseModel)

# A lone surrogate can only come from a `\uD800`-`\uDFFF` escape (strict decoding rejects an
# encoded one): look for such an escape in the text before walking the parsed body.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_body(raw: bytes, model: type[Body], content_type: str | None = None) -> Body:
    """Validate a JSON request body against `model`; any problem is a 400 naming the field.

    As FastAPI does: a Content-Type, if given, must be JSON; the encoding is detected (UTF-8,
    with or without a BOM, or UTF-16/32) but decoded strictly, so a lone surrogate can only
    arrive as a `\\u` escape.
    """
    if content_type is not None and not _is_json(content_type):
        raise APIError(
            "The request body must be a JSON object (Content-Type: application/json)", 400
        )
    try:
        text = raw.decode(json.detect_encoding(raw))
        data = json.loads(text)
    except UnicodeDecodeError:
        raise APIError("The request body is not valid UTF-8 JSON", 400) from None
    except json.JSONDecodeError as exc:
        raise APIError(f"Invalid JSON body: {exc}", 400) from None
    except RecursionError:
        raise APIError("Invalid JSON body: nested too deeply", 400) from None
    if not isinstance(data, dict):
        raise APIError(
            "The request body must be a JSON object (Content-Type: application/json)", 400
        )
    if _SURROGATE_ESCAPE.search(text):
        check_encodable(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def check_encodable(data: dict[str, Any]) -> None:
    """400 naming the field of a string (or key) holding a lone UTF-16 surrogate, which a
    JavaScript client sends for half an emoji and no tokenizer can encode."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and _SURROGATE.search(value):
            raise _unencodable(path)
        if isinstance(value, dict):
            for key, item in value.items():
                sub = f"{path}.{key}" if path else key
                if _SURROGATE.search(key):
                    raise _unencodable(sub)
                stack.append((sub, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item) for i, item in enumerate(value))


def _unencodable(path: str) -> APIError:
    return APIError(
        f"{path[:200]}: the string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
        "escape), which cannot be encoded as UTF-8",
        400,
        path.split(".", 1)[0][:200],
    )


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting the JSON body a route parses itself (nested models inlined)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}
