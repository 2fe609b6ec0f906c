"""Scheduler plugins: entry-point discovery, per-engine plugin managers, clear load errors."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points, packages_distributions
from typing import Any

import pluggy

from runtime import hookspecs
from runtime.defaults import Defaults
from runtime.scheduling import SchedulerError

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


def _dist_label(ep: EntryPoint) -> str:
    return f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"


@functools.cache
def _module_distributions() -> dict[str, list[str]]:
    return packages_distributions()  # ~0.2 s: only ever asked when an error is being reported


def scheduler_origin(name: str, scheduler: object | None) -> str:
    """How every plugin-originated error names its source: `scheduler 'NAME' (DIST VERSION)`.

    The distribution is the entry point's when `scheduler` is that entry point's class, else
    the one that installed the class's top-level package; a class defined outside any
    distribution (a test, a notebook) is named by its import path instead.
    """
    if scheduler is None:
        return f"scheduler {name!r} (the runtime's built-in defaults)"
    cls = type(scheduler)
    ep = next((ep for ep in _entry_points() if ep.name == name), None)
    try:
        if ep is not None and ep.load() is cls:
            return f"scheduler {name!r} ({_dist_label(ep)})"
    except Exception:  # noqa: BLE001 - naming the culprit must not raise a second error
        pass
    dists = _module_distributions().get(cls.__module__.partition(".")[0])
    if dists:
        return f"scheduler {name!r} (class {cls.__name__} from {dists[0]})"
    return f"scheduler {name!r} (class {cls.__module__}.{cls.__name__})"


def plugin_failure(name: str, scheduler: object | None, exc: Exception, what: str) -> str:
    """The error a request gets when its scheduler raised (`what` failed) or broke a contract."""
    detail = str(exc) if isinstance(exc, SchedulerError) else f"{what}: {type(exc).__name__}: {exc}"
    return f"{scheduler_origin(name, scheduler)}: {detail}"


def call_observers(hook: Callable[..., Any], **kwargs: Any) -> None:
    """Call an observer hook; a raising observer is logged, never fatal to the step."""
    try:
        hook(**kwargs)
    except Exception:
        logger.exception("observer hook %s raised", hook.name)


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
    dist = _dist_label(ep)
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
    except (TypeError, ValueError) as exc:
        dist = _dist_label(next(ep for ep in _entry_points() if ep.name == name))
        raise PluginError(f"scheduler {name!r} ({dist}): bad scheduler_options {options!r}: "
                          f"{type(exc).__name__}: {exc}") from exc


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
            who = scheduler_origin(scheduler_name, plugin) if plugin is scheduler \
                else f"observer {type(plugin).__qualname__}"
            raise PluginError(f"{who} has an invalid hook: {exc}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        who = scheduler_origin(scheduler_name, scheduler)
        raise PluginError(f"{who}: a method marked @hookimpl is no hook: {exc}") from exc
    if os.environ.get("RUNTIME_TRACE_HOOKS", "") not in ("", "0"):
        enable_hook_tracing(pm)
    return pm


def hooks_implemented(plugin: object) -> list[str]:
    """Names of the hooks a plugin object implements (for `runtime schedulers`)."""
    spec_names = [n for n in dir(hookspecs) if callable(getattr(hookspecs, n))
                  and hasattr(getattr(hookspecs, n), "baton_runtime_spec")]
    return [n for n in spec_names if hasattr(getattr(plugin, n, None), "baton_runtime_impl")]


def describe_schedulers() -> list[dict[str, Any]]:
    """`runtime schedulers`: name, package, version, object and hooks of each entry point.

    A plugin that fails to import is listed with its error instead of its hooks.
    """
    rows = []
    for info in installed_schedulers():
        row: dict[str, Any] = {"name": info.name, "package": info.distribution,
                               "version": info.version, "object": info.value}
        try:
            row["hooks"] = hooks_implemented(load_scheduler_class(info.name))
        except PluginError as exc:
            row["hooks"] = []
            row["error"] = f"{type(exc.__cause__).__name__}: {exc.__cause__}"
        rows.append(row)
    return rows


def _summarise(value: Any, limit: int = 160) -> str:
    """A one-line summary of a hook argument or result: tensors by shape, requests by id."""
    if hasattr(value, "request_id"):
        return str(value.request_id)
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(getattr(value, "shape", None), tuple):  # a tensor
        return f"{type(value).__name__}{tuple(value.shape)} {str(getattr(value, 'dtype', ''))}"
    if isinstance(value, (list, tuple)):
        items = [_summarise(v, 40) for v in value[:6]]
        more = f", ... {len(value)} in all" if len(value) > 6 else ""
        return f"[{', '.join(items)}{more}]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{f.name}={_summarise(getattr(value, f.name), 60)}"
                           for f in dataclasses.fields(value))
        text = f"{type(value).__name__}({fields})"
    elif hasattr(value, "memory_stats"):  # a KV cache layout: its class, not its tensors
        text = f"<{type(value).__name__}>"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def enable_hook_tracing(pm: pluggy.PluginManager) -> None:
    """Print every hook call with an argument summary and its result (RUNTIME_TRACE_HOOKS=1)."""

    def before(hook_name: str, hook_impls: list, kwargs: dict) -> None:
        try:
            args = ", ".join(f"{k}={_summarise(v)}" for k, v in kwargs.items())
        except Exception as exc:  # noqa: BLE001 - tracing must never break a hook call
            args = f"<unprintable: {exc!r}>"
        impls = ", ".join(impl.plugin_name for impl in reversed(hook_impls))  # call order
        print(f"[hook] {hook_name}({args}) impls=[{impls}]", file=sys.stderr)

    def after(outcome: Any, hook_name: str, hook_impls: list, kwargs: dict) -> None:
        if outcome.exception is not None:
            result = f"raised {type(outcome.exception).__name__}: {outcome.exception}"
        else:
            try:
                result = _summarise(outcome.get_result())
            except Exception as exc:  # noqa: BLE001 - tracing must never break a hook call
                result = f"<unprintable: {exc!r}>"
        print(f"[hook] {hook_name} -> {result}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)
