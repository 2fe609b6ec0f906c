"""Runtime configuration: command line over YAML file over defaults, validated by key."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runtime.kv_sizing import parse_kv_memory

DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16")  # runtime.model_runner.resolve_kv_dtype
LINEAR_BACKENDS = ("auto", "torch", "onednn", "mkl", "native")  # runtime.linear_kernels
ATTENTION_BACKENDS = ("auto", "sdpa", "native")  # runtime.attention_kernels
COMPILE_MODES = ("background",)  # besides true and false: runtime.compiled_forward
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "kjv-llama-tiny"


_POSITIVE_LIMITS = ("max_request_body_bytes", "max_prompt_chars", "max_choices_per_request",
                    "max_stop_strings", "max_stop_string_chars", "limit_concurrency")


class ConfigError(ValueError):
    """A config file or option is invalid; the message names the file and key."""


def check_static_decode_rows(rows: object, compiled: bool, key: str = "static_decode_rows",
                             compile_key: str = "compile (true or background)"
                             ) -> tuple[int, ...]:
    """The row counts of the fixed-shape graphs, sorted and unique, or a `ConfigError` naming
    `key`: one rule for the YAML key, `runtime serve`'s flag and `runtime bench`'s flag."""
    if isinstance(rows, int) or not isinstance(rows, list | tuple) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in rows):
        raise ConfigError(f"{key}: expected a list of row counts >= 1 (such as [1, 2, 4, 8]), "
                          f"got {rows!r}")
    if rows and not compiled:
        raise ConfigError(f"{key}: needs {compile_key}: the fixed-shape graphs are compiled")
    return tuple(sorted(set(rows)))


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Every key a YAML config may hold; the long CLI option names with `-` as `_`."""

    model: str | None = None
    scheduler: str = "baton"
    scheduler_options: dict = field(default_factory=dict)
    dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    kv_cache_tokens: int | None = None
    kv_cache_memory: str | float = "auto"
    kv_cache_dtype: str = "auto"
    linear_backend: str = "auto"
    attention_backend: str = "auto"
    compile: bool | str = False  # true, false or background (runtime.compiled_forward)
    static_decode_rows: tuple[int, ...] = ()  # fixed-shape graphs (runtime.static_graphs)
    static_graph_cache: bool | str = True  # their packages on disk (runtime.graph_packages)
    static_graph_cache_gib: float = 16.0
    seed: int = 0
    num_threads: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_queued_requests: int = 1024
    shutdown_timeout: float = 30.0
    chat_template: str | None = None
    log_requests: bool = False
    log_interval: float = 10.0
    # Limits against large or hostile requests (docs/serving.md, "Limits").
    max_request_body_bytes: int = 8 * 1024 * 1024
    max_prompt_chars: int = 1_000_000
    max_choices_per_request: int = 256
    max_stop_strings: int = 32
    max_stop_string_chars: int = 512
    limit_concurrency: int = 512
    keep_alive_timeout: float = 5.0
    header_timeout: float = 20.0
    body_timeout: float = 60.0
    # Access: an API key (else $RUNTIME_API_KEY) and the Host names a loopback server answers.
    api_key: str | None = None
    api_key_all_routes: bool = False
    allowed_hosts: str | None = None
    # Scale-out on Ray (docs/scale-out.md); without `replicas` Ray is not imported.
    replicas: int | None = None
    prefill_workers: int = 0
    ray_address: str | None = None

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _check_choice("linear_backend", self.linear_backend, LINEAR_BACKENDS)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if isinstance(self.compile, str) and self.compile not in COMPILE_MODES:
            raise ConfigError("compile: expected true, false or "
                              f"{', '.join(COMPILE_MODES)}, got {self.compile!r}")
        self._check_static_decode_rows()
        if not isinstance(self.static_graph_cache, bool | str) or self.static_graph_cache == "":
            raise ConfigError("static_graph_cache: expected true, false or a directory, got "
                              f"{self.static_graph_cache!r}")
        if isinstance(self.static_graph_cache_gib, bool) or not (
                isinstance(self.static_graph_cache_gib, int | float)
                and self.static_graph_cache_gib > 0):
            raise ConfigError("static_graph_cache_gib: must be a number of GiB > 0, got "
                              f"{self.static_graph_cache_gib!r}")
        try:
            parse_kv_memory(self.kv_cache_memory)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: expected cpu, cuda, cuda:N or auto, got {self.device!r}")
        for key in ("max_num_seqs", "port", "max_queued_requests", *_POSITIVE_LIMITS):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("keep_alive_timeout", "header_timeout", "body_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0 seconds, got {getattr(self, key)}")
        if not self.shutdown_timeout >= 0:
            raise ConfigError(f"shutdown_timeout: must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key: must not be empty")
        for key in ("max_model_len", "kv_cache_tokens", "num_threads", "replicas"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        self._check_scale_out()

    def _check_static_decode_rows(self) -> None:
        rows = check_static_decode_rows(self.static_decode_rows, bool(self.compile))
        object.__setattr__(self, "static_decode_rows", rows)

    def _check_scale_out(self) -> None:
        """The Ray keys only mean something with `replicas`; say so rather than ignore them."""
        if self.prefill_workers < 0:
            raise ConfigError(f"prefill_workers: must be >= 0, got {self.prefill_workers}")
        if self.replicas is None and self.prefill_workers:
            raise ConfigError("prefill_workers: needs replicas (the prefill pool runs on Ray); "
                              "add --replicas 1")
        if self.replicas is None and self.ray_address is not None:
            raise ConfigError("ray_address: needs replicas (without it nothing runs on Ray)")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ConfigError("ray_address: must not be empty")

    def resolved_model(self) -> Path:
        """The model folder: the configured one, or the demo model shipped in models/."""
        return Path(self.model) if self.model else DEMO_MODEL_DIR

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def redacted(self) -> dict[str, Any]:
        """`as_dict` fit for a log line: the API key is replaced by `***`."""
        data = self.as_dict()
        if data["api_key"] is not None:
            data["api_key"] = "***"
        return data


CONFIG_KEYS: dict[str, Any] = {
    f.name: typing.get_type_hints(RuntimeConfig)[f.name] for f in dataclasses.fields(RuntimeConfig)
}


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against the field's type; ints are accepted for floats."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for typ in allowed:
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ in (str, bool, dict) and isinstance(value, typ):
            return value
        if typing.get_origin(typ) is tuple and isinstance(value, list | tuple):
            return tuple(value)  # the items are checked by RuntimeConfig
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{where}: key {key!r} expects {names}, got {value!r}")


def normalise_keys(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Map `max-model-len` to `max_model_len`, rejecting unknown keys with a suggestion."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in CONFIG_KEYS:
            near = difflib.get_close_matches(name, CONFIG_KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        out[name] = _coerce(name, value, CONFIG_KEYS[name], where)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse and validate one YAML config file into known keys."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option names, got {type(raw).__name__}")
    return normalise_keys(raw, str(path))


def build_config(config_file: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> RuntimeConfig:
    """Defaults, then the YAML file, then command-line overrides (None means not given)."""
    values = read_config_file(config_file) if config_file else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(normalise_keys(given, "command line"))
    try:
        return RuntimeConfig(**values)
    except ConfigError as exc:
        where = str(config_file) if config_file else "config"
        raise ConfigError(f"{where}: {exc}") from None
