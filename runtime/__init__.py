"""baton-runtime: a lean LLM serving runtime with pluggable batch schedulers.

The plugin API (`runtime.api`) is re-exported here, imported on first use: importing `runtime`
must not load torch, whose OpenMP reads its settings once (`runtime.cli` sets them first).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from runtime.hookspecs import hookimpl

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(name)  # a submodule (`from runtime import hardware`): no torch
    api = importlib.import_module("runtime.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *importlib.import_module("runtime.api").__all__})


__all__ = ["__version__", "hookimpl"]  # and every name of runtime.api.__all__, loaded lazily
