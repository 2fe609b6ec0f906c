"""Orca (OSDI 2022) as a scheduler plugin: iteration-level scheduling, selective batching."""

from orca_plugin.scheduler import OrcaScheduler

__all__ = ["OrcaScheduler"]
