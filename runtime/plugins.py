"""Scheduler plugins: entry-point discovery, per-engine plugin managers, clear load errors."""

from __future__ import annotations

import difflib
import logging
import os
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from runtime import hookspecs
from runtime.defaults import Defaults

ENTRY_POINT_GROUP = "baton_runtime.schedulers"
DECISION_HOOKS = ("admit_requests", "make_kv_cache", "build_attention_mask")
logger = logging.getLogger(__name__)


class PluginError(RuntimeError):
    """A scheduler cannot be found, imported, constructed or registered."""


@dataclass(frozen=True, slots=True)
class SchedulerInfo:
    """One installed scheduler entry point, as `runtime schedulers` lists it."""

    name: str
    value: str
    distribution: str
    version: str


def _entry_points() -> list[EntryPoint]:
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def installed_schedulers() -> list[SchedulerInfo]:
    """Every scheduler entry point installed, without importing any of them."""
    infos = []
    for ep in _entry_points():
        dist = ep.dist
        infos.append(SchedulerInfo(ep.name, ep.value, dist.name if dist else "?",
                                   dist.version if dist else "?"))
    return infos


def load_scheduler_class(name: str) -> type:
    """Import only the named scheduler's entry point; errors name it and its distribution."""
    eps = {ep.name: ep for ep in _entry_points()}
    if name not in eps:
        names = sorted(eps)
        hint = difflib.get_close_matches(name, names, n=1)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        raise PluginError(
            f"unknown scheduler {name!r}.{suggestion} Installed schedulers: "
            f"{', '.join(names) or '(none)'} (entry-point group {ENTRY_POINT_GROUP!r})"
        )
    ep = eps[name]
    dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
    try:
        return ep.load()
    except Exception as exc:
        raise PluginError(
            f"scheduler entry point {name!r} ({ep.value}) from distribution {dist} failed to "
            f"import: {type(exc).__name__}: {exc}"
        ) from exc


def instantiate_scheduler(name: str, options: dict[str, Any] | None) -> object:
    """Build the selected scheduler from its YAML `scheduler_options`."""
    cls = load_scheduler_class(name)
    try:
        return cls(**(options or {}))
    except TypeError as exc:
        raise PluginError(f"scheduler {name!r}: bad scheduler_options {options!r}: {exc}") from exc


def make_plugin_manager(scheduler: object | None, scheduler_name: str = "custom",
                        extra_plugins: tuple[object, ...] = ()) -> pluggy.PluginManager:
    """A fresh manager per engine: defaults (trylast), the scheduler, then observers."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(Defaults(), name="runtime-defaults")
    for plugin in (scheduler, *extra_plugins):
        if plugin is None:
            continue
        label = scheduler_name if plugin is scheduler else None
        try:
            pm.register(plugin, name=label)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"scheduler {scheduler_name!r} has an invalid hook: {exc}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"scheduler {scheduler_name!r}: {exc}") from exc
    if os.environ.get("RUNTIME_TRACE_HOOKS", "") not in ("", "0"):
        enable_hook_tracing(pm)
    return pm


def hooks_implemented(plugin: object) -> list[str]:
    """Names of the hooks a plugin object implements (for `runtime schedulers`)."""
    spec_names = [n for n in dir(hookspecs) if callable(getattr(hookspecs, n))
                  and hasattr(getattr(hookspecs, n), "baton_runtime_spec")]
    return [n for n in spec_names if hasattr(getattr(plugin, n, None), "baton_runtime_impl")]


def _summarise(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__}{tuple(shape)}"
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"{type(value).__name__}[{len(value)}]"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def enable_hook_tracing(pm: pluggy.PluginManager) -> None:
    """Print every hook call with an argument summary and its result (RUNTIME_TRACE_HOOKS=1)."""

    def before(hook_name: str, hook_impls: list, kwargs: dict) -> None:
        args = ", ".join(f"{k}={_summarise(v)}" for k, v in kwargs.items())
        impls = ", ".join(impl.plugin_name for impl in hook_impls)
        print(f"[hook] {hook_name}({args}) impls=[{impls}]", file=sys.stderr)

    def after(outcome: Any, hook_name: str, hook_impls: list, kwargs: dict) -> None:
        try:
            result = _summarise(outcome.get_result())
        except BaseException as exc:  # noqa: BLE001 - tracing reports, never swallows
            result = f"raised {type(exc).__name__}: {exc}"
        print(f"[hook] {hook_name} -> {result}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)
