"""Helpers for scheduler options (the YAML `scheduler_options` a scheduler's class receives)."""

from __future__ import annotations

import warnings
from typing import TypeVar

T = TypeVar("T")


def renamed_option(scheduler: str, old: str, old_value: T | None, new: str,
                   new_value: T | None) -> T | None:
    """The value of option `new`, still accepting its former name `old` with a warning."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise ValueError(f"{scheduler}: give {new} only ({old} is its former name)")
    warnings.warn(f"{scheduler}: scheduler option {old!r} is now called {new!r}; the old name "
                  "will stop working in a later release", FutureWarning, stacklevel=3)
    return old_value
