"""BATON (Cong et al., 2024): dynamic re-batching with vector shaping and KV-cache embedding."""

from baton_plugin.scheduler import BatonScheduler

__all__ = ["BatonScheduler"]
