"""The run-to-completion static batcher both papers start from, as a scheduler plugin."""

from static_plugin.scheduler import StaticScheduler

__all__ = ["StaticScheduler"]
